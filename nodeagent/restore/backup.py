"""The backup half of all-or-nothing restore: read what a write step will overwrite.

Owns: where backed-up bytes go (`BackupStore`) and reading one step (`Backup.step`).
What a step overwrites is read as the kernel shows it, per page (pagemap):
- absent (neither present nor swapped) in a private anonymous mapping: it reads as
  zeros, so nothing is read: the backup of such a page is "zeros";
- present and exclusively mapped (bit 56), or a page-cache / shared page (bit 61):
  `process_vm_readv` (pinning such a page for reading never unshares it);
- anything else (a copy-on-write page shared with another process, swapped, absent in a
  file or shared mapping): `/proc/PID/mem`, which does not pin, so reading never breaks
  copy-on-write sharing. Short gaps between such pages go the same way (fewer calls).
- a page whose copy was taken live before the freeze and still holds (livebackup.py):
  nothing read, no pagemap word; the run points into the live copy.
A byte that cannot be read stops the restore before the step that holds it is written.
The backup lands in a caller's prefaulted buffer (the agent passes the member's idle
capture staging, which holds about as many bytes as the member has present pages), else
in memory mapped here (page faults while frozen: slower, still correct).
Vectorised per step (NumPy over pages and runs); Python loops run per run of
/proc/PID/mem pages. Steps, the backup thread and putting bytes back: `restore_undo`.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from cpcoord.anonmem import huge_map
from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE
from nodeagent.proc.iovec import READ, mem_all, transfer
from nodeagent.proc.pagemap import (
    PM_EXCLUSIVE,
    PM_FILE_SHARED,
    PM_PRESENT,
    PM_SWAPPED,
    PagemapReader,
)
from nodeagent.proc.procfs import Mapping
from nodeagent.proc.reader import sys_readv
from nodeagent.proc.staging import Staging

if TYPE_CHECKING:
    from nodeagent.restore.livebackup import LiveBackup

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
MEM_GAP = 16  # pages: readv-able gaps this short between /proc/PID/mem pages go with them
# Pages: pagemap is read in windows over gaps up to this. A word costs the kernel a
# look at its page (exclusive or not), a read ~3 us: for 1% of 1 GiB scattered, 256
# measured 18.4 ms for the whole write against 20.0 with 4096 and 22.2 with 32.
WINDOW_GAP = 256
ZERO, READV, MEM, LIVE = 0, 1, 2, 3  # LIVE: read before the freeze (livebackup.py)


@dataclass(frozen=True)
class Backed:
    """One step's backup: runs that tile its pieces' bytes in order; `addr` is where a
    run's bytes are kept (0: zeros)."""

    remote: U64  # (k, 2) [address, length]
    addr: U64  # (k,)
    forced: npt.NDArray[np.bool_]
    read_bytes: int
    live_bytes: int = 0  # of its runs' bytes, taken from the live backup (not read now)


class BackupStore:
    """Where backed-up bytes go: a caller's prefaulted buffer first, then fresh memory."""

    def __init__(self, staging: Staging | None) -> None:
        self._staging = staging if staging is not None and staging.capacity else None
        self._base = self._start = self._staging.address if self._staging is not None else 0
        self._left = self._staging.capacity if self._staging is not None else 0
        self._maps: list[mmap.mmap] = []
        self.fresh = 0

    def take(self, nbytes: int) -> int:
        if nbytes <= self._left:
            addr = self._base
            self._base += nbytes
            self._left -= nbytes
            if self._staging is not None:  # what staging held there is gone
                self._staging.clobber(self._base - self._start)
            return addr
        mm = huge_map(nbytes)  # huge pages: 512x fewer page faults while frozen
        self._maps.append(mm)
        self.fresh += nbytes
        return ctypes.addressof(ctypes.c_char.from_buffer(mm))

    def close(self) -> None:
        for mm in self._maps:
            with contextlib.suppress(BufferError):  # a view still alive: freed with it
                mm.close()
        self._maps.clear()


class Backup:
    """Reads steps of the target into the store (see the module header)."""

    def __init__(
        self,
        pid: int,
        maps: Sequence[Mapping],
        store: BackupStore,
        live: LiveBackup | None = None,
    ) -> None:
        self.pid = pid
        self.store = store
        self.live = live
        maps = [m for m in maps if m.end < 1 << 62]
        self._ms = np.array([m.start for m in maps], dtype=np.int64)
        self._me = np.array([m.end for m in maps], dtype=np.int64)
        self._anon = np.array([m.inode == 0 and not m.shared for m in maps], dtype=bool)
        self._pm = PagemapReader(pid)
        self._mem_fd = -1

    def close(self) -> None:
        self._pm.close()
        if self._mem_fd >= 0:
            os.close(self._mem_fd)
            self._mem_fd = -1

    def _private_anon(self, addr: I64) -> npt.NDArray[np.bool_]:
        """Per address: it lies in a private anonymous mapping."""
        j = np.searchsorted(self._ms, addr, side="right") - 1
        ok = j >= 0
        j = np.maximum(j, 0)
        return ok & (addr < self._me[j]) & self._anon[j] if self._ms.size else ok & False

    def _words(self, pages: U64) -> U64:
        """Pagemap words of sorted page numbers, one read per window."""
        out = np.zeros(pages.size, dtype=np.uint64)
        if pages.size == 0:
            return out
        brk = np.flatnonzero(np.diff(pages.astype(np.int64)) > WINDOW_GAP) + 1
        for a, b in zip([0, *brk.tolist()], [*brk.tolist(), pages.size], strict=True):
            first = int(pages[a])
            w = self._pm.words(first, int(pages[b - 1]) - first + 1)
            out[a:b] = w[(pages[a:b] - np.uint64(first)).astype(np.int64)]
        return out

    def step(self, remote: U64, forced: npt.NDArray[np.bool_]) -> Backed:
        s = remote[:, 0].astype(np.int64)
        e = s + remote[:, 1].astype(np.int64)
        p0 = s >> PAGE_SHIFT
        p1 = (e + PAGE_SIZE - 1) >> PAGE_SHIFT
        n = p1 - p0
        piece = np.repeat(np.arange(s.size), n)
        page = p0[piece] + (np.arange(piece.size) - (np.cumsum(n) - n)[piece])
        src = np.zeros(page.size, dtype=np.int64)
        if self.live is not None:
            # Pages whose live copy holds (livebackup.py; frozen, every page written since
            # or no longer present was marked stale): no pagemap word, nothing read.
            src = self.live.lookup(page).astype(np.int64)
        need = src == 0
        if need.all():
            w = self._words(page.astype(np.uint64))
        else:
            w = np.zeros(page.size, dtype=np.uint64)
            w[need] = self._words(page[need].astype(np.uint64))
        taken = (w & (PM_PRESENT | PM_SWAPPED)) != 0
        pinnable = ((w & PM_PRESENT) != 0) & ((w & (PM_EXCLUSIVE | PM_FILE_SHARED)) != 0)
        kind = np.where(pinnable, READV, MEM)
        kind[~taken & self._private_anon(s)[piece]] = ZERO
        kind[~need] = LIVE
        _close_gaps(kind, piece)
        # Runs of one kind within one piece (live runs: contiguous in the live copy too).
        cut = (np.diff(kind) != 0) | (np.diff(piece) != 0)
        cut |= (kind[1:] == LIVE) & (np.diff(src) != PAGE_SIZE)
        brk = np.flatnonzero(cut) + 1
        first = np.concatenate(([0], brk)).astype(np.int64)
        last = np.concatenate((brk, [page.size])).astype(np.int64) - 1
        rk, rp = kind[first], piece[first]
        rs = np.maximum(page[first] << PAGE_SHIFT, s[rp])
        re = np.minimum((page[last] + 1) << PAGE_SHIFT, e[rp])
        npages = last - first + 1
        keep = (rk == READV) | (rk == MEM)
        nbytes = int(npages[keep].sum()) * PAGE_SIZE
        base = self.store.take(nbytes) if nbytes else 0
        addr = np.zeros(rk.size, dtype=np.int64)
        off = np.cumsum(np.where(keep, npages, 0)) - np.where(keep, npages, 0)
        # A run's bytes are kept from its first page's start (rs is page-aligned).
        addr[keep] = base + off[keep] * PAGE_SIZE
        addr[rk == LIVE] = src[first[rk == LIVE]]
        self._read(rs[rk == READV], npages[rk == READV], addr[rk == READV], viamem=False)
        self._read(rs[rk == MEM], npages[rk == MEM], addr[rk == MEM], viamem=True)
        return Backed(
            np.stack((rs, re - rs), axis=1).astype(np.uint64),
            addr.astype(np.uint64),
            forced[rp],
            nbytes,
            int(npages[rk == LIVE].sum()) * PAGE_SIZE,
        )

    def _read(self, start: I64, npages: I64, dest: I64, viamem: bool) -> None:
        if start.size == 0:
            return
        length = npages * PAGE_SIZE
        if viamem:
            for a, n, d in zip(start.tolist(), length.tolist(), dest.tolist(), strict=True):
                self._mem_read(a, n, d)
            return
        remote = np.stack((start, length), axis=1).astype(np.uint64)
        local = np.stack((dest, length), axis=1).astype(np.uint64)

        def short(j: int, into: int) -> None:
            rest = int(remote[j, 1]) - into
            self._mem_read(int(remote[j, 0]) + into, rest, int(local[j, 0]) + into)

        transfer(sys_readv, self.pid, remote, local, READ, short)

    def _mem_read(self, addr: int, length: int, dest: int) -> None:
        if self._mem_fd < 0:
            self._mem_fd = READ.open_mem(self.pid)
        mem_all(READ, self._mem_fd, self.pid, addr, length, dest, during="restore")


def _close_gaps(kind: npt.NDArray[np.int64], piece: npt.NDArray[np.int64]) -> None:
    """Turn READV runs shorter than MEM_GAP pages between MEM pages of the same piece
    into MEM (one /proc/PID/mem read instead of three calls)."""
    if kind.size < 3 or not np.any(kind == MEM):
        return
    brk = np.flatnonzero((np.diff(kind) != 0) | (np.diff(piece) != 0)) + 1
    first = np.concatenate(([0], brk))
    last = np.concatenate((brk, [kind.size])) - 1
    k, p = kind[first], piece[first]
    inner = np.arange(1, k.size - 1)
    short = (last[inner] - first[inner] + 1) < MEM_GAP
    ok = (
        (k[inner] == READV)
        & short
        & (k[inner - 1] == MEM)
        & (k[inner + 1] == MEM)
        & (p[inner - 1] == p[inner])
        & (p[inner + 1] == p[inner])
    )
    for r in inner[ok].tolist():  # per such gap, few
        kind[first[r] : last[r] + 1] = MEM
