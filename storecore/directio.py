"""Writing big objects with O_DIRECT: the local backend's bulk write path.

A buffered write() of a pack copies it into the page cache, and on this kind of machine
(a microVM, ext4 on virtio) that copy cost ~2 CPU seconds per GiB in the coordinator
(kernel `copy_folio_from_iter_atomic`, page allocation and ext4 delalloc), more than
hashing and compressing the same bytes. The data must reach the disk before the commit
anyway (fsync), so caching it buys nothing at ingest. `write_all` therefore copies the
block-aligned prefix of a big buffer into a reused, page-aligned bounce buffer (a warm
memcpy, ~10x cheaper) and writes it with O_DIRECT, then writes the short tail buffered.
(Sealing packs straight into page-aligned anonymous mappings, to skip the bounce copy,
cost more: a fresh mapping faults in every page, 0.65 vs 0.35 CPU s per GiB for seal +
put here.)
A pack laid out whole in a page-aligned arena (storecore/arena.py) is written with
O_DIRECT straight from there: no bounce copy at all. So are the leading parts of a pack
that are whole blocks where they lie (page-aligned address and length): a pack whose
blobs are views of an agent's staging (storecore/writer.py, borrowed blobs; pack version
3 keeps them page-aligned in the file) goes from the staging to the disk by DMA, with
no copy in the CPU; only its trailer (and whatever follows a compressed blob) passes
through the bounce buffer.
The caller still fsyncs: that flushes the tail and the file's metadata.

Where O_DIRECT is refused (tmpfs before Linux 6.6, some network filesystems: EINVAL on
fcntl or on the first write) it falls back to plain writes, silently: the result is the
same bytes, only slower.

A file in memory (tmpfs, ramfs: `in_memory`, a node cache) has no disk to spare a copy
to: every write is the kernel's one copy into its pages. There `write_parts(...,
gather=True)` hands the parts to writev as they are, with neither O_DIRECT nor the
bounce: a pack whose blobs are views of an agent's staging lands in the cache with that
one copy (storecore/writer.py, borrowed blobs).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from cpcoord.anonmem import huge_map

ALIGN = 4096  # covers 512- and 4096-byte logical blocks
DIRECT_MIN = 1 << 20  # smaller objects (index, manifests, config) stay buffered
BOUNCE = 8 << 20

_local = threading.local()
# statfs(2) f_type of file systems whose files are memory (linux/magic.h).
MEMORY_FS = frozenset({0x01021994, 0x858458F6})  # TMPFS_MAGIC, RAMFS_MAGIC
# statfs f_type of file systems whose reads cross a network (linux/magic.h and the file
# systems' own sources): NFS, SMB2, CIFS, CephFS, Lustre, GPFS, BeeGFS, AFS, 9p, FUSE
# (sshfs, s3fs and the like; a local FUSE file system is taken as remote too).
NETWORK_FS = frozenset({
    0x6969, 0xFE534D42, 0xFF534D42, 0x00C36400, 0x0BD00BD0, 0x47504653, 0x19830326,
    0x6B414653, 0x01021997, 0x65735546,
})  # fmt: skip
IOV_MAX = 1024
_B = TypeVar("_B", memoryview, list[memoryview])


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux: f_type first; the rest only sized generously.
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]


_libc = ctypes.CDLL(None, use_errno=True)  # this process's C library


def fs_type(path: Path | str) -> int | None:
    """statfs(2) f_type of the file system holding `path`, None when that cannot be
    told (no such path)."""
    buf = _Statfs()
    if _libc.statfs(os.fsencode(str(path)), ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF


def in_memory(path: Path | str) -> bool:
    """Whether files under `path` (an existing directory) live in memory (tmpfs,
    ramfs); False when that cannot be told."""
    return fs_type(path) in MEMORY_FS


def on_network(path: Path | str) -> bool:
    """Whether files under `path` (an existing directory) are read over a network (a
    shared file system: NETWORK_FS); False when that cannot be told."""
    return fs_type(path) in NETWORK_FS


def _bounce() -> mmap.mmap:
    # Anonymous mmaps are page-aligned; one per writer thread, reused for every pack.
    b = getattr(_local, "buf", None)
    if b is None:
        b = _local.buf = huge_map(BOUNCE)
    return b


def _write_plain(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


class _Out:
    """Appends to `fd`: whole blocks with O_DIRECT while that works, the rest plain."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        self.direct = hasattr(os, "O_DIRECT")
        self.written = 0
        if self.direct:
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, self.flags | os.O_DIRECT)
            except OSError:  # refused by the filesystem
                self.direct = False

    def plain(self) -> None:
        if self.direct:
            self.direct = False
            fcntl.fcntl(self.fd, fcntl.F_SETFL, self.flags)

    def _direct(self, call: Callable[[int, _B], int], data: _B) -> int | None:
        """Bytes one O_DIRECT `call(fd, data)` (os.write, os.writev) wrote, or None when
        the filesystem refused it before anything was written (then on plain)."""
        try:
            n = call(self.fd, data)
        except OSError as e:
            if e.errno != errno.EINVAL or self.written:
                raise
            self.plain()  # refused before anything was written: fall back
            return None
        self.written += n
        if self.written % ALIGN:  # a short write off a block boundary: go on buffered
            self.plain()
        return n

    def writev(self, views: list[memoryview]) -> None:
        """Write `views` (each whole blocks where it lies: `_block_aligned`) with
        O_DIRECT while that works, the rest plain."""
        views = [v for v in views if len(v)]
        i = 0
        while i < len(views) and self.direct:
            n = self._direct(os.writev, views[i : i + IOV_MAX])
            if n is None:
                break
            i = _advance(views, i, n)
        if i < len(views):
            self.plain()
            rest = views[i:]
            _writev(self.fd, rest)
            self.written += sum(len(v) for v in rest)

    def write(self, view: memoryview) -> None:
        """Write `view` (page-aligned start: the bounce buffer, or a whole pack's arena)."""
        while view and self.direct and len(view) >= ALIGN:
            n = self._direct(os.write, view[: len(view) // ALIGN * ALIGN])
            if n is None:
                break
            view = view[n:]
        if view:
            self.plain()
            _write_plain(self.fd, view)
        self.written += len(view)


def _aligned(v: memoryview) -> bool:
    return int(np.frombuffer(v, dtype=np.uint8).ctypes.data) % ALIGN == 0


def _block_aligned(views: list[memoryview]) -> int:
    """How many leading views are whole blocks where they lie (address and length)."""
    for i, v in enumerate(views):
        if len(v) % ALIGN or not _aligned(v):
            return i
    return len(views)


def _writev(fd: int, views: list[memoryview]) -> None:
    """All of `views`, back to back, IOV_MAX at a time (short writes continued)."""
    views = [v for v in views if len(v)]
    i = 0
    while i < len(views):
        i = _advance(views, i, os.writev(fd, views[i : i + IOV_MAX]))


def _advance(views: list[memoryview], i: int, n: int) -> int:
    """After `n` bytes of `views[i:]` were written: the index of the first view not yet
    written whole (that view trimmed to what is left of it)."""
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    if n:
        views[i] = views[i][n:]
    return i


def write_parts(
    fd: int, parts: Sequence[bytes | bytearray | memoryview], gather: bool = False
) -> None:
    """Write the parts back to back at the file position of `fd` (a new file opened for
    writing, positioned at 0); O_DIRECT for the bulk of big objects (module docstring).
    The parts are gathered straight into the bounce buffer: a pack need not be joined
    into one `bytes` first (a pass over fresh memory that faults in every page). With
    `gather` (a file in memory) writev takes the parts as they are."""
    views = [memoryview(p).cast("B") for p in parts]
    if gather:
        _writev(fd, views)
        return
    if sum(len(v) for v in views) < DIRECT_MIN:
        for v in views:
            _write_plain(fd, v)
        return
    out = _Out(fd)
    if len(views) == 1 and _aligned(views[0]):
        # A pack laid out whole in a page-aligned arena (storecore/arena.py): straight
        # from it, no bounce copy.
        try:
            out.write(views[0])
        finally:
            out.plain()
        return
    try:
        # Leading whole blocks (a borrowed pack's header and raw blobs) go as they lie;
        # the file position stays on a block boundary for the bounced rest.
        k = _block_aligned(views)
        if k:
            out.writev(views[:k])
            views = views[k:]
        buf = memoryview(_bounce())
        pos = 0
        for v in views:
            while v:
                k = min(len(v), BOUNCE - pos)
                buf[pos : pos + k] = v[:k]
                pos, v = pos + k, v[k:]
                if pos == BOUNCE:
                    out.write(buf)
                    pos = 0
        if pos:
            out.write(buf[:pos])
    finally:
        out.plain()


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of `data`, as `write_parts` does."""
    write_parts(fd, [data])
