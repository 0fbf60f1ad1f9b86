"""One headline per benchmark of a run, beside the limit it is bounded by: each reader
below knows one module's results JSON (bench/summary.py tabulates and plots them). A
reader that finds an unexpected format adds a note instead of failing the suite (the
module's own table is still there).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import gbps

MIB = 1 << 20


@dataclass(frozen=True)
class Headline:
    bench: str
    measure: str
    cpcoord: float
    limit: float | None
    limit_what: str
    unit: str  # GB/s and MiB/s: higher is better; ms and s: lower is better
    bound: bool = True  # the comparator is a limit; False: a reference (e.g. full capture)

    @property
    def ratio(self) -> float | None:
        if not self.limit or not self.cpcoord:
            return None
        rate = self.unit.endswith("/s")
        return self.cpcoord / self.limit if rate else self.limit / self.cpcoord

    @property
    def gbps(self) -> tuple[float, float | None] | None:
        """(cpcoord, limit) in GB/s, for the throughput plot; None for times."""
        scale = {"GB/s": 1.0, "MiB/s": MIB / 1e9}.get(self.unit)
        if scale is None:
            return None
        return self.cpcoord * scale, None if self.limit is None else self.limit * scale

    def verdict(self) -> str:
        r = self.ratio
        if r is None:
            return ""
        if self.bound:
            return f"{100 * r:.0f}% of the limit"
        return f"{r:.1f}x faster" if r >= 1 else f"{1 / r:.1f}x slower"

    def row(self) -> dict[str, Any]:
        return {
            "benchmark": self.bench,
            "measure": self.measure,
            "cpcoord": f"{self.cpcoord:.3g} {self.unit}",
            "compared to (same run)": "" if self.limit is None else f"{self.limit:.3g} {self.unit}",
            "which is": self.limit_what,
            "cpcoord vs it": self.verdict(),
        }


def doc(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _capture(name: str, d: dict[str, Any]) -> list[Headline]:
    size, x = d["extra"]["size_bytes"], d["extra"]
    fz, raw = x["capture"]["frozen"]["median"], x["raw_readv"]["median"]
    what = f"capture of {size // MIB} MiB: freeze + copy + thaw"
    return [Headline(name, what, gbps(size, fz), gbps(size, raw), "raw process_vm_readv", "GB/s")]


def _restore(d: dict[str, Any]) -> list[Headline]:
    x, size = d["extra"], d["extra"]["size_bytes"]
    wr, fz, raw = (
        x["in_place"]["write"]["median"],
        x["in_place"]["frozen"]["median"],
        x["raw_writev"]["median"],
    )
    return [
        Headline(
            "restore",
            f"restore in place of {size // MIB} MiB: write",
            gbps(size, wr),
            gbps(size, raw),
            "raw process_vm_writev",
            "GB/s",
        ),
        Headline(
            "restore",
            "restore in place: frozen window",
            gbps(size, fz),
            gbps(size, raw),
            "raw process_vm_writev",
            "GB/s",
        ),
    ]


def _end_to_end(d: dict[str, Any]) -> list[Headline]:
    x, size = d["extra"], d["extra"]["size_bytes"]
    return [
        Headline(
            "end_to_end",
            f"full checkpoint of {size // MIB} MiB, call to COMMITTED",
            gbps(size, x["full"]["commit_s"]),
            gbps(size, x["raw_grpc_best_s"]),
            "raw gRPC stream on loopback",
            "GB/s",
        ),
        Headline(
            "end_to_end",
            f"incremental checkpoint ({x.get('dirty_pages', '?')} pages dirty)",
            x["incremental"]["commit_s"] * 1e3,
            x["full"]["commit_s"] * 1e3,
            "full checkpoint",
            "ms",
            bound=False,
        ),
    ]


def _incremental(d: dict[str, Any]) -> list[Headline]:
    out = []
    rows = d["rows"]
    for tracker in dict.fromkeys(r["tracker"] for r in rows if r["tracker"] != "none"):
        mine = {r["dirty"]: r for r in rows if r["tracker"] == tracker}
        if "1%" in mine and "full capture" in mine:
            out.append(
                Headline(
                    "incremental",
                    f"{tracker}: frozen at 1% dirty",
                    mine["1%"]["frozen ms"],
                    mine["full capture"]["frozen ms"],
                    "full capture, same target",
                    "ms",
                    bound=False,
                )
            )
    return out


def _store(d: dict[str, Any]) -> list[Headline]:
    mib, k, b = d["mib"], d["kinds"], d["baselines"]
    out = []
    for kind in ("random", "compressible"):
        if kind in k:
            rate = mib / (k[kind]["ingest"] + k[kind]["commit"])
            out.append(
                Headline(
                    "store",
                    f"ingest + commit, {kind} data",
                    rate,
                    b["write_fsync"],
                    "write+fsync of 16 MiB files, 1 writer",
                    "MiB/s",
                    bound=False,  # the store writes packs with two threads
                )
            )
    return out


def _store_s3(d: dict[str, Any]) -> list[Headline]:
    rows = {r["backend"]: r for r in d["rows"]}
    raw = next(r for name, r in rows.items() if "raw" in name)["ingest MiB/s"]
    return [
        Headline(
            "store_s3",
            "S3 (SeaweedFS) ingest + commit",
            rows["s3"]["ingest+commit MiB/s"],
            raw,
            "raw S3 put, same server",
            "MiB/s",
        )
    ]


def _workloads(d: dict[str, Any]) -> list[Headline]:
    return [
        Headline(
            "workloads",
            f"{r['workload']}: capture (zero {r['zero %']:.0f}%, dedup "
            f"{r['dedup']:.2f}x, zstd {r['compression']:.2f}x)",
            r["capture GB/s"],
            r["raw readv GB/s"],
            "raw readv of the same runs",
            "GB/s",
        )
        for r in d["rows"]
    ]


def _scale(d: dict[str, Any]) -> list[Headline]:
    x = d["extra"]
    top = max(x["points"], key=lambda p: p["agents"])
    threads, rss = top["threads"]["busy"], top["rss"]["busy"] / MIB
    goal = top["agents"] >= 2000  # the goal: 1 s at 2,000 agents
    return [
        Headline(
            "scale",
            f"checkpoint request to COMMITTED at {top['agents']} simulated agents "
            f"(coordinator {threads} threads, {rss:.0f} MiB)",
            top["commit_s"]["median"] * 1e3,
            1000.0 if goal else x["raw"]["unary_rtt"]["median"] * 1e3,
            "goal at 2,000 agents" if goal else "raw gRPC unary round trip",
            "ms",
            bound=False,
        )
    ]


def _scale_real(d: dict[str, Any]) -> list[Headline]:
    x = d["extra"]
    top = max(x["points"], key=lambda p: p["agents"])
    commit = top["commit_s"]["median"] * 1e3
    return [
        Headline(
            "scale_real",
            f"coordinator overhead at {top['agents']} real agents (request to commit "
            f"{commit:.0f} ms, minus the slowest member's own work)",
            top["overhead_s"]["median"] * 1e3,
            x["raw"]["unary_rtt"]["median"] * 1e3,
            "raw gRPC unary round trip",
            "ms",
            bound=False,
        )
    ]


def _scale_volume(d: dict[str, Any]) -> list[Headline]:
    """The largest direct-path row: its full checkpoint against the raw durable write."""
    top = max((r for r in d["rows"] if r["path"] == "direct"), key=lambda r: r["agents"])
    nbytes = top["GiB committed"] * 2**30
    return [
        Headline(
            "scale_volume",
            f"full checkpoint of {top['agents']} agents, {top['GiB committed']:.2f} GiB, direct "
            f"data path (coordinator CPU {top['coordinator CPU s/GiB']:.2f} s/GiB)",
            gbps(int(nbytes), top["commit s"]),
            gbps(int(nbytes), top["raw durable write s (best of 3)"]),
            "raw durable write of the same bytes",
            "GB/s",
        )
    ]


def _mappings(d: dict[str, Any]) -> list[Headline]:
    """Frozen time of the most mappings measured, beside the one big mapping."""
    rows = d["extra"]["rows"]
    one, most = rows[0], max(rows[1:], key=lambda r: r["mappings"])
    return [
        Headline(
            "capture-mappings",
            f"agent incremental with {most['mappings']} mappings: frozen",
            most["agent_inc"]["median"] * 1e3,
            one["agent_inc"]["median"] * 1e3,
            f"one mapping of {one['pages'] * 4096 // MIB} MiB",
            "ms",
            bound=False,
        )
    ]


READERS: dict[str, Callable[[dict[str, Any]], list[Headline]]] = {
    "capture-mappings": _mappings,
    "restore": _restore,
    "incremental": _incremental,
    "end_to_end": _end_to_end,
    "store": _store,
    "store_s3": _store_s3,
    "workloads": _workloads,
    "scale": _scale,
    "scale_real": _scale_real,
    "scale_volume": _scale_volume,
}


def headlines(out: Path, names: Sequence[str]) -> tuple[list[Headline], list[str]]:
    got: list[Headline] = []
    notes: list[str] = []
    for name in names:
        d = doc(out, name)
        if d is None:
            continue
        reader = READERS.get(name)
        if reader is None and name.startswith("capture"):
            reader = functools.partial(_capture, name)
        if reader is None:
            continue
        try:
            got += reader(d)
        except (KeyError, TypeError, ValueError, IndexError, StopIteration) as e:
            notes.append(
                f"{name}.json: format not understood by bench/headlines.py ({e!r}); see {name}.md"
            )
    return got, notes
