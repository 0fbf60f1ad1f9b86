"""Threads the calling thread still traces after a thaw could not release them.

PTRACE_DETACH works only on a tracee in a ptrace stop. A seized thread that had not
stopped when we let go (blocked in vfork() or another uninterruptible wait, exiting, or a
leader that called pthread_exit while we held it) stays ours: its PTRACE_INTERRUPT is
still pending, so it stops in state `t` the moment it returns to user space, and nobody
would ever detach it; or it dies and stays a zombie that only its tracer may reap (and
its process's leader with it, which its parent then cannot reap either).

So every thread a thaw cannot detach is *held* here, per tracer thread (ptrace binds a
tracee to the thread that seized it), and `poll()` settles each as soon as it can:
detached the moment it stops (re-injecting a signal it stopped for, so nothing is lost,
and leaving a group-stop to the kernel, which puts the thread back into it), reaped when
it died (which hands a leader's exit back to its real parent). The owner calls `poll()`
between operations and on a short timer (`next_poll()`); a new freeze of the same process
takes its held threads back instead of failing to seize them. When the tracer thread
ends, the kernel detaches whatever is still held and drops the pending trap with it
(exit_ptrace), so a held thread never outlives its tracer's thread either.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from ptrace.binding.func import ptrace
from ptrace.error import PtraceError

from nodeagent.proc.ptrace_abi import PTRACE_DETACH, WALL

# Poll fast while a held thread is new (most stop or die within moments), then slower:
# a leader that exited under us stays held for as long as its other threads run.
FAST_POLL_S = 0.01
SLOW_POLL_S = 0.1
FAST_FOR_S = 2.0
_EXITED = (os.CLD_EXITED, os.CLD_KILLED, os.CLD_DUMPED)
_PEEK = os.WEXITED | os.WSTOPPED | os.WNOHANG | os.WNOWAIT | WALL


@dataclass
class Held:
    tid: int
    pid: int  # its process (the thread group's leader)
    signal: int  # to hand back on detach: a signal-delivery stop seen while frozen
    since: float  # monotonic


class _Registry(threading.local):
    def __init__(self) -> None:
        self.held: dict[int, Held] = {}


_reg = _Registry()


def hold(tid: int, pid: int, signal: int = 0) -> None:
    """Keep `tid` (traced by the calling thread, not in a ptrace stop) until it stops or dies."""
    _reg.held.setdefault(tid, Held(tid, pid, signal, time.monotonic()))


def adopt(tid: int) -> Held | None:
    """Take a held thread back (a new freeze of its process): it is still seized."""
    return _reg.held.pop(tid, None)


def held() -> list[int]:
    """Thread ids the calling thread still holds."""
    return sorted(_reg.held)


def next_poll(now: float | None = None) -> float | None:
    """Seconds until the calling thread should `poll()` again; None when it holds nothing."""
    if not _reg.held:
        return None
    now = time.monotonic() if now is None else now
    young = any(now - h.since < FAST_FOR_S for h in _reg.held.values())
    return FAST_POLL_S if young else SLOW_POLL_S


def poll() -> int:
    """Detach every held thread that stopped, reap every one that died; never blocks.
    Returns how many are still held."""
    for tid, h in list(_reg.held.items()):
        if _settle(h):
            del _reg.held[tid]
    return len(_reg.held)


def parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _settle(h: Held) -> bool:
    """True when `h` is no longer ours: detached, reaped, or never ours any more."""
    if h.tid == h.pid and parent_of(h.pid) == os.getpid():
        # We are also its parent (a test's child): a wait would reap it for good and
        # steal the exit status from the parent's own wait (a Popen's). Look first.
        try:
            info = os.waitid(os.P_PID, h.tid, _PEEK)
        except ChildProcessError:
            return True
        if info is None:
            return False
        if info.si_code in _EXITED:
            return True  # the parent's own wait collects it; the ptrace link goes with it
    try:
        wpid, status = os.waitpid(h.tid, os.WNOHANG | WALL)
    except ChildProcessError:
        return True
    if wpid == 0:
        return False
    if not os.WIFSTOPPED(status):
        return True  # exited: reaped, or its exit handed back to its parent
    # A signal-delivery stop (no event) carries a signal the thread must still get; an
    # event stop (our interrupt, or a group-stop the kernel restores on detach) does not.
    sig = os.WSTOPSIG(status) if status >> 16 == 0 else h.signal
    try:
        ptrace(PTRACE_DETACH, h.tid, 0, sig)
    except PtraceError:
        return False  # killed meanwhile: the next poll reaps it
    return True
