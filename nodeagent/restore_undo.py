"""All-or-nothing writing of one member: back up exactly what a write plan overwrites,
write it, and put every written byte back if writing fails part-way.

Owns the write step of restore (restore.write uses `AllOrNothing`):
- The plan's pieces are cut into steps of STEP (32 MiB) bytes. A second thread backs up step
  i + 1 (and on) while the caller's thread writes step i, so the backup costs little
  frozen time beyond the writes themselves (bench/restore.py measures both).
- What a step overwrites is read as the kernel shows it, per page (pagemap):
    * absent (neither present nor swapped) in a private anonymous mapping: it reads
      as zeros, so nothing is read: the backup of such a page is "zeros";
    * present and exclusively mapped (bit 56), or a page-cache / shared page (bit 61):
      `process_vm_readv` (pinning such a page for reading never unshares it);
    * anything else (a copy-on-write page shared with another process, swapped, absent
      in a file or shared mapping): `/proc/PID/mem`, which does not pin, so reading
      never breaks copy-on-write sharing. Short gaps between such pages go the same way
      (fewer calls).
  A byte that cannot be read stops the restore before the step that holds it is written.
- The backup lands in a caller's prefaulted buffer (the agent passes the member's idle
  capture staging, which holds about as many bytes as the member has present pages),
  else in memory mapped here (page faults while frozen: slower, still correct).
- Writing goes through MemoryWriter, whose `written` says exactly how far a failed
  step got. On a failure (a write refused, the fault point `agent.restore.write`), the
  bytes written so far are written back from the backup (zeros from the zero source),
  then RestoreUndone is raised; if putting back fails too, RestoreUndoFailed. A process
  that dies meanwhile needs nothing put back: ProcessExited goes through as it is.
Vectorised per step (NumPy over pages and runs); Python loops run per step and per run
of /proc/PID/mem pages.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import numpy.typing as npt

from cpcoord import faults
from cpcoord.errors import (
    CpcoordError,
    ProcessExited,
    ReadFailed,
    RestoreUndoFailed,
    RestoreUndone,
    WriteFailed,
)
from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE
from nodeagent.iovec import READ, alive, transfer, vm_syscall
from nodeagent.pagemap import PM_EXCLUSIVE, PM_FILE_SHARED, PM_PRESENT, PM_SWAPPED, PagemapReader
from nodeagent.procfs import Mapping
from nodeagent.restore_plan import Plan
from nodeagent.staging import MADV_HUGEPAGE, Staging
from nodeagent.writer import ZERO_CHUNK, MemoryWriter, WriteStats, WritevFn, zero_source

log = logging.getLogger(__name__)
U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
# Bytes per step: per-step costs (a pagemap read, a few NumPy calls: ~0.6 ms) stay near
# 20 ms per GiB, and the first step, which nothing overlaps, reads in ~6 ms. Zero pieces
# (at most ZERO_CHUNK) are never split.
STEP = 32 << 20
MEM_GAP = 16  # pages: readv-able gaps this short between /proc/PID/mem pages go with them
WINDOW_GAP = 4096  # pages: pagemap is read in windows over gaps up to this
FAIL_POINT = "agent.restore.write"
ZERO, READV, MEM = 0, 1, 2
_readv = vm_syscall("process_vm_readv")


@dataclass(frozen=True)
class Steps:
    """The plan's pieces (split so none is longer than a step) and where each step
    starts: pieces `[bounds[i], bounds[i + 1])` make step i."""

    remote: U64
    local: U64
    forced: npt.NDArray[np.bool_]
    bounds: list[int]

    @property
    def count(self) -> int:
        return len(self.bounds) - 1


def split(plan: Plan, step: int = STEP) -> Steps:
    assert step >= ZERO_CHUNK, "a zero piece must fit in one step"
    r, lo, f = plan.remote.astype(np.int64), plan.local.astype(np.int64), plan.forced
    n = np.maximum((r[:, 1] + step - 1) // step, 1)
    rep = np.repeat(np.arange(r.shape[0]), n)
    k = np.arange(rep.size) - (np.cumsum(n) - n)[rep]
    start = r[rep, 0] + k * step
    length = np.minimum(r[rep, 1] - k * step, step)
    local = lo[rep, 0] + k * step  # zero pieces are at most a step: k == 0 for them
    remote = np.stack((start, length), axis=1).astype(np.uint64)
    localv = np.stack((local, length), axis=1).astype(np.uint64)
    cum = np.cumsum(length) - length
    bounds = [*np.flatnonzero(np.diff(cum // step, prepend=-1) != 0).tolist(), int(rep.size)]
    return Steps(remote, localv, f[rep], bounds)


@dataclass(frozen=True)
class Backed:
    """One step's backup: runs that tile its pieces' bytes in order; `addr` is where a
    run's bytes are kept (0: zeros)."""

    remote: U64  # (k, 2) [address, length]
    addr: U64  # (k,)
    forced: npt.NDArray[np.bool_]
    read_bytes: int


class _Store:
    """Where backed-up bytes go: a caller's prefaulted buffer first, then fresh memory."""

    def __init__(self, staging: Staging | None) -> None:
        self._base = staging.address if staging is not None and staging.capacity else 0
        self._left = staging.capacity if staging is not None else 0
        self._maps: list[mmap.mmap] = []
        self.fresh = 0

    def take(self, nbytes: int) -> int:
        if nbytes <= self._left:
            addr = self._base
            self._base += nbytes
            self._left -= nbytes
            return addr
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(OSError):  # 512x fewer page faults while frozen
            mm.madvise(MADV_HUGEPAGE)
        self._maps.append(mm)
        self.fresh += nbytes
        return ctypes.addressof(ctypes.c_char.from_buffer(mm))

    def close(self) -> None:
        for mm in self._maps:
            with contextlib.suppress(BufferError):  # a view still alive: freed with it
                mm.close()
        self._maps.clear()


class _Backup:
    """Reads steps of the target into the store (module docstring)."""

    def __init__(self, pid: int, maps: Sequence[Mapping], store: _Store) -> None:
        self.pid = pid
        self.store = store
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
        w = self._words(page.astype(np.uint64))
        taken = (w & (PM_PRESENT | PM_SWAPPED)) != 0
        pinnable = ((w & PM_PRESENT) != 0) & ((w & (PM_EXCLUSIVE | PM_FILE_SHARED)) != 0)
        kind = np.where(pinnable, READV, MEM)
        kind[~taken & self._private_anon(s)[piece]] = ZERO
        _close_gaps(kind, piece)
        # Runs of one kind within one piece.
        brk = np.flatnonzero((np.diff(kind) != 0) | (np.diff(piece) != 0)) + 1
        first = np.concatenate(([0], brk)).astype(np.int64)
        last = np.concatenate((brk, [page.size])).astype(np.int64) - 1
        rk, rp = kind[first], piece[first]
        rs = np.maximum(page[first] << PAGE_SHIFT, s[rp])
        re = np.minimum((page[last] + 1) << PAGE_SHIFT, e[rp])
        npages = last - first + 1
        keep = rk != ZERO
        nbytes = int(npages[keep].sum()) * PAGE_SIZE
        base = self.store.take(nbytes) if nbytes else 0
        addr = np.zeros(rk.size, dtype=np.int64)
        off = np.cumsum(np.where(keep, npages, 0)) - np.where(keep, npages, 0)
        # A run's bytes are kept from its first page's start (rs is page-aligned).
        addr[keep] = base + off[keep] * PAGE_SIZE
        self._read(rs[rk == READV], npages[rk == READV], addr[rk == READV], viamem=False)
        self._read(rs[rk == MEM], npages[rk == MEM], addr[rk == MEM], viamem=True)
        return Backed(
            np.stack((rs, re - rs), axis=1).astype(np.uint64),
            addr.astype(np.uint64),
            forced[rp],
            nbytes,
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

        transfer(_readv, self.pid, remote, local, READ, short)

    def _mem_read(self, addr: int, length: int, dest: int) -> None:
        if self._mem_fd < 0:
            self._mem_fd = READ.open_mem(self.pid)
        done = 0
        while done < length:
            buf = (ctypes.c_char * (length - done)).from_address(dest + done)
            try:
                got = os.preadv(self._mem_fd, [buf], addr + done)
            except OSError as e:
                if e.errno == errno.ESRCH:
                    raise ProcessExited(self.pid, "restore") from None
                raise ReadFailed(self.pid, f"0x{addr + done:x}", e.strerror) from None
            if got <= 0:
                if not alive(self.pid):
                    raise ProcessExited(self.pid, "restore")
                raise ReadFailed(self.pid, f"0x{addr + done:x}", "the kernel read nothing")
            done += got


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


@dataclass(frozen=True)
class Written:
    stats: WriteStats
    backed_up: int  # bytes read into the backup
    fresh: int  # of those, into memory mapped while frozen (no buffer was big enough)


class _Pipeline:
    """The backup thread: backs up steps in order, ahead of the writer."""

    def __init__(self, backup: _Backup, steps: Steps) -> None:
        self.backup, self.steps = backup, steps
        self.done: list[Backed] = []
        self.error: BaseException | None = None
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def _one(self, i: int) -> Backed:
        a, b = self.steps.bounds[i], self.steps.bounds[i + 1]
        return self.backup.step(self.steps.remote[a:b], self.steps.forced[a:b])

    def _run(self) -> None:
        try:
            for i in range(self.steps.count):
                got = self._one(i)
                with self._cv:
                    if self._stop:
                        return
                    self.done.append(got)
                    self._cv.notify_all()
        except BaseException as e:  # handed to the writer's thread
            with self._cv:
                self.error = e
                self._cv.notify_all()

    def start(self) -> None:
        if self.steps.count <= 1:
            self._run()  # one step: nothing to overlap
            return
        self._thread = threading.Thread(target=self._run, name="cpcoord-restore-backup")
        self._thread.start()

    def wait(self, i: int) -> Backed:
        with self._cv:
            while len(self.done) <= i and self.error is None:
                self._cv.wait()
            if len(self.done) > i:
                return self.done[i]
            assert self.error is not None
            raise self.error

    def stop(self) -> None:
        with self._cv:
            self._stop = True
        if self._thread is not None:
            self._thread.join()


class AllOrNothing:
    """One member's write (module docstring): `write()` writes the plan or puts back
    what it wrote and raises; `undo(cause)` puts back a completed write (a later step,
    the registers, failed). Close (or use as a context manager) to free the backup."""

    def __init__(
        self,
        pid: int,
        member: str,
        plan: Plan,
        maps: Sequence[Mapping],
        *,
        writev: WritevFn,
        staging: Staging | None = None,
    ) -> None:
        self.pid, self.member, self._writev = pid, member, writev
        self.steps = split(plan)
        self._store = _Store(staging)
        self._backup = _Backup(pid, maps, self._store)
        self._pipe = _Pipeline(self._backup, self.steps)

    def __enter__(self) -> AllOrNothing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pipe.stop()
        self._backup.close()
        self._store.close()

    def write(self) -> Written:
        steps, pipe, pid = self.steps, self._pipe, self.pid
        calls = vbytes = mbytes = 0
        pipe.start()
        with MemoryWriter(pid, self._writev) as w:
            for i in range(steps.count):
                try:
                    backed = pipe.wait(i)
                except ProcessExited:
                    raise
                except CpcoordError as e:  # a byte we could not back up: stop here
                    self._undo(pipe.done[:i], None, 0, e)
                a, b = steps.bounds[i], steps.bounds[i + 1]
                w.written = 0
                try:
                    if faults.fail_point(FAIL_POINT):
                        where = f"0x{int(steps.remote[a, 0]):x}"
                        raise WriteFailed(pid, where, f"fault point {FAIL_POINT}")
                    st = w.write(steps.remote[a:b], steps.local[a:b], steps.forced[a:b])
                except ProcessExited:
                    raise
                except CpcoordError as e:
                    self._undo(pipe.done[:i], backed, w.written, e)
                calls += st.writev_calls
                vbytes += st.writev_bytes
                mbytes += st.mem_bytes
        read = sum(d.read_bytes for d in pipe.done)
        return Written(WriteStats(calls, vbytes, mbytes), read, self._store.fresh)

    def undo(self, cause: CpcoordError) -> NoReturn:
        """Put back everything `write()` wrote; always raises."""
        self._undo(self._pipe.done, None, 0, cause)

    def _undo(
        self, whole: Sequence[Backed], failed: Backed | None, partial: int, cause: CpcoordError
    ) -> NoReturn:
        self._pipe.stop()  # no more reading ahead
        remote, local, forced = rollback_pieces(whole, failed, partial)
        nbytes = int(remote[:, 1].sum())
        fields = {"member": self.member, "pid": self.pid, "bytes": nbytes, "error": str(cause)}
        log.warning("restore failed: putting back what it wrote", extra={"fields": fields})
        try:
            with MemoryWriter(self.pid, self._writev) as w:
                w.write(remote, local, forced)
        except ProcessExited:
            raise
        except CpcoordError as e:
            log.error(
                "putting back failed: the process is half-written",
                extra={"fields": {**fields, "undo_error": str(e)}},
            )
            raise RestoreUndoFailed(self.member, str(cause), str(e)) from cause
        raise RestoreUndone(self.member, nbytes, str(cause)) from cause


def rollback_pieces(
    whole: Sequence[Backed], failed: Backed | None = None, partial: int = 0
) -> tuple[U64, U64, npt.NDArray[np.bool_]]:
    """The pieces that put back what was written: every run of the steps in `whole`, and
    the first `partial` bytes of the runs of `failed` (the step that failed)."""
    parts = [(d.remote.astype(np.int64), d.addr.astype(np.int64), d.forced) for d in whole]
    if failed is not None and partial > 0:
        r = failed.remote.astype(np.int64)
        ends = np.cumsum(r[:, 1])
        n = min(int(np.searchsorted(ends, partial, side="left")), r.shape[0] - 1)
        cut = r[: n + 1].copy()
        cut[n, 1] = min(int(cut[n, 1]), partial - (int(ends[n - 1]) if n else 0))
        parts.append((cut, failed.addr[: n + 1].astype(np.int64), failed.forced[: n + 1]))
    if not parts:
        z = np.zeros((0, 2), dtype=np.uint64)
        return z, z.copy(), np.zeros(0, dtype=bool)
    remote = np.concatenate([p[0] for p in parts])
    addr = np.concatenate([p[1] for p in parts])
    forced = np.concatenate([p[2] for p in parts])
    keep = remote[:, 1] > 0
    remote, addr, forced = remote[keep], addr[keep], forced[keep]
    # Zero runs (addr 0) read from the zero source, in pieces it can hold.
    zero = addr == 0
    n_sub = np.where(zero, (remote[:, 1] + ZERO_CHUNK - 1) // ZERO_CHUNK, 1)
    rep = np.repeat(np.arange(remote.shape[0]), n_sub)
    k = np.arange(rep.size) - (np.cumsum(n_sub) - n_sub)[rep]
    z = zero[rep]
    end_all = remote[rep, 0] + remote[rep, 1]
    start = remote[rep, 0] + np.where(z, k * ZERO_CHUNK, 0)
    end = np.where(z, np.minimum(start + ZERO_CHUNK, end_all), end_all)
    src = np.where(z, zero_source(), addr[rep])
    length = end - start
    return (
        np.stack((start, length), axis=1).astype(np.uint64),
        np.stack((src, length), axis=1).astype(np.uint64),
        forced[rep],
    )
