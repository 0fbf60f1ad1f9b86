"""The suite's summary: one headline per benchmark beside the limit it is bounded by, and
the cross-benchmark plots, read back from the results files of one run (bench/run_all.py).

Writes summary.{json,md}, downtime.png (time the target is stopped vs memory size, with
raw process_vm_readv of the same size) and throughput.png (cpcoord vs its limit). Each
reader below knows one module's JSON; a reader that finds an unexpected format adds a
note instead of failing the suite (the module's own table is still there).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import gbps, write_results

if TYPE_CHECKING:
    from bench.run_all import Outcome, Plan

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


def _doc(out: Path, name: str) -> dict[str, Any] | None:
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
    goal = top["agents"] >= 2000  # issue 18: 1 s at 2,000 agents
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
}


def headlines(out: Path, names: Sequence[str]) -> tuple[list[Headline], list[str]]:
    got: list[Headline] = []
    notes: list[str] = []
    for name in names:
        d = _doc(out, name)
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
                f"{name}.json: format not understood by bench/summary.py ({e!r}); see {name}.md"
            )
    return got, notes


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def downtime_plot(out: Path, names: Sequence[str]) -> Path | None:
    """Frozen time vs memory size, from every capture*.json of the run."""
    pts = []
    for name in names:
        d = _doc(out, name) if name.startswith("capture") else None
        if d is None or "size_bytes" not in d["extra"]:
            continue  # capture-mappings: frozen time vs mappings, not vs size
        x = d["extra"]
        pts.append((x["size_bytes"] / MIB, x["capture"]["frozen"], x["raw_readv"]["median"]))
    if not pts:
        return None
    pts.sort(key=lambda p: p[0])
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    xs = [p[0] for p in pts]
    med = [p[1]["median"] * 1e3 for p in pts]
    err = [
        [m - p[1]["min"] * 1e3 for m, p in zip(med, pts, strict=True)],
        [p[1]["max"] * 1e3 - m for m, p in zip(med, pts, strict=True)],
    ]
    ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label="cpcoord capture: target stopped")
    ax.plot(
        xs, [p[2] * 1e3 for p in pts], "s--", color="#888", label="raw process_vm_readv, same size"
    )
    r = _doc(out, "restore")
    if r is not None and "in_place" in r.get("extra", {}):
        x = r["extra"]
        ax.plot(
            [x["size_bytes"] / MIB],
            [x["in_place"]["frozen"]["median"] * 1e3],
            "D",
            color="#c60",
            label="restore in place: target stopped",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("memory captured (MiB, 4 KiB pages, incompressible)")
    ax.set_ylabel("ms (median; bars: min-max)")
    ax.set_title("Downtime vs memory size (full capture)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "downtime.png")


def throughput_plot(out: Path, hs: Sequence[Headline]) -> Path | None:
    rates = [(h, h.gbps) for h in hs if h.gbps is not None and h.limit is not None]
    if not rates:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 0.45 * len(rates) + 1.5), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    for i, (h, g) in enumerate(rates):
        assert g is not None and g[1] is not None
        ax.barh(
            i - 0.2,
            g[1],
            0.4,
            color="#bbb",
            label="limit or reference (same run)" if i == 0 else None,
        )
        ax.barh(i + 0.2, g[0], 0.4, color="#2a7", label="cpcoord" if i == 0 else None)
        ax.text(g[0], i + 0.2, f" {h.verdict()} ({h.limit_what})", va="center", fontsize=7)
    ax.set_yticks(range(len(rates)), [f"{h.bench}: {h.measure}" for h, _ in rates], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(right=40 * max(max(g[0], g[1] or 0) for _, g in rates if g is not None))
    ax.set_xlabel("GB/s (median, log scale)")
    ax.set_title("Throughput vs the limit it is bounded by", pad=22)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False)
    return _save(fig, out / "throughput.png")


def write(
    out: Path,
    outcomes: Sequence[Outcome],
    plan: Plan,
    wall: float,
    load0: tuple[float, float, float],
    rebuilt_from: str | None = None,
) -> list[Path]:
    """Summary of one suite run; `rebuilt_from`: the time of the run being rebuilt (the
    header's time and load are then the rebuild's)."""
    import matplotlib

    matplotlib.use("Agg")
    names = [oc.name for oc in outcomes if oc.status == "ok"]
    hs, notes = headlines(out, names)
    notes = [
        f"{plan.mode} mode: {wall:.0f} s in all; load average at the start "
        f"{', '.join(f'{x:.2f}' for x in load0)} (1, 5, 15 min).",
        *(
            f"{oc.name}: {oc.status}"
            + (f" in {oc.seconds:.0f} s" if oc.seconds else "")
            + (f" ({oc.note})" if oc.note else "")
            for oc in outcomes
        ),
        *notes,
        *(
            [f"Rebuilt by `python -m bench.summary` from the run of {rebuilt_from}."]
            if rebuilt_from
            else []
        ),
        "% of the limit: cpcoord's throughput over the limit's, measured by the same module "
        'in the same run; "x faster": time of the reference over cpcoord\'s time.',
    ]
    limits = _doc(out, "limits")
    if limits is not None:
        notes.append(
            "Machine limits (bench/limits.py, this run): "
            + "; ".join(f"{r['limit']} {r['GB/s']:.2f} GB/s" for r in limits["rows"])
        )
    cols = [
        "benchmark",
        "measure",
        "cpcoord",
        "compared to (same run)",
        "which is",
        "cpcoord vs it",
    ]
    paths = write_results(
        "summary",
        "cpcoord benchmarks: summary",
        cols,
        [h.row() for h in hs],
        notes=notes,
        extra={
            "mode": plan.mode,
            "plan": plan.__dict__,
            "seconds": wall,
            "load_start": load0,
            "outcomes": [oc.__dict__ for oc in outcomes],
            "rebuilt_from": rebuilt_from,
        },
        out_dir=out,
    )
    for p in (downtime_plot(out, names), throughput_plot(out, hs)):
        if p is not None:
            paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.summary [--results-dir DIR]`: rebuild the summary and plots from
    the results of the last `python -m bench` run in DIR (e.g. after editing this file)."""
    import argparse
    import os

    from bench.common import results_dir
    from bench.run_all import PLANS, Outcome

    ap = argparse.ArgumentParser(prog="python -m bench.summary", description=main.__doc__)
    ap.add_argument("--results-dir", type=Path, default=None)
    a = ap.parse_args(argv)
    out = (a.results_dir or results_dir()).resolve()
    last = _doc(out, "summary")
    if last is None:
        raise SystemExit(f"no summary.json in {out}: run `python -m bench` first")
    x = last["extra"]
    outcomes = [Outcome(**o) for o in x["outcomes"]]
    load = tuple(x.get("load_start") or os.getloadavg())
    since = x.get("rebuilt_from") or last["created"]
    paths = write(out, outcomes, PLANS[x["mode"]], float(x["seconds"]), load, since)
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
