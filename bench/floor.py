"""The floor of a checkpoint to a node-local write: what each agent cannot skip today.

A checkpoint that commits once every member's pages are durable in some directory must,
per member, at least: copy its pages out of the process (process_vm_readv into a
prefaulted buffer, as staging is), hash them into chunk ids (one BLAKE3 pass, 64 KiB
chunks: the ids are what manifests and dedup are made of), and write them into a file
there and fsync it. `parallel_floor` does only that, for every member at once in its
own process (one per agent, as on a cluster) from one start signal, and times until the
last is done: nothing of the protocol, compression, packing or the pack id.

Held against the raw write of the same bytes (one writer), it says how close to that
write any checkpoint with chunk ids computed before the commit can come on this machine.

In a directory in memory (tmpfs: a node cache) each file is written full of zeros before
the start, by the cache's own `spares.touch`, and then written over, as the cache's
spare files are: the first touch of fresh memory in this VM is slow and varies (a floor of
fresh pages ranged 0.42-0.75 s between runs), and the cache does not pay it either.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np

from bench.common import Stats, vm_copy
from nodeagent.cache import spares
from nodeagent.proc.staging import Staging
from storecore.directio import in_memory
from storecore.ids import digest_all

CHUNK = 64 << 10


def _one(
    pid: int, addr: int, size: int, path: Path, ready: mp.Queue[int], go: Event,
    out: mp.Queue[float],
) -> None:  # fmt: skip
    buf = Staging(size)
    spare = in_memory(path.parent)
    if spare:  # pages written before the start, as the cache writes its spares
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            spares.touch(fd, size)
        finally:
            os.close(fd)
    ready.put(os.getpid())
    go.wait()
    vm_copy("process_vm_readv", pid, np.array([[addr, size]], dtype=np.uint64), buf.address)
    data = buf.array()[:size]
    digest_all([data[i : i + CHUNK] for i in range(0, size, CHUNK)])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (0 if spare else os.O_TRUNC), 0o600)
    try:
        view = memoryview(data)
        done = 0
        while done < size:
            done += os.write(fd, view[done:])
        os.fsync(fd)
    finally:
        os.close(fd)
    out.put(time.perf_counter())


def once(members: list[tuple[int, int, int]], directory: Path) -> float:
    """One run: seconds from the start signal until the last member's file is durable."""
    ctx = mp.get_context("fork")
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    paths = [directory / f".cpcoord-floor-{os.getpid()}-{i}" for i in range(len(members))]
    procs = [
        ctx.Process(target=_one, args=(pid, addr, size, p, ready, go, out))
        for (pid, addr, size), p in zip(members, paths, strict=True)
    ]
    for p in procs:
        p.start()
    for _ in procs:  # every buffer prefaulted before the start
        ready.get(timeout=120)
    t0 = time.perf_counter()
    go.set()
    ends = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    for path in paths:
        path.unlink(missing_ok=True)
    if any(p.exitcode for p in procs):
        raise RuntimeError("a floor process failed")
    return max(ends) - t0


def parallel_floor(members: list[tuple[int, int, int]], directory: Path, reps: int) -> Stats:
    """Best-of-`reps` statistics of `once` (members: (pid, address, bytes) each)."""
    return Stats.of([once(members, directory) for _ in range(reps)])
