"""Shared memory, read from its backing object instead of through the member's page tables.

Owns: which mappings are *object-backed* (a shared mapping whose object is a regular file:
shared anonymous memory `/dev/zero (deleted)`, memfd, SysV shm, tmpfs and hugetlbfs files,
files on disk, deleted or not), how many of a mapping's pages the object holds (pages at or
beyond its end do not exist), and reading runs of such mappings with large `preadv` calls
on `/proc/PID/map_files/<start>-<end>` at the mapping's file offset.

Why (docs/decisions.md, "Shared memory"): the page tables of one process say nothing about
a shared object. A page can hold data without being mapped in the member (written by
another process, filled with write(), never touched, or dropped by MADV_DONTNEED), so the
page rule (present or swapped) would leave it out and restore would lose it. Every page of
the mapping that lies inside the object is taken instead. A hole reads as zeros (shmem,
hugetlbfs and disk filesystems return zeros for holes without allocating), so it is
captured as a zero page and stays a hole: a read here never changes the object or the
member's memory (no page is faulted into its tables, nothing is pinned).

Opening map_files needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE. Without it a shared
mapping is read through the page tables as before (present pages only); restore then
leaves its other pages alone (restore_plan.py: a page never captured is never written).
Files under /proc and /sys are never read here (a read there is not the mapped memory).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from cpcoord.closing import Closing
from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE
from nodeagent.pages import PageNumbers
from nodeagent.proc import owners
from nodeagent.proc.procfs import Mapping

log = logging.getLogger(__name__)

_NOT_OBJECTS = ("/proc/", "/sys/")
_SKIP = (errno.EIO, errno.EFAULT, errno.EINVAL, 133)  # 133: EHWPOISON
_warned_privilege = False


def may_be_object(m: Mapping) -> bool:
    """Whether `m` could be object-backed (shared, readable, not /proc or /sys). The
    object's type (a regular file) is checked when it is opened."""
    return m.shared and m.readable and not m.path.startswith(_NOT_OBJECTS)


class SharedObjects(Closing):
    """The objects behind a member's shared mappings, open for one capture.

    One fd per object (mappings of the same object share it), kept until `close`: what
    the selection decided (`end_page`) is what the copy reads. Not thread-safe.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fds: dict[tuple[str, int, str], int] = {}  # object -> fd (-1: not an object)
        self._ends: dict[tuple[int, int], int] = {}  # mapping (start, end) -> end page
        self._holes: dict[tuple[int, int], npt.NDArray[np.uint64]] = {}  # -> hole runs
        self.refused = False  # map_files not permitted: page tables only
        # Objects a sibling of its tree group stores (nodeagent/proc/owners.py).
        self._elsewhere = owners.elsewhere(pid)

    def close(self) -> None:
        for fd in self._fds.values():
            if fd >= 0:
                os.close(fd)
        self._fds.clear()
        self._ends.clear()
        self._holes.clear()

    def _fd(self, m: Mapping) -> int:
        # Same (dev, inode, path) = same object: SysV segments show their id as inode,
        # which may equal a shmem inode on the same device, so the path is in the key.
        key = (m.dev, m.inode, m.path)
        fd = self._fds.get(key)
        if fd is None:
            fd = self._open(m)
            self._fds[key] = fd
        return fd

    def _open(self, m: Mapping) -> int:
        if self.refused:
            return -1
        path = f"/proc/{self.pid}/map_files/{m.start:x}-{m.end:x}"
        fd = -1
        # O_NOATIME keeps a capture from touching a file's times; it is refused on files
        # of other users (EPERM), and map_files itself without the capability (EPERM).
        for flags in (os.O_NOATIME, 0):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
                break
            except PermissionError:
                continue
            except OSError:
                return -1  # gone (the process exited: the caller notices) or not a file
        else:
            self._refuse()
            return -1
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)  # a device: its memory is read through the page tables
            return -1
        return fd

    def _refuse(self) -> None:
        global _warned_privilege
        self.refused = True
        if not _warned_privilege:
            _warned_privilege = True
            log.warning(
                "shared mappings read through the page tables: /proc/PID/map_files needs "
                "CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE; their pages not mapped in the "
                "process are not captured (and restore leaves them alone)",
                extra={"fields": {"pid": self.pid}},
            )

    def end_page(self, m: Mapping) -> int:
        """For an object-backed mapping, the page number (absolute, in `[start, end]`)
        where the object ends inside it: pages before it are taken, pages from it on do
        not exist. -1 when `m` is read through the page tables instead."""
        got = self._ends.get((m.start, m.end))
        if got is not None:
            return got
        end = -1
        if self._elsewhere and owners.owner_of(self.pid, m):
            end = m.start >> PAGE_SHIFT  # stored by its owner: no page of it is taken here
        elif may_be_object(m):
            fd = self._fd(m)
            if fd >= 0:
                size = os.fstat(fd).st_size
                held = max(0, -(-(size - m.offset) // PAGE_SIZE))  # a partial last page counts
                end = min(m.end, m.start + held * PAGE_SIZE) >> PAGE_SHIFT
        self._ends[(m.start, m.end)] = end
        return end

    def bounds(
        self, maps: Sequence[Mapping]
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], list[Mapping]]:
        """Sorted `[first page, end page)` of the object-backed mappings among `maps` that
        `end_page` was asked about (the selection decided which those are), and them."""
        chosen = sorted(
            (m for m in maps if self._ends.get((m.start, m.end), -1) >= 0), key=lambda m: m.start
        )
        lo = np.array([m.start >> PAGE_SHIFT for m in chosen], dtype=np.uint64)
        hi = np.array([self._ends[(m.start, m.end)] for m in chosen], dtype=np.uint64)
        return lo, hi, chosen

    def holes(self, m: Mapping) -> npt.NDArray[np.uint64]:
        """Runs `(n, 2)` [first page, end page) (absolute) of the object-backed mapping
        `m` where the object has a hole (SEEK_DATA/SEEK_HOLE, one step per extent): they
        read as zeros and are captured as zero pages without being read or staged."""
        key = (m.start, m.end)
        got = self._holes.get(key)
        if got is not None:
            return got
        end = self.end_page(m)
        fd = self._fd(m) if end >= 0 else -1
        out: list[tuple[int, int]] = []
        if fd >= 0:
            first = m.start >> PAGE_SHIFT
            pos, stop = m.offset, m.offset + (end - first) * PAGE_SIZE

            def page(off: int) -> int:
                return first + (off - m.offset) // PAGE_SIZE

            try:
                while pos < stop:
                    try:
                        data = os.lseek(fd, pos, os.SEEK_DATA)
                    except OSError as e:
                        if e.errno != errno.ENXIO:  # ENXIO: only a hole is left
                            raise
                        data = stop
                    # Whole pages only: a page partly data is read.
                    lo, hi = page(pos + PAGE_SIZE - 1), page(min(data, stop))
                    if hi > lo:
                        out.append((lo, hi))
                    if data >= stop:
                        break
                    pos = os.lseek(fd, data, os.SEEK_HOLE)
            except OSError:
                out = []  # no SEEK_DATA here: everything is read (holes read as zeros)
        runs = np.array(out, dtype=np.uint64).reshape(-1, 2)
        self._holes[key] = runs
        return runs

    def hole_pages(self, maps: Sequence[Mapping], pages: PageNumbers) -> int:
        """How many of the sorted `pages` lie in holes of the object-backed mappings
        among `maps` (those the selection asked about): pages that need no staging."""
        chosen = self.bounds(maps)[2]
        if not chosen or pages.size == 0:
            return 0
        runs = [self.holes(m) for m in chosen]
        h = np.concatenate(runs) if runs else np.zeros((0, 2), dtype=np.uint64)
        if h.shape[0] == 0:
            return 0
        a = np.searchsorted(pages, h[:, 0], side="left")
        b = np.searchsorted(pages, h[:, 1], side="left")
        return int((b - a).sum())

    def read(self, m: Mapping, addr: int, length: int, dest: int) -> npt.NDArray[np.uint64]:
        """Read `[addr, addr + length)` (page multiples) of mapping `m` from its object
        into private anonymous memory at `dest` (a Staging): holes are not read, their
        rows are dropped (MADV_DONTNEED: they read as zeros and hold no memory), data in
        large reads. Returns the page numbers that could not be read (zeroed)."""
        first, last = addr >> PAGE_SHIFT, (addr + length) >> PAGE_SHIFT
        h = self.holes(m)
        h = h[(h[:, 1] > first) & (h[:, 0] < last)]
        cuts = np.clip(h, first, last).astype(np.int64)
        bad: list[npt.NDArray[np.uint64]] = []
        at = first
        for lo, hi in cuts.tolist():  # one step per hole
            if lo > at:
                bad.append(self._read_data(m, at, lo, dest + (at - first) * PAGE_SIZE))
            _zero(dest + (lo - first) * PAGE_SIZE, (hi - lo) * PAGE_SIZE)
            at = hi
        if last > at:
            bad.append(self._read_data(m, at, last, dest + (at - first) * PAGE_SIZE))
        return np.concatenate(bad) if bad else np.zeros(0, dtype=np.uint64)

    def _read_data(self, m: Mapping, first: int, last: int, dest: int) -> npt.NDArray[np.uint64]:
        addr, length = first << PAGE_SHIFT, (last - first) * PAGE_SIZE
        """Pages `[first, last)` in large reads. Returns the page numbers that could not
        be read, zeroed at `dest`: past the object's end (it shrank since the selection)
        or a page the kernel refuses (hardware poison: skipped one page at a time, this
        loop only runs over pages that failed)."""
        fd = self._fd(m)
        unread: list[npt.NDArray[np.uint64]] = []
        off = m.offset + (addr - m.start)
        done = 0
        while done < length:
            buf = (ctypes.c_char * (length - done)).from_address(dest + done)
            try:
                got = os.preadv(fd, [buf], off + done) if fd >= 0 else 0
            except OSError as e:
                if e.errno not in _SKIP:
                    raise
                got = -1
            if got > 0:
                done += got
                continue
            tail = done % PAGE_SIZE
            if got == 0 and tail:
                # The object ends inside this page: the rest of it reads as zeros.
                ctypes.memset(dest + done, 0, PAGE_SIZE - tail)
                done += PAGE_SIZE - tail
                continue
            done -= tail
            if got == 0:  # the end of the object: nothing after it exists
                first = (addr + done) >> PAGE_SHIFT
                unread.append(np.arange(first, (addr + length) >> PAGE_SHIFT, dtype=np.uint64))
                ctypes.memset(dest + done, 0, length - done)
                break
            unread.append(np.array([(addr + done) >> PAGE_SHIFT], dtype=np.uint64))
            ctypes.memset(dest + done, 0, PAGE_SIZE)
            done += PAGE_SIZE
        if not unread:
            return np.zeros(0, dtype=np.uint64)
        bad = np.concatenate(unread)
        log.warning(
            "pages of a shared object unreadable",
            extra={"fields": {"pid": self.pid, "address": f"0x{addr:x}", "pages": int(bad.size)}},
        )
        return bad


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_DONTNEED = 4


def _zero(addr: int, n: int) -> None:
    """Zero `n` bytes (whole pages) of private anonymous memory: dropped, so they read
    as the zero page and hold no memory; written with zeros where that fails."""
    if n and _libc.madvise(addr, n, MADV_DONTNEED) != 0:
        ctypes.memset(addr, 0, n)
