"""Freeze and thaw a process: PTRACE_SEIZE + PTRACE_INTERRUPT on every thread, PTRACE_DETACH.

Why ptrace and not SIGSTOP or the freezer cgroup: a ptrace stop is invisible to the
process's parent and job control, works on any process we may trace, and the kernel
releases every tracee when the tracer dies, so a crashed agent never leaves a process
stopped (DESIGN.md, step 2).

ptrace binds a tracee to the *thread* that seized it: freeze, every ptrace call made while
frozen (register reads, syscall injection) and thaw must run on the same OS thread.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ptrace.binding.func import ptrace
from ptrace.error import PtraceError

from cpcoord.errors import FreezeFailed, NoSuchProcess, PermissionDenied, ProcessExited
from nodeagent.procfs import ProcessIdentity, list_tasks

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_EVENT_STOP = 128
WALL = 0x40000000  # __WALL: wait for threads too
# Signals that would kill or interrupt *us* while the target is stopped; they are blocked
# during the frozen window and delivered right after the thaw.
_DEFERRED_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}


@dataclass
class FrozenProcess:
    """A process whose every thread is in a ptrace stop, held by the calling thread."""

    ident: ProcessIdentity
    tids: list[int] = field(default_factory=list)
    # Signals that stopped a thread before our interrupt did; re-injected on detach so the
    # target loses nothing.
    pending_signals: dict[int, int] = field(default_factory=dict)
    frozen_at: float = 0.0
    thawed: bool = False

    @property
    def pid(self) -> int:
        return self.ident.pid


def _tracer_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _seize(fp: FrozenProcess, tid: int) -> bool:
    """Seize and interrupt one thread; False when it already exited."""
    try:
        ptrace(PTRACE_SEIZE, tid, 0, 0)
    except PtraceError as e:
        if e.errno == errno.ESRCH:
            return False
        if e.errno == errno.EPERM:
            tracer = _tracer_of(fp.pid)
            why = f"already traced by pid {tracer}" if tracer else "ptrace not permitted"
            raise PermissionDenied("freeze", fp.pid, why) from None
        raise FreezeFailed(fp.pid, f"PTRACE_SEIZE of thread {tid}: {e}") from None
    try:
        ptrace(PTRACE_INTERRUPT, tid, 0, 0)
    except PtraceError as e:
        if e.errno == errno.ESRCH:
            return True  # exiting; its wait status tells
        raise FreezeFailed(fp.pid, f"PTRACE_INTERRUPT of thread {tid}: {e}") from None
    return True


def _wait_stopped(fp: FrozenProcess, tids: list[int], deadline: float) -> list[int]:
    """Wait until each thread is in a ptrace stop; return those that exited instead."""
    waiting = set(tids)
    gone: list[int] = []
    spins = 0
    while waiting:
        for tid in list(waiting):
            try:
                wpid, status = os.waitpid(tid, os.WNOHANG | WALL)
            except ChildProcessError:
                waiting.discard(tid)  # reaped or never ours: it is gone
                gone.append(tid)
                continue
            if wpid == 0:
                continue
            if os.WIFSTOPPED(status):
                sig = os.WSTOPSIG(status)
                event = status >> 16
                if event != PTRACE_EVENT_STOP and sig != signal.SIGTRAP:
                    # A signal-delivery stop came first: the thread is stopped anyway;
                    # keep the signal to hand back on detach.
                    fp.pending_signals[tid] = sig
                waiting.discard(tid)
            else:  # exited or killed
                waiting.discard(tid)
                gone.append(tid)
        if not waiting:
            break
        if time.monotonic() > deadline:
            raise FreezeFailed(fp.pid, f"threads {sorted(waiting)} did not stop in time")
        spins += 1
        if spins > 50:
            time.sleep(0.0001)
        else:
            os.sched_yield()
    return gone


def freeze(ident: ProcessIdentity, timeout: float = 5.0) -> FrozenProcess:
    """Stop every thread of the process; loop until no new thread appears.

    Threads are listed, seized and interrupted; once all listed threads are stopped none
    of them can create another, so a listing that shows no new thread is final.
    """
    ident.check()
    fp = FrozenProcess(ident)
    seized: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                tids = list_tasks(ident.pid)
            except NoSuchProcess:
                raise ProcessExited(ident.pid, "freeze") from None
            new = [t for t in tids if t not in seized]
            if not new:
                break
            got = [t for t in new if _seize(fp, t)]
            seized.update(new)
            fp.tids.extend(got)
            gone = _wait_stopped(fp, got, deadline)
            for t in gone:
                fp.tids.remove(t)
                if t == ident.pid:
                    raise ProcessExited(ident.pid, "freeze")
        if not fp.tids:
            raise ProcessExited(ident.pid, "freeze")
        ident.check()
    except BaseException:
        thaw(fp)
        raise
    fp.frozen_at = time.monotonic()
    return fp


def thaw(fp: FrozenProcess) -> None:
    """Detach from every thread (re-injecting signals that arrived while frozen)."""
    if fp.thawed:
        return
    dead: list[int] = []
    for tid in fp.tids:
        try:
            ptrace(PTRACE_DETACH, tid, 0, fp.pending_signals.get(tid, 0))
        except PtraceError:
            # Not in a ptrace stop any more: it was killed while frozen.
            dead.append(tid)
    fp.thawed = True
    if dead:
        _reap_dead_tracees(fp, dead)


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _reap_dead_tracees(fp: FrozenProcess, tids: list[int], timeout: float = 2.0) -> None:
    """Collect threads that died while we traced them.

    A traced thread that exits stays a zombie until its tracer waits for it, and the
    process's leader cannot be reaped by its parent before every thread is: without
    this, a target killed while frozen lingers as a zombie for as long as we live. The
    tracer's wait on a leader it did not fork only hands it back to the real parent;
    when we *are* the parent, the leader is left for our own wait (a test's Popen).
    """
    skip_leader = _parent_of(fp.pid) == os.getpid()
    waiting = {t for t in tids if not (t == fp.pid and skip_leader)}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for tid in list(waiting):
            try:
                wpid, _ = os.waitpid(tid, os.WNOHANG | WALL)
            except ChildProcessError:
                waiting.discard(tid)
                continue
            if wpid:
                waiting.discard(tid)
        if waiting:
            time.sleep(0.001)


@contextmanager
def frozen(ident: ProcessIdentity, timeout: float = 5.0) -> Iterator[FrozenProcess]:
    """Freeze for the duration of the block; always thaws, also on exceptions and signals.

    SIGINT/SIGTERM/SIGHUP/SIGQUIT sent to us meanwhile are held until the thaw (blocked
    on this thread), so Ctrl-C cannot leave the target stopped.
    """
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
    try:
        fp = freeze(ident, timeout)
        try:
            yield fp
        finally:
            thaw(fp)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
