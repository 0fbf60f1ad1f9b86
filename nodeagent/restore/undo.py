"""All-or-nothing writing of one member: back up exactly what a write plan overwrites,
write it, and put every written byte back if writing fails part-way.

Owns the write step of restore (restore.write uses `AllOrNothing`):
- The plan's pieces are cut into steps of STEP (32 MiB) bytes. A second thread backs up step
  i + 1 (and on) while the caller's thread writes step i, so the backup costs little
  frozen time beyond the writes themselves (bench/restore.py measures both).
- What a step overwrites is backed up by `restore_backup.Backup` (read as the kernel
  shows it, never breaking copy-on-write sharing), into a caller's prefaulted buffer;
  with a live backup (restore/livebackup.py) only the pages whose live copy does not
  hold are read, after it in its store.
- Writing goes through MemoryWriter, whose `written` says exactly how far a failed
  step got. On a failure (a write refused, the fault point `agent.restore.write`), the
  bytes written so far are written back from the backup (zeros from the zero source),
  then RestoreUndone is raised; if putting back fails too, RestoreUndoFailed. A process
  that dies meanwhile needs nothing put back: ProcessExited goes through as it is.
Vectorised per step (NumPy over pages and runs); Python loops run per step and per run
of /proc/PID/mem pages.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import numpy.typing as npt

from cpcoord import faults
from cpcoord.closing import Closing
from cpcoord.errors import (
    CpcoordError,
    ProcessExited,
    RestoreUndoFailed,
    RestoreUndone,
    WriteFailed,
)
from nodeagent.proc.procfs import Mapping
from nodeagent.proc.staging import Staging
from nodeagent.proc.writer import ZERO_CHUNK, MemoryWriter, WriteStats, WritevFn, zero_source
from nodeagent.restore.backup import Backed, Backup, BackupStore
from nodeagent.restore.livebackup import LiveBackup
from nodeagent.restore.plan import Plan

log = logging.getLogger(__name__)
U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
# Bytes per step: per-step costs (a pagemap read, a few NumPy calls: ~0.6 ms) stay near
# 20 ms per GiB, and the first step, which nothing overlaps, reads in ~6 ms. Zero pieces
# (at most ZERO_CHUNK) are never split.
STEP = 32 << 20
FAIL_POINT = "agent.restore.write"


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
class Written:
    stats: WriteStats
    backed_up: int  # bytes read into the backup
    fresh: int  # of those, into memory mapped while frozen (no buffer was big enough)
    live: int = 0  # bytes of the backup taken from the live backup instead (not read frozen)


Ahead = Callable[[U64], None]  # called with a step's pieces once backed up, before written


class _Pipeline:
    """The backup thread: backs up steps in order, ahead of the writer (and calls
    `ahead` with each step's pieces once backed up)."""

    def __init__(self, backup: Backup, steps: Steps, ahead: Ahead | None = None) -> None:
        self.backup, self.steps, self.ahead = backup, steps, ahead
        self.done: list[Backed] = []
        self.error: BaseException | None = None
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def _one(self, i: int) -> Backed:
        a, b = self.steps.bounds[i], self.steps.bounds[i + 1]
        got = self.backup.step(self.steps.remote[a:b], self.steps.forced[a:b])
        if self.ahead is not None:
            self.ahead(self.steps.remote[a:b])
        return got

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


class AllOrNothing(Closing):
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
        live: LiveBackup | None = None,
        ahead: Ahead | None = None,
    ) -> None:
        self.pid, self.member, self._writev = pid, member, writev
        self.steps = split(plan)
        # With a live backup, what is read frozen goes on after it in its store (the
        # live copy's owner closes that store).
        self._own = live is None
        self._store = BackupStore(staging) if live is None else live.store
        self._fresh0 = self._store.fresh
        self._backup = Backup(pid, maps, self._store, live)
        self._pipe = _Pipeline(self._backup, self.steps, ahead)

    def close(self) -> None:
        self._pipe.stop()
        self._backup.close()
        if self._own:
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
        live = sum(d.live_bytes for d in pipe.done)
        fresh = self._store.fresh - self._fresh0
        return Written(WriteStats(calls, vbytes, mbytes), read, fresh, live)

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
