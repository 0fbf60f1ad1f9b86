"""Workloads beyond random bytes, as real processes (for bench/workloads_bench.py).

    python -m bench.workloads serve KIND --mib N [--seed S] [--rank R]

runs one member: it builds its memory, prints one JSON line (`ok`, `ranges`: the address
ranges to capture, or null for the default set of all writable private mappings), then
answers `step` (advance the workload by one step) and `quit` on stdin, one JSON line each.

| workload | members | memory |
| --- | --- | --- |
| stencil | 1 | 2-D float64 grid (heat equation), 5-point Jacobi step rewrites every value |
| dict-heap | 1 | dict of ~600-byte records; the whole interpreter's writable memory |
| sparse | 1 | float64 array, all pages resident, 1/16 of them 16% dense, the rest zero |
| ranks | 2 | data-parallel ranks: 90% identical float32 parameters, 10% private |

Arrays live in their own page-aligned anonymous mappings, so a range is exactly the array.
The parent side is `Member` / `start`. Steps are deterministic (seeded).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from cpcoord.ranges import AddressRange

REPO = Path(__file__).resolve().parents[1]
PAGE = 4096


@dataclass(frozen=True)
class Workload:
    name: str
    members: int
    about: str


WORKLOADS = (
    Workload("stencil", 1, "float64 grid, 5-point Jacobi step (simulation)"),
    Workload("dict-heap", 1, "Python dict of records, whole interpreter heap"),
    Workload("sparse", 1, "float64 array, 94% of pages all-zero, the rest 16% dense"),
    Workload("ranks", 2, "2 ranks: 90% identical float32 parameters, 10% private"),
)
BY_NAME = {w.name: w for w in WORKLOADS}


# -- member side (the child process) --------------------------------------------------------


class Memory(Protocol):
    @property
    def ranges(self) -> list[tuple[int, int]] | None:
        """[start, end) of what to capture; None: the default set."""
        ...

    def step(self) -> None: ...


def _mapping(nbytes: int) -> tuple[mmap.mmap, int]:
    """A private anonymous mapping of whole pages and its address."""
    nbytes = max(PAGE, -(-nbytes // PAGE) * PAGE)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = np.frombuffer(mm, dtype=np.uint8)
    return mm, int(view.ctypes.data)


class Stencil:
    def __init__(self, nbytes: int, seed: int) -> None:
        n = max(16, int((nbytes // 8) ** 0.5))
        self.mm, addr = _mapping(n * n * 8)
        self.ranges = [(addr, addr + len(self.mm))]
        self.a = np.frombuffer(self.mm, dtype=np.float64)[: n * n].reshape(n, n)
        y, x = np.ogrid[0:n, 0:n]
        rng = np.random.default_rng(seed)
        self.a[:] = 1.0 + 0.5 * np.sin(2 * np.pi * 3 * x / n) * np.cos(2 * np.pi * 2 * y / n)
        self.a += rng.normal(0, 1e-3, size=(n, n))  # measurement noise in the initial state
        self.a[0, :] = 2.0  # a hot boundary
        for _ in range(3):
            self.step()

    def step(self) -> None:
        a = self.a
        a[1:-1, 1:-1] = 0.25 * (a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:])


class DictHeap:
    ranges = None  # the default set: all writable private mappings

    def __init__(self, nbytes: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.records: dict[str, dict[str, Any]] = {}
        base = _rss()
        while _rss() - base < nbytes:
            self._add(20_000)

    def _add(self, count: int) -> None:
        r, i0 = self.rng, len(self.records)
        for i in range(i0, i0 + count):
            self.records[f"user:{i:08d}"] = {
                "id": i,
                "name": f"user-{i % 5003}",
                "email": f"user{i}@example.org",
                "score": r.random() * 100,
                "tags": [f"tag{i % 17}", f"tag{i % 23}", r.choice(("a", "b", "c"))],
                "active": i % 3 == 0,
                "seen": {"first": 1_700_000_000 + i, "last": 1_700_000_000 + 2 * i},
            }

    def step(self) -> None:
        """Update 1% of the records' scores, add 0.5% new records."""
        keys = list(self.records)
        for k in self.rng.sample(keys, max(1, len(keys) // 100)):
            self.records[k]["score"] = self.rng.random() * 100
        self._add(max(1, len(keys) // 200))


class Sparse:
    def __init__(self, nbytes: int, seed: int) -> None:
        self.mm, addr = _mapping(nbytes)
        self.ranges = [(addr, addr + len(self.mm))]
        self.rows = np.frombuffer(self.mm, dtype=np.float64).reshape(-1, PAGE // 8)
        self.rows[:] = 0.0  # every page written: resident, all-zero
        self.rng = np.random.default_rng(seed)
        n = self.rows.shape[0]
        self._fill(self.rng.choice(n, max(1, n // 16), replace=False))

    def _fill(self, pages: npt.NDArray[np.int64]) -> None:
        vals = self.rng.standard_normal((pages.size, PAGE // 8))
        mask = self.rng.random((pages.size, PAGE // 8)) < 0.16
        self.rows[pages] = np.where(mask, vals, 0.0)

    def step(self) -> None:
        """Fill-in: values appear in 1/256 more pages."""
        n = self.rows.shape[0]
        self._fill(self.rng.choice(n, max(1, n // 256), replace=False))


class Ranks:
    SHARED = 0.9

    def __init__(self, nbytes: int, seed: int, rank: int) -> None:
        self.mm, addr = _mapping(nbytes)
        self.ranges = [(addr, addr + len(self.mm))]
        a = np.frombuffer(self.mm, dtype=np.float32)
        cut = int(a.size * self.SHARED) // (PAGE // 4) * (PAGE // 4)
        self.params, self.private = a[:cut], a[cut:]
        self.seed, self.rank, self.steps = seed, rank, 0
        self.params[:] = np.random.default_rng(seed).standard_normal(cut, dtype=np.float32)
        self._private()

    def _private(self) -> None:
        rng = np.random.default_rng([self.seed, self.rank, self.steps])
        self.private[:] = rng.standard_normal(self.private.size, dtype=np.float32)

    def step(self) -> None:
        """An optimizer step: the same update on every rank, new private state."""
        self.steps += 1
        g = np.random.default_rng([self.seed, self.steps]).standard_normal(
            self.params.size, dtype=np.float32
        )
        self.params -= np.float32(1e-3) * g
        self._private()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def build(kind: str, nbytes: int, seed: int, rank: int) -> Memory:
    if kind == "stencil":
        return Stencil(nbytes, seed)
    if kind == "dict-heap":
        return DictHeap(nbytes, seed)
    if kind == "sparse":
        return Sparse(nbytes, seed)
    if kind == "ranks":
        return Ranks(nbytes, seed, rank)
    raise SystemExit(f"unknown workload {kind!r}")


def serve(kind: str, nbytes: int, seed: int, rank: int) -> None:
    mem = build(kind, nbytes, seed, rank)

    def say(**kv: Any) -> None:
        sys.stdout.write(json.dumps({"ok": True, **kv}) + "\n")
        sys.stdout.flush()

    say(ranges=mem.ranges, rss=_rss())
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            t0 = time.perf_counter()
            mem.step()
            say(seconds=time.perf_counter() - t0, rss=_rss())
        elif cmd == "quit":
            return
        else:
            sys.stdout.write(json.dumps({"ok": False, "error": f"unknown {cmd!r}"}) + "\n")
            sys.stdout.flush()


# -- parent side --------------------------------------------------------------------------------


class Member:
    """One running workload process and its line-JSON channel."""

    def __init__(self, kind: str, name: str, mib: int, seed: int, rank: int = 0) -> None:
        argv = [sys.executable, "-m", "bench.workloads", "serve", kind, "--mib", str(mib)]
        argv += ["--seed", str(seed), "--rank", str(rank)]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.name = name
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self.pid = self.proc.pid
        self._buf = b""
        hello = self._reply(timeout=300 + mib)
        got = hello["ranges"]
        self.ranges: tuple[AddressRange, ...] | None = (
            None if got is None else tuple(AddressRange(int(a), int(b)) for a, b in got)
        )
        self.rss = int(hello["rss"])

    def _reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"workload {self.name} did not answer in {timeout:.0f}s")
            if select.select([self.proc.stdout], [], [], left)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise RuntimeError(f"workload {self.name} exited ({self.proc.poll()})")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"workload {self.name}: {reply.get('error')}")
        return reply

    def step(self) -> float:
        """One step of the workload; returns its seconds."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"step\n")
        return float(self._reply(timeout=600)["seconds"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"quit\n")
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.proc.wait()


def start(w: Workload, mib: int, seed: int = 7) -> list[Member]:
    """The members of a workload, running; each holds about `mib` MiB."""
    out: list[Member] = []
    try:
        for rank in range(w.members):
            out.append(Member(w.name, f"{w.name}-{rank}", mib, seed, rank))
    except BaseException:
        stop(out)
        raise
    return out


def stop(members: Sequence[Member]) -> None:
    for m in members:
        m.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.workloads", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("kind", choices=sorted(BY_NAME))
    s.add_argument("--mib", type=int, required=True)
    s.add_argument("--seed", type=int, default=7)
    s.add_argument("--rank", type=int, default=0)
    args = p.parse_args(argv)
    serve(args.kind, args.mib << 20, args.seed, args.rank)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
