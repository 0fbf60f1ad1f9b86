"""The suite's summary: one headline per benchmark beside the limit it is bounded by, and
the cross-benchmark plots, read back from the results files of one run (bench/run_all.py).

Writes summary.{json,md}, downtime.png (time the target is stopped vs memory size, with
raw process_vm_readv of the same size) and throughput.png (cpcoord vs its limit). The
headlines are read from each module's JSON by bench/headlines.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import write_results
from bench.headlines import MIB, Headline, doc, headlines

if TYPE_CHECKING:
    from bench.run_all import Outcome, Plan


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def downtime_plot(out: Path, names: Sequence[str]) -> Path | None:
    """Frozen time vs memory size, from every capture*.json of the run."""
    pts = []
    for name in names:
        d = doc(out, name) if name.startswith("capture") else None
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
    r = doc(out, "restore")
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
    limits = doc(out, "limits")
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
    last = doc(out, "summary")
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
