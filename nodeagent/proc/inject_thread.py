"""The thread an injection session runs on, and its signal and stop state as the session
saves, blocks and puts it back (x86-64).

Owns: which thread of a frozen process a session runs on; a thread's blocked-signal
mask and the siginfo of its stop, which interrupted calls swap the mask (so it can be
blocked only after the first injected call), its seccomp mode, whether an address lies
in its rseq critical section, queueing a held signal again, and waiting for its next
ptrace stop under a deadline. `inject.Injector` composes these; see its header for why
every signal is blocked for a session.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from ptrace.binding.func import ptrace
from ptrace.binding.linux_struct import user_regs_struct
from ptrace.error import PtraceError

from cpcoord.errors import InjectionFailed, ProcessExited, TrackerUnavailable
from nodeagent.proc.freeze import FrozenProcess
from nodeagent.proc.ptrace_abi import (
    PTRACE_GET_RSEQ_CONFIGURATION,
    PTRACE_GETSIGINFO,
    PTRACE_GETSIGMASK,
    PTRACE_INTERRUPT,
    PTRACE_SETSIGMASK,
    U64,
    WALL,
    get_regs,
)

log = logging.getLogger("nodeagent.proc.inject")

USER_CS_64 = 0x33  # the 64-bit user code segment; 0x23 is a 32-bit (compat) task
NR_RT_TGSIGQUEUEINFO = 297
NR_TGKILL = 234
# Calls that install a temporary signal mask and leave TIF_RESTORE_SIGMASK set when
# interrupted: the kernel puts the caller's mask back when get_signal() next returns.
# PTRACE_SETSIGMASK clears that flag, so such a thread's mask is read after its first call.
MASK_SWAPPING = {
    130,  # rt_sigsuspend
    270,  # pselect6
    271,  # ppoll
    281,  # epoll_pwait
    333,  # io_pgetevents
    426,  # io_uring_enter
    441,  # epoll_pwait2
}
SIGSET_SIZE = 8  # the kernel's sigset_t on x86-64
ALL_SIGNALS = U64  # SIGKILL and SIGSTOP cannot be blocked; the kernel drops them

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class HeldSignal:
    sig: int
    info: bytes  # the 128-byte siginfo the kernel had for it


def choose_thread(
    fp: FrozenProcess, want: int | None, read: Callable[[int, int], bytes]
) -> tuple[int, user_regs_struct]:
    """The thread (tid, its saved registers) a session runs on: `want` if given, else
    the best of the frozen process's threads; none inside its rseq critical section.
    `read(addr, n)` reads the target's memory."""
    pid = fp.pid
    tids = [want] if want is not None else list(fp.tids)
    usable: list[tuple[tuple[bool, bool, bool], int, user_regs_struct]] = []
    for tid in tids:
        try:
            regs = get_regs(tid)
        except PtraceError as e:
            if e.errno == errno.ESRCH:
                continue  # exited while frozen
            raise InjectionFailed(pid, "PTRACE_GETREGS", str(e)) from None
        if regs.cs != USER_CS_64:
            raise TrackerUnavailable("uffd-wp", f"pid {pid} is not a 64-bit process")
        if in_rseq_cs(tid, int(regs.rip), read):
            continue  # our rip would make the kernel drop its rseq critical section
        # Best first: a thread whose mask can be blocked at once, stopped without a
        # signal of its own, the leader.
        key = (swaps_mask(regs), tid in fp.pending_signals, tid != pid)
        usable.append((key, tid, regs))
    if not usable:
        raise InjectionFailed(pid, "setup", "no thread is usable (exited or inside rseq)")
    _, tid, regs = min(usable, key=lambda u: u[0])
    return tid, regs


def get_sigmask(tid: int) -> int:
    """The thread's blocked signals (bit n-1 = signal n), as /proc's SigBlk shows them."""
    mask = ctypes.c_uint64()
    ptrace(PTRACE_GETSIGMASK, tid, SIGSET_SIZE, ctypes.addressof(mask))
    return int(mask.value)


def set_sigmask(tid: int, mask: int) -> None:
    m = ctypes.c_uint64(mask & U64)
    ptrace(PTRACE_SETSIGMASK, tid, SIGSET_SIZE, ctypes.addressof(m))


def siginfo(tid: int) -> bytes:
    buf = ctypes.create_string_buffer(128)
    ptrace(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(buf))
    return buf.raw


def seccomp_mode(pid: int, tid: int) -> int:
    # Per thread: a filter installed by one thread (without TSYNC) binds only that one.
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    return 0


def swaps_mask(regs: user_regs_struct) -> bool:
    """Whether the thread stopped on its way out of a call that may leave its mask to be
    put back by the kernel (MASK_SWAPPING)."""
    return int(regs.orig_rax) in MASK_SWAPPING


def in_rseq_cs(tid: int, rip: int, read: Callable[[int, int], bytes]) -> bool:
    """True when rip lies inside the thread's registered rseq critical section; `read`
    reads the target's memory."""
    conf = (ctypes.c_uint64 * 3)()
    try:
        ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, 24, ctypes.addressof(conf))
    except PtraceError:
        return False  # kernel < 5.13: cannot tell, and rseq users were rare then
    if not conf[0]:
        return False
    (cs,) = struct.unpack("<Q", read(int(conf[0]) + 8, 8))
    if not cs:
        return False
    _v, _f, start, length, _abort = struct.unpack("<IIQQQ", read(cs, 32))
    return bool(start <= rip < start + length)


def requeue(pid: int, tid: int, h: HeldSignal) -> None:
    """Queue a held signal again on the thread, with its siginfo when the kernel lets us."""
    buf = ctypes.create_string_buffer(h.info, 128)
    r = _libc.syscall(NR_RT_TGSIGQUEUEINFO, pid, tid, h.sig, buf)
    if r < 0:  # the kernel refuses si_code >= 0 from another process: plain tgkill
        _libc.syscall(NR_TGKILL, pid, tid, h.sig)
    log.info("signal requeued", extra={"fields": {"pid": pid, "signal": h.sig}})


def wait_stop(pid: int, tid: int, timeout: float) -> int:
    """The wait status of the thread's next stop. A thread that does not stop within
    `timeout` is interrupted where it is (so its registers can still be put back) and
    the call fails; a thread that is gone raises ProcessExited."""
    deadline = time.monotonic() + timeout
    spins = 0
    interrupted = False
    while True:
        try:
            wpid, status = os.waitpid(tid, os.WNOHANG | WALL)
        except ChildProcessError:
            raise ProcessExited(pid, "syscall injection") from None
        if wpid:
            if os.WIFSTOPPED(status):
                if interrupted:
                    raise InjectionFailed(pid, "syscall", "system call did not return")
                return status
            raise ProcessExited(pid, "syscall injection")
        if time.monotonic() > deadline:
            if interrupted:
                raise InjectionFailed(pid, "syscall", "thread lost: did not stop")
            # Stop it where it is so close() can still put its registers back.
            ptrace(PTRACE_INTERRUPT, tid, 0, 0)
            interrupted, deadline = True, time.monotonic() + timeout
        spins += 1
        if spins > 200:
            time.sleep(0.00005)
        else:
            os.sched_yield()
