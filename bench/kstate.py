"""What recording the kernel side costs a frozen member (`python -m bench.kstate`).

At every capture of a whole-memory member the agent reads its fd table, offsets and
pipe/socket queues while it is frozen (nodeagent/proc/kstate.py), and a restore in place
reads it again to compare (nodeagent/restore/kernel_check.py): both add to frozen time.
A child process holds N fds, a third each pipes with data queued, socketpairs and
regular files with an offset; for each N the table is read (and compared with itself)
REPS times. Writes bench/results/kstate.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench.common import Stats, load_note, publish, repeat
from cpcoord.kstate import KernelState
from nodeagent.proc.kstate import read_kernel_state
from nodeagent.restore.kernel_check import compare

CHILD = r"""
import os, resource, socket, sys
n, d = int(sys.argv[1]), sys.argv[2]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * n + 64)), hard))
keep = []
for i in range(n // 3):
    r, w = os.pipe(); os.write(w, b"x" * 12); keep += [r, w]
    a, b = socket.socketpair(); a.send(b"y" * 7); keep += [a, b]
    f = os.open(os.path.join(d, str(i)), os.O_RDWR | os.O_CREAT); os.write(f, b"z" * 9)
    keep.append(f)
print("ready", flush=True)
sys.stdin.read()
"""


def _child(n: int, d: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(n), d],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        raise RuntimeError("child did not start")
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fds", type=int, nargs="+", default=[10, 100, 1000, 4000, 10000])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for n in args.fds:
        d = tempfile.mkdtemp(prefix=f"bench-kstate-{os.getpid()}-")
        p = _child(n, d)
        try:
            rec: list[KernelState] = []
            cpu: list[float] = []

            def once(pid: int = p.pid, out: list[KernelState] = rec, c: list[float] = cpu) -> float:
                t0, c0 = time.perf_counter(), time.process_time()
                out[:] = [read_kernel_state(pid)]
                c.append(time.process_time() - c0)
                return time.perf_counter() - t0

            st: Stats = repeat(once, args.reps, warmup=1)
            cpu_s = Stats.of(cpu[1:])
            s = rec[0]
            cmp = repeat(_compare_once(s), args.reps)
            rows.append(
                {
                    "fds": len(s.fds),
                    "queues read": sum(f.unread is not None for f in s.fds),
                    "read ms (median)": st.median * 1e3,
                    "read ms (max)": st.max * 1e3,
                    "cpu ms (median)": cpu_s.median * 1e3,
                    "cpu us per fd": cpu_s.median * 1e6 / max(1, len(s.fds)),
                    "compare ms": cmp.median * 1e3,
                    "partial": s.partial or "-",
                }
            )
        finally:
            p.kill()
            p.wait()
            shutil.rmtree(d, ignore_errors=True)

    def plot(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        xs = [r["fds"] for r in rows]
        ax.plot(xs, [r["read ms (median)"] for r in rows], "o-", label="read (frozen)")
        ax.plot(xs, [r["compare ms"] for r in rows], "s-", label="compare")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("open fds")
        ax.set_ylabel("ms")
        ax.legend()
        ax.set_title("kernel side of a member: cost per capture / restore")

    notes = [
        "A third of the fds each: pipe ends with 12 bytes queued, socketpair ends, regular "
        "files; at most MAX_QUEUES queues are read per call (then the record says partial).",
        "read ms is wall time (what the member spends frozen); cpu ms is the agent's user + "
        "system time of the same call, less sensitive to the machine's load.",
        load_note(load0, "other engineers' test runs"),
    ]
    return publish("kstate", "Recording the kernel side at the cut", rows, notes=notes, plot=plot)


def _compare_once(s: KernelState) -> Callable[[], float]:
    def once() -> float:
        t0 = time.perf_counter()
        compare(s, s)
        return time.perf_counter() - t0

    return once


if __name__ == "__main__":
    raise SystemExit(main())
