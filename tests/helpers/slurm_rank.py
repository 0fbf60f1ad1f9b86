"""One rank of the Slurm test job: an iterative computation whose whole state is one
registered NumPy array, paced by the test.

    python slurm_rank.py DIR TOTAL

state[0] is the last step done, state[1:] the data (different per rank). Before step s
the rank waits until the file DIR/budget holds a number >= s: the test is the clock, so
it knows exactly where each rank stands when it preempts the job (no timing in the
assertions). Each step done is appended to DIR/rank-R.log as `step S` (the test counts
work done twice from it); `start ...` opens each run, `result ...` ends it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

N = 1 << 14  # 16 Ki uint64: 128 KiB of state per rank


def advance(state: np.ndarray, step: int, rank: int) -> None:
    idx = np.arange(N, dtype=np.uint64)
    state[1:] = state[1:] * np.uint64(6364136223846793005) + idx + np.uint64(step * 7 + rank)
    state[0] = step


def digest(state: np.ndarray) -> int:
    return int(np.bitwise_xor.reduce(state[1:] * np.uint64(0x9E3779B97F4A7C15)))


def uninterrupted(total: int, rank: int) -> int:
    state = np.zeros(N + 1, dtype=np.uint64)
    for s in range(1, total + 1):
        advance(state, s, rank)
    return digest(state)


def budget(d: Path) -> int:
    try:
        return int((d / "budget").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def main(argv: list[str]) -> int:
    from cpcoord import client, slurm

    d, total = Path(argv[0]), int(argv[1])
    rank = int(os.environ["SLURM_PROCID"])
    log = open(d / f"rank-{rank}.log", "a", buffering=1)  # noqa: SIM115 - the whole run
    state = client.zeros(N + 1, dtype=np.uint64)
    r = slurm.resume({"state": state})
    log.write(f"start restart={r.restart_count} generation={r.generation} step={int(state[0])}\n")
    for s in range(int(state[0]) + 1, total + 1):
        while budget(d) < s:
            time.sleep(0.02)
        advance(state, s, rank)
        log.write(f"step {s}\n")
    log.write(f"result step={int(state[0])} digest={digest(state)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
