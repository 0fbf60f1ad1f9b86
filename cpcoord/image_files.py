"""Region files filled in place: a capture copies straight into an image's `.raw` files.

On a memory-backed filesystem (tmpfs) a file's page cache *is* its storage, so the copy
out of the target can land in the image itself: no staging buffer, no second copy, half
the memory. For each region this module creates `<member>/<region>.raw` at its final size
(sparse), and before the target is frozen allocates the pages the capture will copy and
maps them; the capture copies into the mapping while frozen; afterwards the pages that
are zero, unreadable or no longer taken are punched back into holes (`finish`), so the
file is exactly what cpcoord/image_writer.py would have written.

Why this sequence (measured on 6.18, 1 GiB, CPU time): `pwrite` of zeros allocates the
pages (~0.35 s, what a plain write of the image costs), and MADV_POPULATE_READ maps them
with fault-around, 16 pages a fault (~0.08 s). `fallocate` + MADV_POPULATE_WRITE costs
the same (a fault per page; fallocated pages are not up to date, fault-around skips
them); the two run side by side on two threads for big fills (`_fill`), pwrite to one
file being serialised by its inode lock. A tmpfs mapping has no write notification, so
the entries fault-around installs are writable: the copy takes no fault (the CPU sets
the dirty bit), which keeps first-touch faults out of the frozen window. The copy itself
runs as fast as into anonymous huge pages. Other filesystems keep the staging buffer: a
shared mapping of a disk file costs a page_mkwrite per page.

Nothing here imports nodeagent: regions arrive as (name, start, end) and pages as NumPy
arrays of page numbers (nodeagent.capture.process.Destination is the protocol this fulfils).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cpcoord.errors import OutputNotWritable
from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE

log = logging.getLogger(__name__)

TMPFS_MAGIC = 0x01021994
MADV_POPULATE_READ = 22  # Linux >= 5.14
MADV_POPULATE_WRITE = 23
# A fill at least this big runs on two threads, FAULT_SHARE of it faulted in (writable)
# by the second while the first writes zeros: ~20% less wall time where a CPU is free,
# ~40% more CPU in all (the two contend for the file's page cache).
PARALLEL_FILL_MIN = 64 << 20
FAULT_SHARE = 0.4
_ZERO_CHUNK = 1 << 20
_ZERO_IOVS = 256  # 256 MiB of zeros a pwritev (below Linux's 2 GiB cap per call)
_FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]

Pages = npt.NDArray[np.uint64]


def memory_backed(path: Path) -> bool:
    """Whether `path` lies on tmpfs (where writing in place pays; see the module doc)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type is its first word
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value == TMPFS_MAGIC


def _runs(offsets: Pages) -> npt.NDArray[np.int64]:
    """Sorted unique page offsets -> `(n, 2)` [first, count] as int64."""
    p = offsets.astype(np.int64, copy=False)
    if p.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    brk = np.flatnonzero(np.diff(p) != 1) + 1
    lo = np.concatenate(([0], brk))
    hi = np.concatenate((brk, [p.size]))
    return np.stack((p[lo], hi - lo), axis=1)


def _missing(have: Pages, want: Pages) -> Pages:
    """The elements of `want` not in `have` (both sorted unique), vectorised."""
    if have.size == 0 or want.size == 0:
        return want
    if have.size == want.size and np.array_equal(have, want):
        return want[:0]  # the usual case while frozen: the cut took what the pre-pass saw
    idx = np.minimum(np.searchsorted(have, want), have.size - 1)
    return want[have[idx] != want]


@dataclass
class _File:
    path: Path
    fd: int
    start: int
    end: int
    mm: mmap.mmap
    rows: npt.NDArray[np.uint8]  # (pages, PAGE_SIZE) view of the whole mapping
    filled: Pages  # page offsets allocated and mapped, sorted


class RegionFiles:
    """The in-place `.raw` files of one member of the image at `out` (`out/<member>/`).

    `created(path)` is told of every file made (the image writer removes them on abort
    and fsyncs them on commit). Not thread-safe; one capture at a time.
    """

    def __init__(self, out: Path, member: str, created: Callable[[Path], None]) -> None:
        self.out = out
        self.directory = out / member
        self._created = created
        self._files: dict[str, _File] = {}
        self._zero = memoryview(bytes(_ZERO_CHUNK))  # the source of every zero written

    # -- before and during the freeze (nodeagent.capture.process.Destination) -------------------

    def reserve(self, regions: Sequence[tuple[str, int, int]], pages: Sequence[Pages]) -> int:
        """Make every page of `pages[i]` (page numbers) of region `regions[i]` = (name,
        start, end) writable in its file's mapping without a fault. Returns how many
        pages had to be allocated. A region whose bounds changed starts over.
        OutputNotWritable when the filesystem refuses (full, read-only)."""
        try:
            return self._reserve(regions, pages)
        except OSError as e:
            raise OutputNotWritable(self.out, e.strerror or str(e)) from None

    def _reserve(self, regions: Sequence[tuple[str, int, int]], pages: Sequence[Pages]) -> int:
        added = 0
        for (name, start, end), p in zip(regions, pages, strict=True):
            f = self._files.get(name)
            if f is not None and (f.start, f.end) != (start, end):
                self._reset(f, start, end)
            elif f is None:
                f = self._open(name, start, end)
            offs = np.asarray(p, dtype=np.uint64) - np.uint64(start >> PAGE_SHIFT)
            new = _missing(f.filled, offs)
            if new.size:
                self._fill(f, new)
                f.filled = np.sort(np.concatenate((f.filled, new))) if f.filled.size else new
                added += int(new.size)
        return added

    def address(self, name: str) -> int:
        """Where page offset 0 of region `name` is mapped."""
        return int(self._files[name].rows.ctypes.data)

    def rows(self, name: str) -> npt.NDArray[np.uint8]:
        """The region's file as `(pages, PAGE_SIZE)` rows, indexed by page offset."""
        return self._files[name].rows

    # -- after the thaw ------------------------------------------------------------------

    def finish(self, name: str, keep: Pages) -> Path:
        """Punch every allocated page of region `name` that is not in `keep` (sorted page
        offsets: the non-zero pages stored) back into a hole; returns the file's path."""
        f = self._files[name]
        punch = _missing(np.asarray(keep, dtype=np.uint64), f.filled)
        for first, count in _runs(punch).tolist():
            if _libc.fallocate(f.fd, _FALLOC_PUNCH, first * PAGE_SIZE, count * PAGE_SIZE):
                raise OutputNotWritable(self.out, os.strerror(ctypes.get_errno()))
        f.filled = np.asarray(keep, dtype=np.uint64)
        return f.path

    def names(self) -> list[str]:
        return list(self._files)

    def discard(self, name: str) -> None:
        """Remove a region's file (it was prepared, but the region is not in the image)."""
        f = self._files.pop(name)
        self._unmap(f)
        with contextlib.suppress(FileNotFoundError):
            f.path.unlink()

    def close(self) -> None:
        """Unmap and close every file (they stay on disk)."""
        for f in self._files.values():
            self._unmap(f)
        self._files.clear()

    # -- internals -----------------------------------------------------------------------

    def _open(self, name: str, start: int, end: int) -> _File:
        path = self.directory / f"{name}.raw"
        self.directory.mkdir(exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._created(path)
        try:
            f = _File(path, fd, start, end, *self._map(fd, end - start), np.zeros(0, np.uint64))
        except BaseException:
            os.close(fd)
            raise
        self._files[name] = f
        return f

    @staticmethod
    def _map(fd: int, size: int) -> tuple[mmap.mmap, npt.NDArray[np.uint8]]:
        os.ftruncate(fd, size)  # holes everywhere
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        rows = np.frombuffer(mm, dtype=np.uint8).reshape(size // PAGE_SIZE, PAGE_SIZE)
        return mm, rows

    def _reset(self, f: _File, start: int, end: int) -> None:
        self._unmap(f, close_fd=False)
        os.ftruncate(f.fd, 0)  # drops the pages filled for the old bounds
        f.mm, f.rows = self._map(f.fd, end - start)
        f.start, f.end, f.filled = start, end, np.zeros(0, np.uint64)

    def _fill(self, f: _File, offsets: Pages) -> None:
        """Allocate and map the pages at `offsets`: most by pwrite of zeros then populate
        (read), the tail of a big fill at once on a second thread by populate (write),
        which takes no inode lock (pwrite to one file is serialised)."""
        runs = _runs(offsets)
        total = int(runs[:, 1].sum()) if runs.size else 0
        if total * PAGE_SIZE < PARALLEL_FILL_MIN or (os.cpu_count() or 1) < 2:
            self._write_and_map(f, runs)
            return
        cut = int(total * (1 - FAULT_SHARE))
        ends = np.cumsum(runs[:, 1])
        i = int(np.searchsorted(ends, cut, side="left"))
        into = cut - int(ends[i] - runs[i, 1])  # pages of run i that go first
        head = np.concatenate((runs[:i], [[runs[i, 0], into]])) if into else runs[:i]
        tail = np.concatenate(([[runs[i, 0] + into, runs[i, 1] - into]], runs[i + 1 :]))
        with ThreadPoolExecutor(1) as pool:
            faulted = pool.submit(self._map_writable, f, tail)
            self._write_and_map(f, head)
            faulted.result()

    def _write_and_map(self, f: _File, runs: npt.NDArray[np.int64]) -> None:
        base = int(f.rows.ctypes.data)
        for first, count in runs.tolist():
            pos, end = first * PAGE_SIZE, (first + count) * PAGE_SIZE
            while pos < end:
                n = min(end - pos, _ZERO_CHUNK * _ZERO_IOVS)
                whole, part = divmod(n, _ZERO_CHUNK)
                iov = [self._zero] * whole + ([self._zero[:part]] if part else [])
                pos += os.pwritev(f.fd, iov, pos)
            self._madvise(f, base + first * PAGE_SIZE, count * PAGE_SIZE, MADV_POPULATE_READ)

    def _map_writable(self, f: _File, runs: npt.NDArray[np.int64]) -> None:
        base = int(f.rows.ctypes.data)
        for first, count in runs.tolist():
            self._madvise(f, base + first * PAGE_SIZE, count * PAGE_SIZE, MADV_POPULATE_WRITE)

    @staticmethod
    def _madvise(f: _File, addr: int, size: int, advice: int) -> None:
        if _libc.madvise(addr, size, advice):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(f.path))

    @staticmethod
    def _unmap(f: _File, close_fd: bool = True) -> None:
        f.rows = np.zeros((0, PAGE_SIZE), dtype=np.uint8)
        # Views handed out (capture results) may still hold the mapping: it then goes
        # away with the last of them.
        with contextlib.suppress(BufferError):
            f.mm.close()
        if close_fd and f.fd >= 0:
            os.close(f.fd)
            f.fd = -1
