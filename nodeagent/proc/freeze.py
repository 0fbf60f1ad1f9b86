"""Freeze and thaw a process: PTRACE_SEIZE + PTRACE_INTERRUPT on every thread, PTRACE_DETACH.

Why ptrace and not SIGSTOP or the freezer cgroup: a ptrace stop is invisible to the
process's parent and job control, works on any process we may trace, and the kernel
releases every tracee when the tracer dies, so a crashed agent never leaves a process
stopped (DESIGN.md, step 2).

ptrace binds a tracee to the *thread* that seized it: freeze, every ptrace call made while
frozen (register reads, syscall injection) and thaw must run on the same OS thread.

Never left stopped (docs/decisions.md, "Freeze"): every seized thread is released on every
path. A thread that stopped is detached; one that could not stop in time (blocked in
vfork(), an uninterruptible wait) or died under us is held by nodeagent/proc/tracees.py until
it stops (detached at once) or dies (reaped). Signals stay as if we had never looked: a
signal-delivery stop seen while freezing is handed back on detach, and a group-stop
(SIGSTOP from someone else) before or during the freeze is what the thread returns to.
Threads that exit while we freeze are not errors; a zombie leader (pthread_exit) is
skipped and the process reached through a live thread (`FrozenProcess.pid`).
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ptrace.binding.func import ptrace
from ptrace.error import PtraceError

from cpcoord.errors import FreezeFailed, NoSuchProcess, PermissionDenied, ProcessExited
from nodeagent.proc import tracees
from nodeagent.proc.procfs import ProcessIdentity, check_alive, list_tasks
from nodeagent.proc.ptrace_abi import PTRACE_DETACH, PTRACE_INTERRUPT, PTRACE_SEIZE, WALL

# Signals that would kill or interrupt *us* while the target is stopped; they are blocked
# during the frozen window and delivered right after the thaw.
_DEFERRED_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
# While waiting for threads to stop: look at the stragglers' /proc state this often (a
# leader that exited under us never reports to a wait while its other threads run), and
# settle threads held from earlier freezes meanwhile.
_STRAGGLER_CHECK_S = 0.02
# Where a thread sleeps (its wchan) while vfork() waits for the child.
_VFORK_WAITS = ("kernel_clone", "wait_for_vfork_done")
# A thaw waits this long at most for threads it could not detach that are about to stop
# or die (a killed target); threads blocked in the kernel are left to tracees.poll().
_SETTLE_S = 2.0


@dataclass
class FrozenProcess:
    """A process whose every live thread is in a ptrace stop, held by the calling thread."""

    ident: ProcessIdentity
    tids: list[int] = field(default_factory=list)
    # Signals that stopped a thread before our interrupt did; re-injected on detach so the
    # target loses nothing.
    pending_signals: dict[int, int] = field(default_factory=dict)
    frozen_at: float = 0.0
    thawed: bool = False
    view: int = 0  # a stopped thread to reach the process through (0: the leader)

    @property
    def pid(self) -> int:
        """The pid through which /proc and process_vm_* reach the process: its own, or a
        live thread's while its leader is a zombie (`ident.pid` is its identity)."""
        return self.view or self.ident.pid


def _status_fields(pid: int, tid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        pass
    return out


def _tracer(fields: dict[str, str]) -> int:
    """The tracer's thread id (TracerPid names the tracing *thread*), 0 when untraced."""
    try:
        return int(fields.get("TracerPid", "0"))
    except ValueError:
        return 0


def _process_of(tid: int) -> int:
    """The process (thread group) a thread id belongs to, for messages."""
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return tid


def _exited(fields: dict[str, str]) -> bool:
    """The thread is gone or exiting past the point ptrace can attach (a zombie)."""
    return not fields or fields.get("State", "")[:1] in ("Z", "X")


def _refuse_if_traced(pid: int) -> None:
    """Another tracer (strace, gdb, another thread of ours) holds the process: refuse
    before touching anything. This thread's own hold (a leader that did not stop in an
    earlier freeze, nodeagent/proc/tracees.py) is taken back instead."""
    tracer = _tracer(_status_fields(pid, pid))
    if tracer and tracer != threading.get_native_id():
        raise PermissionDenied("freeze", pid, f"already traced by pid {_process_of(tracer)}")


def _seize(fp: FrozenProcess, tid: int) -> bool:
    """Seize and interrupt one thread, adding it to `fp.tids` the moment it is ours (so a
    failure right after still releases it); False when it already exited (or is exiting)."""
    held = tracees.adopt(tid)  # a thread held since an earlier freeze is still seized
    if held is None:
        try:
            ptrace(PTRACE_SEIZE, tid, 0, 0)
        except PtraceError as e:
            if e.errno == errno.ESRCH:
                return False
            if e.errno == errno.EPERM:
                # EPERM is also what an exiting thread (or the zombie leader of a live
                # process) answers: that thread is gone, not a refusal.
                fields = _status_fields(fp.ident.pid, tid)
                if _exited(fields):
                    return False
                tracer = _tracer(fields)
                why = (
                    f"already traced by pid {_process_of(tracer)}"
                    if tracer
                    else "ptrace not permitted"
                )
                raise PermissionDenied("freeze", fp.ident.pid, why) from None
            raise FreezeFailed(fp.ident.pid, f"PTRACE_SEIZE of thread {tid}: {e}") from None
    elif held.signal:
        fp.pending_signals[tid] = held.signal
    fp.tids.append(tid)
    try:
        ptrace(PTRACE_INTERRUPT, tid, 0, 0)
    except PtraceError as e:
        if e.errno == errno.ESRCH:
            return True  # exiting; its wait status tells
        raise FreezeFailed(fp.ident.pid, f"PTRACE_INTERRUPT of thread {tid}: {e}") from None
    return True


def _why_not_stopped(pid: int, tids: list[int]) -> str:
    parts = []
    for tid in sorted(tids)[:8]:
        state = _status_fields(pid, tid).get("State", "?")
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                wchan = f.read().strip()
        except OSError:
            wchan = ""
        where = f", in {wchan}" if wchan and wchan != "0" else ""
        if wchan in _VFORK_WAITS:
            where = ", blocked in vfork() until its child execs or exits"
        parts.append(f"{tid} ({state}{where})")
    more = f" and {len(tids) - 8} more" if len(tids) > 8 else ""
    return "threads " + ", ".join(parts) + more


def _wait_stopped(
    fp: FrozenProcess,
    tids: list[int],
    deadline: float,
    timeout: float,
    cancelled: Callable[[], bool] | None,
) -> list[int]:
    """Wait until each thread is in a ptrace stop; return those that exited instead."""
    waiting = set(tids)
    gone: list[int] = []
    spins = 0
    next_check = time.monotonic() + _STRAGGLER_CHECK_S
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
            waiting.discard(tid)
            if not os.WIFSTOPPED(status):  # exited or killed (reaped by this wait)
                gone.append(tid)
            elif status >> 16 == 0:
                # A signal-delivery stop came first (any signal, SIGTRAP too: a seized
                # tracee has no other event-less stop): the thread is stopped anyway;
                # keep the signal to hand back on detach.
                fp.pending_signals[tid] = os.WSTOPSIG(status)
            # else an event stop: our interrupt, or a group-stop it was in or entered.
        if not waiting:
            break
        now = time.monotonic()
        if now >= next_check:
            next_check = now + _STRAGGLER_CHECK_S
            tracees.poll()
            for tid in list(waiting):
                if _exited(_status_fields(fp.ident.pid, tid)):
                    # A zombie no wait reports yet (a leader whose threads run on): it is
                    # gone for this freeze, but still ours until it can be reaped.
                    waiting.discard(tid)
                    gone.append(tid)
                    tracees.hold(tid, fp.ident.pid)
            if cancelled is not None and cancelled():
                why = _why_not_stopped(fp.ident.pid, list(waiting))
                raise FreezeFailed(fp.ident.pid, f"aborted while {why} had not stopped")
        if now > deadline:
            why = _why_not_stopped(fp.ident.pid, list(waiting))
            raise FreezeFailed(fp.ident.pid, f"{why} did not stop within {timeout:g} s")
        spins += 1
        if spins > 50:
            time.sleep(0.0001)
        else:
            os.sched_yield()
    return gone


def freeze(
    ident: ProcessIdentity,
    timeout: float = 5.0,
    cancelled: Callable[[], bool] | None = None,
) -> FrozenProcess:
    """Stop every live thread of the process; loop until no new thread appears.

    Threads are listed, seized and interrupted; once all listed threads are stopped none
    of them can create another, so a listing that shows no new thread is final. Raises
    PermissionDenied before touching a process another tracer holds, FreezeFailed when a
    thread does not stop within `timeout` or `cancelled()` turns true meanwhile; on any
    failure every thread seized so far is released (or held until it can be).
    """
    ident.check()
    tracees.poll()
    _refuse_if_traced(ident.pid)
    fp = FrozenProcess(ident)
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                tids = list_tasks(ident.pid)
            except NoSuchProcess:
                raise ProcessExited(ident.pid, "freeze") from None
            new = [t for t in tids if t not in seen]
            if not new:
                break
            seen.update(new)
            got = [t for t in new if _seize(fp, t)]
            for t in _wait_stopped(fp, got, deadline, timeout, cancelled):
                fp.tids.remove(t)
                fp.pending_signals.pop(t, None)
        if not fp.tids:
            raise ProcessExited(ident.pid, "freeze")
        ident.check()
        if ident.pid not in fp.tids:  # its leader exited: is anything left but zombies?
            check_alive(ident, "freeze")
    except BaseException:
        thaw(fp)
        raise
    fp.view = 0 if ident.pid in fp.tids else min(fp.tids)
    fp.frozen_at = time.monotonic()
    return fp


def thaw(fp: FrozenProcess) -> None:
    """Detach from every thread (re-injecting signals that arrived while frozen); a thread
    not in a ptrace stop is held until it stops or dies (nodeagent/proc/tracees.py)."""
    if fp.thawed:
        return
    fp.thawed = True
    left: list[int] = []
    for tid in fp.tids:
        sig = fp.pending_signals.get(tid, 0)
        try:
            ptrace(PTRACE_DETACH, tid, 0, sig)
        except PtraceError:
            # Not in a ptrace stop: killed while frozen, or never stopped in time.
            tracees.hold(tid, fp.ident.pid, sig)
            left.append(tid)
    if left:
        _settle(fp, left)


def _settling(pid: int, tid: int) -> bool:
    """Whether a held thread is about to stop or be reapable (running, stopping, dead),
    rather than blocked in the kernel or a zombie leader whose threads run on."""
    state = _status_fields(pid, tid).get("State", "X")[:1]
    if state in ("Z", "X"):
        return not (tid == pid and _live_others(pid))
    return state in ("R", "t", "T")


def _live_others(pid: int) -> bool:
    try:
        tids = list_tasks(pid)
    except NoSuchProcess:
        return False
    return any(t != pid and not _exited(_status_fields(pid, t)) for t in tids)


def _settle(fp: FrozenProcess, left: list[int]) -> None:
    """Give threads a thaw could not detach a moment to stop or die, and settle them.

    A target killed while frozen: its traced threads stay zombies until we, the tracer,
    reap them, and its leader cannot be reaped by its parent before every thread is;
    without this a caller with no poll loop (the CLI, a test) would leave them behind.
    """
    deadline = time.monotonic() + _SETTLE_S
    while True:
        tracees.poll()
        held = set(tracees.held())
        mine = [t for t in left if t in held]
        if not mine or not any(_settling(fp.ident.pid, t) for t in mine):
            return
        if time.monotonic() > deadline:
            return
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
