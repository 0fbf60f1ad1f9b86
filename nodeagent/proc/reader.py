"""Copying another process's pages into our memory (the staging buffer, `staging`).

Owns: reading pages without changing the target (docs/decisions.md, "Reading"):
- pages of object-backed shared mappings come from the object (nodeagent/proc/shared.py);
- a page the pagemap marks exclusively mapped (bit 56) is read with `process_vm_readv`
  (iovec arrays built in bulk from NumPy, one remote iovec per run, batched by
  nodeagent/proc/iovec.py);
- every other page (copy-on-write shared with a fork, KSM, the zero page, swapped,
  device memory) through `/proc/PID/mem`, which takes plain page references:
  `process_vm_readv` *pins* what it reads, and pinning an anonymous page that is not
  exclusive makes the kernel unshare it (a fork's 1 GiB would become 2 GiB);
- what `process_vm_readv` refuses (VM_IO/VM_PFNMAP, a page that faults) goes through
  `/proc/PID/mem` too. A page no path can read is reported back, never invented.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cpcoord.errors import ProcessExited, ReadFailed
from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE
from nodeagent.pages import PageNumbers, empty_pages, pages_from_runs
from nodeagent.proc.iovec import READ, VmFn, alive, transfer, vm_syscall
from nodeagent.proc.pagemap import PM_EXCLUSIVE, PM_PRESENT, PagemapReader
from nodeagent.proc.procfs import Mapping
from nodeagent.proc.shared import SharedObjects
from nodeagent.proc.staging import COPY_PIECE, COPY_THREADS, PARALLEL_MIN, copy_threads

log = logging.getLogger(__name__)


ReadvFn = VmFn
sys_readv: ReadvFn = vm_syscall("process_vm_readv")


# An exclusive stretch shorter than this between two pages read through /proc/PID/mem is
# read with them: one more /proc/PID/mem call costs more than reading a few exclusive
# pages the slower way (harmless: /proc/PID/mem never unshares), and it bounds the calls
# to one per MEM_ABSORB + 1 pages whatever the pattern of sharing.
MEM_ABSORB = 16


@dataclass(frozen=True)
class ReadStats:
    readv_calls: int
    fallback_bytes: int  # through /proc/PID/mem after process_vm_readv refused them
    unreadable: PageNumbers  # page numbers no path could read (sorted)
    shared_bytes: int = 0  # through /proc/PID/mem: not exclusively mapped
    object_bytes: int = 0  # from the objects behind shared mappings


class MemoryReader:
    """Reads pages of another process into local memory (module docstring).

    `objects` and `maps`: the member's shared objects as the capture's selection opened
    them, and its maps; pages of object-backed mappings are then read from the object.
    Without them every page is read through the member's address space.
    """

    def __init__(
        self,
        pid: int,
        readv: ReadvFn = sys_readv,
        *,
        objects: SharedObjects | None = None,
        maps: Sequence[Mapping] = (),
    ) -> None:
        self.pid = pid
        self._readv = readv  # injectable so tests can make process_vm_readv fail
        self._mem_fd = -1
        self._mem_lock = threading.Lock()  # the copy may run on several threads
        self._pm: PagemapReader | None = None
        self._objects = objects
        self._maps = maps

    def close(self) -> None:
        if self._mem_fd >= 0:
            os.close(self._mem_fd)
            self._mem_fd = -1
        if self._pm is not None:
            self._pm.close()
            self._pm = None

    def read_runs(self, remote: npt.NDArray[np.uint64], dest: int) -> ReadStats:
        """Copy remote runs `(n, 2)` [address, length] (page-aligned, whole pages) back
        to back into local memory at `dest`."""
        r = np.asarray(remote, dtype=np.uint64).reshape(-1, 2) >> np.uint64(PAGE_SHIFT)
        return self.read_pages(pages_from_runs(r), dest)

    def read_pages(
        self, pages: PageNumbers, dest: int, rows: npt.NDArray[np.uint64] | None = None
    ) -> ReadStats:
        """Copy sorted, unique pages into local memory at `dest`: page `pages[i]` to row
        `i`, or to row `rows[i]` (rows of PAGE_SIZE from `dest`; with dest 0, the local
        page numbers: capture in place). Call while the target is frozen: which pages are
        exclusive is read here, right before the copy (a fork before the freeze shares
        everything)."""
        n = int(pages.size)
        if n == 0:
            return ReadStats(0, 0, empty_pages())
        pages = np.ascontiguousarray(pages, dtype=np.uint64)
        rows = np.arange(n, dtype=np.uint64) if rows is None else np.asarray(rows, np.uint64)
        bad: list[PageNumbers] = []
        in_obj, object_bytes = self._read_objects(pages, rows, dest, bad)
        if in_obj is not None:
            pages, rows = pages[~in_obj], rows[~in_obj]
        words = self._pagemap().words_of(pages) if pages.size else np.zeros(0, np.uint64)
        via_mem = ((words & PM_EXCLUSIVE) == 0) | ((words & PM_PRESENT) == 0)
        _absorb(pages, via_mem)
        remote, local = _runs(pages[~via_mem], rows[~via_mem], dest)
        calls, fallback = self._readv_all(remote, local, bad)
        shared = 0
        mremote, mlocal = _runs(pages[via_mem], rows[via_mem], dest)
        for (addr, length), (at, _) in zip(mremote.tolist(), mlocal.tolist(), strict=True):
            got, unread = self._fallback(addr, length, at)
            shared += got
            if unread.size:
                bad.append(unread)
        unreadable = np.sort(np.concatenate(bad)) if bad else empty_pages()
        return ReadStats(calls, fallback, unreadable, shared, object_bytes)

    def _readv_all(
        self,
        remote: npt.NDArray[np.uint64],
        local: npt.NDArray[np.uint64],
        bad: list[PageNumbers],
    ) -> tuple[int, int]:
        """process_vm_readv of every run; a big copy in a few shares on as many threads
        (one thread copies ~5 GB/s here, two ~9: the frozen window halves). Returns the
        calls made and the bytes the fallback read."""

        def one(rem: npt.NDArray[np.uint64], loc: npt.NDArray[np.uint64]) -> tuple[int, int]:
            fallback = 0

            def short(j: int, into: int) -> None:
                # Partial: the rest of the run it stopped in goes through /proc/PID/mem.
                nonlocal fallback
                addr = int(rem[j, 0]) + into
                fb, unread = self._fallback(addr, int(rem[j, 1]) - into, int(loc[j, 0]) + into)
                fallback += fb
                if unread.size:
                    bad.append(unread)  # (list.append is atomic)

            return transfer(self._readv, self.pid, rem, loc, READ, short), fallback

        if remote.shape[0] == 0:
            return 0, 0
        shares = _shares(remote, local, COPY_THREADS)
        if len(shares) == 1:
            return one(*shares[0])
        pool = copy_threads()
        done = [f.result() for f in [pool.submit(one, *sh) for sh in shares]]
        return sum(c for c, _ in done), sum(f for _, f in done)

    def _read_objects(
        self, pages: PageNumbers, rows: npt.NDArray[np.uint64], dest: int, bad: list[PageNumbers]
    ) -> tuple[npt.NDArray[np.bool_] | None, int]:
        """Read the pages that lie in object-backed mappings from their objects; returns
        which pages those were (None: none) and the bytes read."""
        if self._objects is None or not self._maps:
            return None, 0
        lo, hi, chosen = self._objects.bounds(self._maps)
        if lo.size == 0:
            return None, 0
        k = np.searchsorted(lo, pages, side="right").astype(np.int64) - 1
        inside = (k >= 0) & (pages < hi[np.maximum(k, 0)])
        if not inside.any():
            return None, 0
        idx = np.flatnonzero(inside)
        p, kk, rr = pages[idx], k[idx], rows[idx]
        # Runs of consecutive pages in one mapping and consecutive rows.
        brk = np.flatnonzero((np.diff(p) != 1) | (np.diff(kk) != 0) | (np.diff(rr) != 1)) + 1
        first = np.concatenate(([0], brk)).tolist()
        last = np.concatenate((brk, [p.size])).tolist()
        total = 0
        for a, b in zip(first, last, strict=True):  # one read per run, not per page
            length = (b - a) * PAGE_SIZE
            unread = self._objects.read(
                chosen[int(kk[a])], int(p[a]) << PAGE_SHIFT, length, dest + int(rr[a]) * PAGE_SIZE
            )
            total += length - int(unread.size) * PAGE_SIZE
            if unread.size:
                bad.append(unread)
        return inside, total

    def _pagemap(self) -> PagemapReader:
        if self._pm is None:
            self._pm = PagemapReader(self.pid)
        return self._pm

    def _mem(self) -> int:
        with self._mem_lock:
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


def _absorb(pages: PageNumbers, via_mem: npt.NDArray[np.bool_]) -> None:
    """Mark exclusive stretches shorter than MEM_ABSORB that lie between two pages read
    through /proc/PID/mem (in one run of consecutive pages) to be read with them."""
    if pages.size < 3 or not via_mem.any() or via_mem.all():
        return
    brk = np.flatnonzero((np.diff(pages) != 1) | (np.diff(via_mem) != 0)) + 1
    s0 = np.concatenate(([0], brk))
    s1 = np.concatenate((brk, [pages.size]))
    # Touching the previous / next stretch (same run of pages): then that one is of the
    # other kind, since a stretch ends where the kind changes or the run does.
    touch = pages[s0[1:]] == pages[s1[:-1] - 1] + np.uint64(1)
    before = np.concatenate(([False], touch))
    after = np.concatenate((touch, [False]))
    absorb = ~via_mem[s0] & (s1 - s0 < MEM_ABSORB) & before & after
    if absorb.any():
        via_mem |= np.repeat(absorb, s1 - s0)


def _shares(
    remote: npt.NDArray[np.uint64], local: npt.NDArray[np.uint64], workers: int
) -> list[tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]]:
    """The iovec pairs cut into `workers` contiguous shares of about equal bytes (one
    share when the copy is small)."""
    total = int(remote[:, 1].sum())
    if workers <= 1 or total < PARALLEL_MIN:
        return [(remote, local)]
    piece = np.uint64(COPY_PIECE)
    n = ((remote[:, 1] + piece - np.uint64(1)) // piece).astype(np.int64)
    if (n > 1).any():
        idx = np.repeat(np.arange(remote.shape[0]), n)
        # Each piece's offset in its run: its rank among the pieces of that run.
        k = np.arange(idx.size) - np.repeat(np.cumsum(n) - n, n)
        off = k.astype(np.uint64) * piece
        length = np.minimum(piece, remote[idx, 1] - off)
        remote = np.stack((remote[idx, 0] + off, length), axis=1)
        local = np.stack((local[idx, 0] + off, length), axis=1)
    ends = np.cumsum(remote[:, 1])
    cuts = np.searchsorted(ends, [total * i // workers for i in range(1, workers)], side="left")
    bounds = [0, *sorted({int(c) + 1 for c in cuts}), remote.shape[0]]
    return [
        (np.ascontiguousarray(remote[a:b]), np.ascontiguousarray(local[a:b]))
        for a, b in itertools.pairwise(bounds)
        if b > a
    ]


def _runs(
    pages: PageNumbers, rows: npt.NDArray[np.uint64], dest: int
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Remote and local iovecs `(n, 2)` [address, length] of the runs of consecutive
    pages (whose rows are then consecutive too)."""
    if pages.size == 0:
        z = np.zeros((0, 2), dtype=np.uint64)
        return z, z.copy()
    brk = np.flatnonzero((np.diff(pages) != 1) | (np.diff(rows) != 1)) + 1
    first = np.concatenate(([0], brk))
    count = np.diff(np.concatenate((first, [pages.size]))).astype(np.uint64)
    shift = np.uint64(PAGE_SHIFT)
    remote = np.empty((first.size, 2), dtype=np.uint64)
    remote[:, 0] = pages[first] << shift
    remote[:, 1] = count << shift
    local = np.empty_like(remote)
    local[:, 0] = (rows[first] << shift) + np.uint64(dest)
    local[:, 1] = remote[:, 1]
    return remote, local
