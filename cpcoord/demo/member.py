"""The demo's sample member: a process that owns a state region and mutates it on command.

`python -m cpcoord.demo.member --pages N --seed S` maps N anonymous pages, fills them with
bytes derived from the seed, prints one JSON line {"pid", "addr", "pages"}, then obeys
lines on stdin: `step K` rewrites K pages chosen by the step number (answers `ok`),
`digest` answers the SHA-256 of the region, `exit` leaves. The demo drives the steps,
so it knows what the region held at every checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import sys

import numpy as np

PAGE = mmap.PAGESIZE


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    mm = mmap.mmap(-1, a.pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    state = np.frombuffer(mm, dtype=np.uint8).reshape(a.pages, PAGE)
    rng = np.random.default_rng(a.seed)
    # Half random pages, a quarter repeated text (compresses), a quarter zeros.
    half, quarter = a.pages // 2, a.pages // 4
    state[:half] = rng.integers(0, 256, (half, PAGE), dtype=np.uint8)
    text = np.frombuffer((b"cpcoord demo state " * (PAGE // 19 + 1))[:PAGE], dtype=np.uint8)
    state[half : half + quarter] = text
    addr = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    print(json.dumps({"pid": _pid(), "addr": addr, "pages": a.pages}), flush=True)
    step = 0
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "step":
            step += 1
            k = int(words[1])
            pick = np.random.default_rng([a.seed, step]).choice(a.pages, k, replace=False)
            state[pick] = np.random.default_rng([a.seed, step, 1]).integers(
                0, 256, (k, PAGE), dtype=np.uint8
            )
            print("ok", flush=True)
        elif words[0] == "digest":
            print(hashlib.sha256(state.tobytes()).hexdigest(), flush=True)
        elif words[0] == "exit":
            break
    return 0


def _pid() -> int:
    import os

    return os.getpid()


if __name__ == "__main__":
    sys.exit(main())
