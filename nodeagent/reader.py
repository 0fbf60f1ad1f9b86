"""Copying another process's pages into our memory: staging buffer and batched reads.

Owns: the staging buffer (page-aligned anonymous memory, transparent huge pages asked
for, prefaulted *before* the target is frozen so the copy never takes first-touch faults
on our side), reading runs with `process_vm_readv` (iovec arrays built in bulk from NumPy,
one remote iovec per run of pages, batched by nodeagent/iovec.py), and the fallback to
`/proc/PID/mem` for what `process_vm_readv` refuses (VM_IO/VM_PFNMAP mappings, a page that
faults). A page neither path can read is reported back as unreadable, never invented.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cpcoord.errors import ProcessExited, ReadFailed
from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE
from nodeagent.iovec import IOV_MAX as IOV_MAX  # re-exported (bench/common.py)
from nodeagent.iovec import READ, VmFn, alive, ends, transfer, vm_syscall
from nodeagent.pagemap import PageNumbers, empty_pages

log = logging.getLogger(__name__)

MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux >= 5.14; faults pages in writable without touching them
HUGE = 2 << 20

_libc = ctypes.CDLL(None, use_errno=True)

ReadvFn = VmFn
_sys_readv: ReadvFn = vm_syscall("process_vm_readv")


_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
POPULATE_SLICE = 64 << 20  # below this, one thread populates


def _populate(addr: int, size: int) -> bool:
    """Fault `[addr, addr + size)` in, writable, in slices on a few threads (the kernel
    zeroes the pages; ctypes drops the GIL, so slices zero in parallel). False when the
    kernel lacks MADV_POPULATE_WRITE."""

    def one(off: int) -> int:
        n = min(POPULATE_SLICE, size - off)
        return int(_libc.madvise(addr + off, n, MADV_POPULATE_WRITE))

    offsets = range(0, size, POPULATE_SLICE)
    workers = min(4, os.cpu_count() or 1, len(offsets))
    if workers <= 1:
        results = [one(o) for o in offsets]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, offsets))
    return all(r == 0 for r in results)


class Staging:
    """A reusable, prefaulted, page-aligned buffer that captured pages are copied into.

    Views handed out (`pages`) alias this memory: the next capture that reuses the same
    Staging overwrites them. `reserve` before freezing; it is cheap when big enough.
    """

    def __init__(self, nbytes: int = 0) -> None:
        self._mm: mmap.mmap | None = None
        self._arr: npt.NDArray[np.uint8] = np.zeros(0, dtype=np.uint8)
        self.capacity = 0
        self.allocations = 0
        if nbytes:
            self.reserve(nbytes)

    def reserve(self, nbytes: int) -> bool:
        """Make room for `nbytes`; return True when memory was (re)allocated."""
        if nbytes <= self.capacity:
            return False
        size = max(HUGE, (nbytes + HUGE - 1) // HUGE * HUGE)
        self.close()
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(OSError):
            # Huge pages first, then populate: 512x fewer faults and TLB misses.
            mm.madvise(MADV_HUGEPAGE)
        arr = np.frombuffer(mm, dtype=np.uint8)
        if not _populate(int(arr.ctypes.data), size):
            arr[::PAGE_SIZE] = 0  # old kernel: touch one byte per page, vectorised
        self._mm = mm
        self._arr = arr
        self.capacity = size
        self.allocations += 1
        return True

    @property
    def address(self) -> int:
        return int(self._arr.ctypes.data)

    def pages(self, first: int, count: int) -> npt.NDArray[np.uint8]:
        """Rows `[first, first + count)` of the buffer as a `(count, PAGE_SIZE)` view."""
        return self._arr[first * PAGE_SIZE : (first + count) * PAGE_SIZE].reshape(count, PAGE_SIZE)

    def close(self) -> None:
        self._arr = np.zeros(0, dtype=np.uint8)
        if self._mm is not None:
            # Views of it may still be alive (results of an earlier capture): then the
            # memory goes away with the last of them.
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None
        self.capacity = 0


@dataclass(frozen=True)
class ReadStats:
    readv_calls: int
    fallback_bytes: int
    unreadable: PageNumbers  # page numbers neither path could read (sorted)


class MemoryReader:
    """Reads runs of another process's pages into local memory."""

    def __init__(self, pid: int, readv: ReadvFn = _sys_readv) -> None:
        self.pid = pid
        self._readv = readv  # injectable so tests can make process_vm_readv fail
        self._mem_fd = -1

    def close(self) -> None:
        if self._mem_fd >= 0:
            os.close(self._mem_fd)
            self._mem_fd = -1

    def read_runs(self, remote: npt.NDArray[np.uint64], dest: int) -> ReadStats:
        """Copy remote runs `(n, 2)` [address, length] back to back into local memory at
        `dest`. Runs are page-aligned and page-sized multiples."""
        if remote.shape[0] == 0:
            return ReadStats(0, 0, empty_pages())
        remote = np.ascontiguousarray(remote, dtype=np.uint64)
        # Where each run lands locally: runs are packed back to back.
        local = np.empty_like(remote)
        local[:, 0] = ends(remote)[:-1] + np.uint64(dest)
        local[:, 1] = remote[:, 1]
        return self.read_iov(remote, local)

    def read_iov(self, remote: npt.NDArray[np.uint64], local: npt.NDArray[np.uint64]) -> ReadStats:
        """Copy each remote run `(n, 2)` [address, length] to the local run in the same
        row (same lengths; page-aligned, page-sized multiples)."""
        if remote.shape[0] == 0:
            return ReadStats(0, 0, empty_pages())
        remote = np.ascontiguousarray(remote, dtype=np.uint64)
        local = np.ascontiguousarray(local, dtype=np.uint64)
        fallback = 0
        bad: list[PageNumbers] = []

        def short(j: int, into: int) -> None:
            # Partial: the rest of the run it stopped in goes through /proc/PID/mem.
            nonlocal fallback
            addr = int(remote[j, 0]) + into
            fb, unread = self._fallback(addr, int(remote[j, 1]) - into, int(local[j, 0]) + into)
            fallback += fb
            if unread.size:
                bad.append(unread)

        calls = transfer(self._readv, self.pid, remote, local, READ, short)
        unreadable = np.concatenate(bad) if bad else empty_pages()
        return ReadStats(calls, fallback, unreadable)

    def _mem(self) -> int:
        if self._mem_fd < 0:
            self._mem_fd = READ.open_mem(self.pid)
        return self._mem_fd

    def _fallback(self, addr: int, length: int, dest: int) -> tuple[int, PageNumbers]:
        """Read `[addr, addr + length)` through /proc/PID/mem. Returns bytes read and the
        page numbers that could not be read (skipped one page at a time: this loop runs
        only over pages that already failed, e.g. a device mapping)."""
        fd = self._mem()
        done = 0
        unread: list[int] = []
        while done < length:
            buf = (ctypes.c_char * (length - done)).from_address(dest + done)
            try:
                got = os.preadv(fd, [buf], addr + done)
            except OSError as e:
                if e.errno == errno.ESRCH:
                    raise ProcessExited(self.pid, "capture") from None
                if e.errno not in (errno.EIO, errno.EFAULT, errno.EINVAL):
                    raise ReadFailed(self.pid, f"0x{addr + done:x}", e.strerror) from None
                got = 0
            # /proc/PID/mem copies whole pages; keep page granularity regardless.
            got -= got % PAGE_SIZE
            if got == 0:
                if not unread and not alive(self.pid):
                    # /proc/PID/mem reads 0 bytes once the mm is gone.
                    raise ProcessExited(self.pid, "capture")
                unread.append((addr + done) >> PAGE_SHIFT)
                ctypes.memset(dest + done, 0, PAGE_SIZE)
                done += PAGE_SIZE
                continue
            done += got
        if unread:
            log.warning(
                "pages unreadable by process_vm_readv and /proc/PID/mem",
                extra={"fields": {"pid": self.pid, "address": f"0x{addr:x}", "pages": len(unread)}},
            )
        return done - len(unread) * PAGE_SIZE, np.array(unread, dtype=np.uint64)
