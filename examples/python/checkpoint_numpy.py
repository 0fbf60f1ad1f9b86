"""A Python process that checkpoints its own NumPy state and gets it back after a restart.

    python examples/python/checkpoint_numpy.py run 50      # 50 steps, checkpoint, go on
    python examples/python/checkpoint_numpy.py resume 80   # restore, finish at step 80

Run it under an agent (`cpcoord run --job demo --member rank-0 -- python ...`, or set
CPCOORD_JOB / CPCOORD_MEMBER and CPCOORD_AGENT_SOCKET yourself). `run` computes STEPS
steps, checkpoints, prints the generation, then keeps computing without checkpointing
until it is killed. `resume` (the restarted process) registers the same region, restores
it from the latest generation and continues from the step it holds up to TOTAL, printing
a result that equals an uninterrupted run of TOTAL steps.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from cpcoord import client

N = 1 << 16  # 64 Ki uint64 values: 512 KiB of state, plus one word for the step


def advance(state: np.ndarray, step: int) -> None:
    """One step of the computation: deterministic, in place (uint64 wraps around)."""
    idx = np.arange(N, dtype=np.uint64)
    state[1:] = state[1:] * np.uint64(6364136223846793005) + idx + np.uint64(step)
    state[0] = step


def digest(state: np.ndarray) -> int:
    return int(np.bitwise_xor.reduce(state[1:] * np.uint64(0x9E3779B97F4A7C15)))


def main(argv: list[str]) -> int:
    mode, steps = argv[0], int(argv[1])
    # state[0] is the step reached; state[1:] the data. Page-aligned, as regions must be.
    state = client.zeros(N + 1, dtype=np.uint64)
    client.register("state", state)
    if mode == "run":
        for s in range(1, steps + 1):
            advance(state, s)
        gen = client.checkpoint()
        print(f"checkpointed generation={gen} step={int(state[0])}", flush=True)
        s = steps
        while True:  # keep working, never checkpoint again: a restart loses this part
            s += 1
            advance(state, s)
            time.sleep(0.01)
    restored = client.restore("state")
    first = int(state[0])
    print(f"restored generation={restored.generation} step={first}", flush=True)
    for s in range(first + 1, steps + 1):
        advance(state, s)
    print(f"result step={int(state[0])} digest={digest(state)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
