"""Private anonymous memory for big buffers, with transparent huge pages asked for.

One place for the mapping that staging, restore backups, downloaded pages and pack
arenas are built on: private (a shared anonymous mapping is tmpfs-backed, and its first
touch costs more), and `MADV_HUGEPAGE` (this kernel's THP default is `madvise`: without
it every 4 KiB page of a GiB faults in on its own, 512x more faults and TLB misses).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap

import numpy as np

MADV_HUGEPAGE = 14  # as <sys/mman.h>; older Pythons lack mmap.MADV_HUGEPAGE
MAP_NORESERVE = 0x4000  # address space without commit charge until written
MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault every page in, writable, in one call

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def huge_map(nbytes: int, noreserve: bool = False) -> mmap.mmap:
    """A private anonymous mapping of `nbytes`, zeroed, huge pages asked for (a kernel
    that refuses gives normal pages: the same memory, only more faults)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (MAP_NORESERVE if noreserve else 0)
    mm = mmap.mmap(-1, nbytes, flags=flags)
    with contextlib.suppress(OSError):
        mm.madvise(MADV_HUGEPAGE)
    return mm


def populate_range(addr: int, size: int) -> bool:
    """Fault `[addr, addr + size)` in, writable (the kernel zeroes the pages), through
    ctypes, which lets go of the GIL (mmap.madvise holds it): several threads may
    populate slices at once. False when the kernel lacks MADV_POPULATE_WRITE."""
    return int(_libc.madvise(addr, size, MADV_POPULATE_WRITE)) == 0


def populate(mm: mmap.mmap) -> None:
    """Fault every page of `mm` in now, so that the first write into it later (inside a
    checkpoint) takes no faults: fresh memory is slow to touch for the first time in a
    VM. A kernel without MADV_POPULATE_WRITE gets one byte per page written instead."""
    if not populate_range(ctypes.addressof(ctypes.c_char.from_buffer(mm)), len(mm)):
        np.frombuffer(mm, dtype=np.uint8)[:: mmap.PAGESIZE] = 0  # old kernels
