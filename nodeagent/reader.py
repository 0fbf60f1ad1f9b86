"""Copying another process's pages into our memory: staging buffer and batched reads.

Owns: the staging buffer (page-aligned anonymous memory, transparent huge pages asked
for, prefaulted *before* the target is frozen so the copy never takes first-touch faults
on our side), `process_vm_readv` through ctypes with iovec arrays built in bulk from
NumPy (one remote iovec per run of pages, at most IOV_MAX per call), and the fallback to
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cpcoord.errors import PermissionDenied, ProcessExited, ReadFailed
from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE
from nodeagent.pagemap import PageNumbers, empty_pages

log = logging.getLogger(__name__)

IOV_MAX = 1024
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux >= 5.14; faults pages in writable without touching them
HUGE = 2 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_readv = _libc.process_vm_readv
_readv.argtypes = [
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_readv.restype = ctypes.c_ssize_t

# (pid, local iovecs ptr, nlocal, remote iovecs ptr, nremote) -> bytes or -1 (errno set).
ReadvFn = Callable[[int, int, int, int, int], int]


def _sys_readv(pid: int, local: int, nlocal: int, remote: int, nremote: int) -> int:
    return int(_readv(pid, local, nlocal, remote, nremote, 0))


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
        n = remote.shape[0]
        if n == 0:
            return ReadStats(0, 0, empty_pages())
        remote = np.ascontiguousarray(remote, dtype=np.uint64)
        lens = remote[:, 1]
        # Where each run lands locally: runs are packed back to back.
        offsets = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(lens, out=offsets[1:])
        local = np.empty_like(remote)
        local[:, 0] = offsets[:-1] + np.uint64(dest)
        local[:, 1] = lens
        calls = 0
        fallback = 0
        bad: list[PageNumbers] = []
        i = 0
        while i < n:
            k = min(IOV_MAX, n - i)
            want = int(offsets[i + k] - offsets[i])
            got = self._readv(self.pid, local[i:].ctypes.data, k, remote[i:].ctypes.data, k)
            calls += 1
            if got == want:
                i += k
                continue
            if got < 0:
                err = ctypes.get_errno()
                if err == errno.ESRCH:
                    raise ProcessExited(self.pid, "capture")
                if err == errno.EPERM:
                    raise PermissionDenied("read memory of", self.pid, os.strerror(err))
                if err not in (errno.EFAULT, errno.EIO):
                    raise ReadFailed(self.pid, f"0x{int(remote[i, 0]):x}", os.strerror(err))
                got = 0
            # Partial: find the run it stopped in and how far into it (page granular).
            stop = int(offsets[i]) + got
            j = int(np.searchsorted(offsets, stop, side="right")) - 1
            into = stop - int(offsets[j])
            addr = int(remote[j, 0]) + into
            length = int(remote[j, 1]) - into
            fb, unread = self._fallback(addr, length, int(local[j, 0]) + into)
            fallback += fb
            if unread.size:
                bad.append(unread)
            i = j + 1
        unreadable = np.concatenate(bad) if bad else empty_pages()
        return ReadStats(calls, fallback, unreadable)

    def _mem(self) -> int:
        if self._mem_fd < 0:
            try:
                self._mem_fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            except (FileNotFoundError, ProcessLookupError):
                raise ProcessExited(self.pid, "capture") from None
            except PermissionError as e:
                raise PermissionDenied("read memory of", self.pid, e.strerror) from None
        return self._mem_fd

    def _alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            return False
        return state not in (b"Z", b"X")

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
                if not unread and not self._alive():
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
