"""Frozen time against the number of mappings (`python -m bench.capture --mappings ...`).

A target (tests/helpers/c/manymaps_target.c) maps N one-page private mappings with a
hole between neighbours (N mappings the kernel cannot merge), plus, for comparison, one
mapping of SIZE MiB. For each, the time the process is stopped is measured two ways,
each a full capture followed by an incremental one (every 7th mapping written between):

- `cpcoord capture` (a subprocess; its JSON `frozen_s`), the incremental with `--parent`;
- the node agent's capture path with uffd-wp (nodeagent/daemon/tracking.py, as the ptrace
  worker runs it: freeze, tracker arm or collect, copy, thaw), timed from the freeze to
  the thaw like the agent's `frozen_seconds`.

Default regions (no range): one region per mapping, as `cpcoord attach` without
`--range`. With `--before FILE` (this module's JSON written by an older tree), its numbers
are shown beside. Writes bench/results/NAME.{json,md,png} (default capture-mappings).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Stats, write_results
from testbed.driver import REPO

C_SOURCE = REPO / "tests" / "helpers" / "c" / "manymaps_target.c"
PAGE = 4096


def _build(out: Path) -> Path:
    exe = out / "manymaps_target"
    subprocess.run(
        ["gcc", "-O2", f"-I{C_SOURCE.parent}", "-o", str(exe), str(C_SOURCE)], check=True
    )
    return exe


class _Target:
    def __init__(self, exe: Path, n: int, pages: int) -> None:
        self.proc = subprocess.Popen(
            [str(exe), str(n), str(pages), "holes"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "ready":
            raise RuntimeError(f"target did not start: {line}")
        self.pid = self.proc.pid
        with open(f"/proc/{self.pid}/maps") as f:
            self.vmas = sum(1 for _ in f)

    def write(self, counter: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"W 7 {counter}\n")
        self.proc.stdin.flush()
        if not self.proc.stdout.readline().startswith("ok"):
            raise RuntimeError("target failed to write")

    def check(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("c\n")
        self.proc.stdin.flush()
        if not self.proc.stdout.readline().startswith("ok"):
            raise RuntimeError("the target's own check failed after the captures")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _cli(pid: int, out: Path, parent: Path | None) -> float:
    argv = [sys.executable, "-m", "cpcoord", "capture", "--pid", str(pid), "--out", str(out)]
    argv += ["--json"] + (["--parent", str(parent)] if parent else [])
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", str(REPO)))
    res = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"cpcoord capture failed: {res.stderr.strip()[-500:]}")
    return float(json.loads(res.stdout)["frozen_s"])


def _cli_pair(t: _Target, work: Path, rep: int) -> tuple[float, float]:
    a, b = work / f"full{rep}", work / f"inc{rep}"
    full = _cli(t.pid, a, None)
    t.write(rep + 2)
    inc = _cli(t.pid, b, a)
    shutil.rmtree(a)
    shutil.rmtree(b)
    return full, inc


def _agent_pair(t: _Target, rep: int) -> tuple[float, float]:
    """The worker's steps (nodeagent/daemon/worker.py `_capture_member`) on a fresh member."""
    from nodeagent.capture import copyout
    from nodeagent.daemon import tracking
    from nodeagent.daemon.membership import HeldMember
    from nodeagent.proc.freeze import freeze, thaw
    from nodeagent.proc.procfs import ProcessIdentity
    from nodeagent.proc.reader import sys_readv
    from nodeagent.proc.staging import Staging

    ident = ProcessIdentity.of(t.pid)
    m = HeldMember("bench", "m", ident, None, "uffd-wp")
    staging = Staging()
    out = []
    try:
        for gen in (1, 2):
            staging.reserve(*copyout.estimate(t.pid, None))  # before the freeze, as the agent
            t0 = time.monotonic()
            fp = freeze(ident)
            try:
                tracking.capture_frozen(m, fp, gen, False, staging, sys_readv)
            finally:
                thaw(fp)
            out.append(time.monotonic() - t0)
            m.committed_through(gen)
            if gen == 1:
                if m.tracker_name != "uffd-wp":
                    raise RuntimeError(f"uffd-wp did not arm (tracker {m.tracker_name!r})")
                t.write(rep + 100)
        tracking.release(m, None, 5.0)  # close its uffd: the next member arms its own
    finally:
        staging.close()
    return out[0], out[1]


def _measure(exe: Path, n: int, pages: int, reps: int) -> dict[str, Any]:
    row: dict[str, Any] = {"mappings": n, "pages": n * pages}
    for path in ("agent", "cli"):
        t = _Target(exe, n, pages)
        row["vmas"] = t.vmas
        work = Path(tempfile.mkdtemp(prefix="cpcoord-bench-maps-", dir="/dev/shm"))
        try:
            pairs = [
                _agent_pair(t, r) if path == "agent" else _cli_pair(t, work, r) for r in range(reps)
            ]
            t.check()
        finally:
            shutil.rmtree(work, ignore_errors=True)
            t.close()
        row[f"{path}_full"] = Stats.of([p[0] for p in pairs]).as_dict()
        row[f"{path}_inc"] = Stats.of([p[1] for p in pairs]).as_dict()
        print(
            f"{n:>6} mappings, {path}: full {row[f'{path}_full']['median']:.3f} s, "
            f"incremental {row[f'{path}_inc']['median']:.3f} s",
            flush=True,
        )
    return row


def run(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.capture --mappings", description=__doc__)
    p.add_argument("--mappings", required=True, help="comma-separated counts, e.g. 1000,20000")
    p.add_argument("--size-mib", type=int, default=1024, help="the single mapping's size")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--name", default="capture-mappings")
    p.add_argument("--before", type=Path, help="this module's JSON from an older tree")
    p.add_argument("--label", default="now", help="what this tree is, in the table")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.mappings.split(",") if x]
    build = Path(tempfile.mkdtemp(prefix="cpcoord-bench-build-"))
    try:
        exe = _build(build)
        rows = [_measure(exe, 1, (args.size_mib << 20) // PAGE, args.reps)]
        rows += [_measure(exe, n, 1, args.reps) for n in counts]
    finally:
        shutil.rmtree(build, ignore_errors=True)
    before = _before(args.before)
    return _write(args, rows, before)


def _before(path: Path | None) -> dict[tuple[int, int], dict[str, Any]]:
    if path is None:
        return {}
    doc = json.loads(path.read_text())
    return {(r["mappings"], r["pages"]): r for r in doc["extra"]["rows"]}


def _med(r: dict[str, Any] | None, key: str) -> float | None:
    return None if r is None or key not in r else float(r[key]["median"])


def _write(
    args: argparse.Namespace, rows: list[dict[str, Any]], before: dict[tuple[int, int], Any]
) -> int:
    label = args.label
    table = []
    for r in rows:
        old = before.get((r["mappings"], r["pages"]))
        for path, what in (("cli", "`cpcoord capture`"), ("agent", "agent, uffd-wp")):
            row = {
                "mappings": r["mappings"],
                "VMAs": r["vmas"],
                "pages": r["pages"],
                "path": what,
                f"full s ({label})": _med(r, f"{path}_full"),
                f"incremental s ({label})": _med(r, f"{path}_inc"),
            }
            if before:
                row["full s (before)"] = _med(old, f"{path}_full")
                row["incremental s (before)"] = _med(old, f"{path}_inc")
            table.append(row)
    cols = list(table[0].keys())
    notes = [
        "Frozen time = from the freeze to the thaw (median of the repetitions): the time "
        "the target is stopped. Full = first capture (arms the tracker); incremental = "
        "the next one, after every 7th mapping was written.",
        "Mappings are one page each, a hole between neighbours (the kernel cannot merge "
        "them); one region per mapping (default regions). The 1-mapping row is one "
        f"{args.size_mib} MiB mapping, for comparison.",
        "`cpcoord capture` frozen_s is measured inside the command (freeze to thaw); the "
        "agent's is the worker's sequence in this process (nodeagent/daemon/tracking.py).",
    ]
    if before:
        notes.append(
            "`before`: the same measurement on the tree given with --before (empty where "
            "it was not run: minutes per capture)."
        )

    def plot(fig: Any) -> None:
        ax = fig.subplots(1, 1)
        xs = [r["mappings"] for r in rows]
        for path, style in (("cli", "o-"), ("agent", "s-")):
            for kind in ("full", "inc"):
                ys = [_med(r, f"{path}_{kind}") for r in rows]
                ax.plot(xs, ys, style, label=f"{path} {kind} ({label})")
                if before:
                    old = [
                        (x, _med(before.get((r["mappings"], r["pages"])), f"{path}_{kind}"))
                        for x, r in zip(xs, rows, strict=True)
                    ]
                    pts = [(x, y) for x, y in old if y is not None]
                    if pts:
                        ax.plot(
                            *zip(*pts, strict=True),
                            style[0] + "--",
                            alpha=0.4,
                            label=f"{path} {kind} (before)",
                        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("mappings (1 = one mapping of SIZE MiB)")
        ax.set_ylabel("frozen s (median)")
        ax.legend(fontsize=7)
        ax.set_title("time the target is stopped vs. its number of mappings", fontsize=9)

    paths = write_results(
        args.name,
        "Frozen time vs. number of mappings",
        cols,
        table,
        notes=notes,
        extra={"rows": rows, "reps": args.reps, "label": label},
        plot=plot,
    )
    print(paths[1].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run())
