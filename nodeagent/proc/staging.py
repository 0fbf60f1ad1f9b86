"""Our side of a copy out of another process: the staging buffer and the copy threads.

Owns: the staging buffer (page-aligned anonymous memory, transparent huge pages asked
for, prefaulted *before* the target is frozen so the copy never takes first-touch faults
on our side, rows of holes left to fault in when written), and the threads a big copy is
shared out to, started before the freeze. Reading into it is `reader`'s business.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from cpcoord.anonmem import huge_map, populate_range
from cpcoord.ranges import PAGE_SIZE

HUGE = 2 << 20

POPULATE_SLICE = 64 << 20  # below this, one thread populates

# A copy at least this big is shared out to COPY_THREADS threads, in pieces of at most
# COPY_PIECE (a run longer than that is cut: iovecs do not care where runs end).
PARALLEL_MIN = 64 << 20
COPY_PIECE = 32 << 20
COPY_THREADS = min(4, os.cpu_count() or 1)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()  # a forked child has none of the threads


os.register_at_fork(after_in_child=_forget_pool)


def copy_threads() -> ThreadPoolExecutor:
    """The threads a big copy is shared out to, every one of them started: call it before
    the freeze (Staging.reserve and capture's preparation do), because starting a thread
    means waiting until the scheduler runs it, up to 100s of ms on a busy machine, which
    must not happen inside the frozen window. They stay for the life of the process."""
    global _pool
    with _pool_lock:
        if _pool is None:
            pool = ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="cpcoord-copy")
            # Each worker blocks until all are up, so every submit starts a new thread.
            gate = threading.Barrier(COPY_THREADS + 1)
            started = [pool.submit(gate.wait) for _ in range(COPY_THREADS)]
            gate.wait()
            for f in started:
                f.result()
            _pool = pool
        return _pool


def _populate(addr: int, size: int) -> bool:
    """Fault `[addr, addr + size)` in, writable, in slices on a few threads (the kernel
    zeroes the pages; ctypes drops the GIL, so slices zero in parallel). False when the
    kernel lacks MADV_POPULATE_WRITE."""

    def one(off: int) -> bool:
        return populate_range(addr + off, min(POPULATE_SLICE, size - off))

    offsets = range(0, size, POPULATE_SLICE)
    workers = min(4, os.cpu_count() or 1, len(offsets))
    if workers <= 1:
        results = [one(o) for o in offsets]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, offsets))
    return all(results)


class Staging:
    """A reusable, prefaulted, page-aligned buffer that captured pages are copied into.

    Views handed out (`pages`) alias this memory: the next capture that reuses the same
    Staging overwrites them. `reserve` before freezing; it is cheap when big enough.

    What the contents are, for readers that keep them past the capture (the chunks of
    the last upload, nodeagent/upload/recent.py): `version` changes whenever a capture
    writes (it takes `rewrite()`, not `address`) or the memory is replaced; `clobbered`
    is how many leading bytes a borrower (a restore's backup, `clobber`) wrote
    since. Those readers check every chunk's bytes against its id anyway: the two only
    spare them hashing bytes that are known to have changed.
    """

    def __init__(self, nbytes: int = 0) -> None:
        self._mm: mmap.mmap | None = None
        self._arr: npt.NDArray[np.uint8] = np.zeros(0, dtype=np.uint8)
        self.capacity = 0
        self.allocations = 0
        self.version = 0
        self.clobbered = 0
        if nbytes:
            self.reserve(nbytes)

    def reserve(self, nbytes: int, populate: int | None = None) -> bool:
        """Make room for `nbytes`, prefaulting the first `populate` bytes (default: all);
        return True when memory was (re)allocated. Rows past `populate` fault in when
        written: rows of holes of shared objects are never written (shared.py), so a
        sparse object costs address space, not memory."""
        if nbytes >= PARALLEL_MIN:
            copy_threads()  # the copy into this buffer will want them: start them now
        if nbytes <= self.capacity:
            return False
        size = max(HUGE, (nbytes + HUGE - 1) // HUGE * HUGE)
        fill = size if populate is None else min(size, (max(0, populate) + HUGE - 1) // HUGE * HUGE)
        self.close()
        mm = huge_map(size, noreserve=True)  # huge pages first, then populate
        arr = np.frombuffer(mm, dtype=np.uint8)
        if fill and not _populate(int(arr.ctypes.data), fill):
            arr[:fill:PAGE_SIZE] = 0  # old kernel: touch one byte per page, vectorised
        self._mm = mm
        self._arr = arr
        self.capacity = size
        self.allocations += 1
        self.version += 1
        return True

    @property
    def address(self) -> int:
        return int(self._arr.ctypes.data)

    def rewrite(self) -> int:
        """The address, for a capture about to write its pages here: what was held
        before is not any more (`version`)."""
        self.version += 1
        self.clobbered = 0
        return self.address

    def clobber(self, upto: int) -> None:
        """A borrower wrote bytes [0, upto) (restore backups fill staging from the start)."""
        self.clobbered = max(self.clobbered, upto)

    def array(self) -> npt.NDArray[np.uint8]:
        """The whole buffer as bytes; a reader on another thread holds it while it reads
        (the memory then outlives a `close`)."""
        return self._arr

    def pages(self, first: int, count: int) -> npt.NDArray[np.uint8]:
        """Rows `[first, first + count)` of the buffer as a `(count, PAGE_SIZE)` view."""
        return self._arr[first * PAGE_SIZE : (first + count) * PAGE_SIZE].reshape(count, PAGE_SIZE)

    def close(self) -> None:
        self.version += 1
        self._arr = np.zeros(0, dtype=np.uint8)
        if self._mm is not None:
            # Views of it may still be alive (results of an earlier capture): then the
            # memory goes away with the last of them.
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None
        self.capacity = 0
