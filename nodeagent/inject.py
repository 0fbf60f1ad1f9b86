"""Run system calls inside a frozen process, over ptrace, on one of its threads (x86-64).

Owns the injection session (`Injector`): pick a thread, save its registers, find a
`syscall` instruction in the target (the first `0f 05` in its [vdso]; else, like CRIU's
compel, poke one over the first word of an executable mapping and put it back), run
chosen system calls there one at a time, and restore the thread exactly.

One call: the saved registers with rip = the instruction, rax = the number, the six
argument registers and orig_rax = -1 are set, and the thread single-steps that one
instruction; the kernel stops it right after the call returns (a SIGTRAP signal-delivery
stop, rip = site + 2) with the result in rax. Nothing after the instruction runs.

Restart semantics (docs/uffd-wp.md, "Injection"): a frozen thread stops inside
get_signal(); a call it was blocked in has returned -ERESTART* with orig_rax naming it,
and the kernel restarts it only when get_signal() returns, from the registers it finds
then. Our calls run with orig_rax = -1, touch no restart_block, and end in another stop
inside get_signal(), where the saved registers are put back: the interrupted call
restarts (or returns EINTR) exactly as after the freeze alone.

Signals dequeued by the stepped thread meanwhile are held and handed back (the first
through its last stop, the others queued again). A thread inside its rseq critical
section is never chosen. Every call must come from the thread that froze the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import struct
import time
from dataclasses import dataclass
from types import TracebackType

from ptrace.binding.func import ptrace
from ptrace.binding.linux_struct import user_regs_struct
from ptrace.error import PtraceError

from cpcoord.errors import (
    InjectionFailed,
    NoSuchProcess,
    ProcessExited,
    TrackerUnavailable,
)
from nodeagent.freeze import FrozenProcess
from nodeagent.procfs import read_maps

log = logging.getLogger(__name__)

PTRACE_PEEKDATA = 2
PTRACE_POKEDATA = 5
PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETSIGINFO = 0x4202
PTRACE_SETSIGINFO = 0x4203
PTRACE_INTERRUPT = 0x4207
PTRACE_EVENT_STOP = 128
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
PTRACE_O_SUSPEND_SECCOMP = 1 << 21
WALL = 0x40000000
USER_CS_64 = 0x33  # the 64-bit user code segment; 0x23 is a 32-bit (compat) task
SYSCALL_INSN = b"\x0f\x05"
NR_RT_TGSIGQUEUEINFO = 297
NR_TGKILL = 234
# Results a system call returns when a signal interrupted it before it did anything.
_RESTART = {512, 513, 514, 516}
_U64 = (1 << 64) - 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
# A found syscall site per process (pid, start time); verified by reading it back.
_sites: dict[tuple[int, int], int] = {}


def get_regs(tid: int) -> user_regs_struct:
    regs = user_regs_struct()
    ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def set_regs(tid: int, regs: user_regs_struct) -> None:
    ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))


def regs_dict(regs: user_regs_struct) -> dict[str, int]:
    return {name: int(getattr(regs, name)) for name, _ in user_regs_struct._fields_}


def _copy(regs: user_regs_struct) -> user_regs_struct:
    out = user_regs_struct()
    ctypes.memmove(ctypes.addressof(out), ctypes.addressof(regs), ctypes.sizeof(regs))
    return out


def _siginfo(tid: int) -> bytes:
    buf = ctypes.create_string_buffer(128)
    ptrace(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(buf))
    return buf.raw


def _seccomp_mode(pid: int, tid: int) -> int:
    # Per thread: a filter installed by one thread (without TSYNC) binds only that one.
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class HeldSignal:
    sig: int
    info: bytes  # the 128-byte siginfo the kernel had for it


class Injector:
    """An injection session on one thread of a frozen process (a context manager)."""

    def __init__(
        self,
        fp: FrozenProcess,
        *,
        tid: int | None = None,
        site: str = "auto",  # "auto" (vdso, else poke), "vdso", "poke"
        timeout: float = 2.0,
    ) -> None:
        if fp.thawed:
            raise InjectionFailed(fp.pid, "setup", "the process is not frozen")
        self.fp = fp
        self.pid = fp.pid
        self.timeout = timeout
        self._want_tid = tid
        self._site_mode = site
        self.tid = 0
        self.site = 0
        self.saved = user_regs_struct()
        self.saved_siginfo: bytes | None = None
        self.held: list[HeldSignal] = []
        self.calls = 0
        self._poked: tuple[int, int] | None = None  # (address, original word)
        self._scratch: tuple[int, int] | None = None  # (address, length)
        self._options_set = False
        self._mem = -1
        self._open = False

    # -- session -----------------------------------------------------------------

    def __enter__(self) -> Injector:
        self.open()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open(self) -> None:
        try:
            self._mem = os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            raise ProcessExited(self.pid, "syscall injection") from None
        try:
            self._pick_thread()
            if self.tid in self.fp.pending_signals:
                self.saved_siginfo = _siginfo(self.tid)
            self._open = True
            if _seccomp_mode(self.pid, self.tid):
                self._suspend_seccomp()
            self.site = self._find_site()
        except BaseException:
            self.close()
            raise

    def _pick_thread(self) -> None:
        tids = list(self.fp.tids)
        if self._want_tid is not None:
            tids = [self._want_tid]
        else:
            # The leader first, then threads stopped without a signal of their own.
            tids.sort(key=lambda t: (t in self.fp.pending_signals, t != self.pid))
        for tid in tids:
            try:
                regs = get_regs(tid)
            except PtraceError as e:
                if e.errno == errno.ESRCH:
                    continue  # exited while frozen
                raise InjectionFailed(self.pid, "PTRACE_GETREGS", str(e)) from None
            if regs.cs != USER_CS_64:
                raise TrackerUnavailable("uffd-wp", f"pid {self.pid} is not a 64-bit process")
            if self._in_rseq_cs(tid, int(regs.rip)):
                continue  # our rip would make the kernel drop its rseq critical section
            self.tid, self.saved = tid, regs
            return
        raise InjectionFailed(self.pid, "setup", "no thread is usable (exited or inside rseq)")

    def _in_rseq_cs(self, tid: int, rip: int) -> bool:
        """True when rip lies inside the thread's registered rseq critical section."""
        conf = (ctypes.c_uint64 * 3)()
        try:
            ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, 24, ctypes.addressof(conf))
        except PtraceError:
            return False  # kernel < 5.13: cannot tell, and rseq users were rare then
        if not conf[0]:
            return False
        (cs,) = struct.unpack("<Q", self.read(int(conf[0]) + 8, 8))
        if not cs:
            return False
        _v, _f, start, length, _abort = struct.unpack("<IIQQQ", self.read(cs, 32))
        return bool(start <= rip < start + length)

    def _suspend_seccomp(self) -> None:
        # A seccomp filter may forbid userfaultfd or mmap, or kill the target for them.
        try:
            ptrace(PTRACE_SETOPTIONS, self.tid, 0, PTRACE_O_SUSPEND_SECCOMP)
        except PtraceError as e:
            raise TrackerUnavailable(
                "uffd-wp",
                f"pid {self.pid} runs under seccomp and PTRACE_O_SUSPEND_SECCOMP failed ({e})",
            ) from None
        self._options_set = True

    def _find_site(self) -> int:
        key = (self.pid, self.fp.ident.start_time)
        cached = _sites.get(key) if self._site_mode != "poke" else None
        if cached is not None and self._peek_bytes(cached, 2) == SYSCALL_INSN:
            return cached
        try:
            maps = read_maps(self.pid)
        except NoSuchProcess:
            raise ProcessExited(self.pid, "syscall injection") from None
        if self._site_mode in ("auto", "vdso"):
            for m in maps:
                if m.path == "[vdso]":
                    at = self.read(m.start, m.size).find(SYSCALL_INSN)
                    if at >= 0:
                        if len(_sites) > 4096:  # pids come and go: never let it grow
                            _sites.clear()
                        _sites[key] = m.start + at
                        return m.start + at
            if self._site_mode == "vdso":
                raise InjectionFailed(self.pid, "setup", "no syscall instruction in [vdso]")
        for m in maps:
            if "x" in m.perms and m.readable and not m.path.startswith("["):
                word = self._peekdata(m.start)
                self._poked = (m.start, word)
                self._pokedata(m.start, (word & ~0xFFFF) | 0x050F)
                return m.start
        raise InjectionFailed(self.pid, "setup", "no executable mapping to hold a syscall")

    def close(self) -> None:
        """Free the scratch memory, put back code, registers, signals; idempotent."""
        if self._open:
            try:
                self._restore()
            except (ProcessExited, NoSuchProcess):
                pass
            finally:
                self._open = False
        if self._mem >= 0:
            os.close(self._mem)
            self._mem = -1

    def _restore(self) -> None:
        if self._scratch is not None:
            addr, length = self._scratch
            self._scratch = None
            try:
                self.check("munmap", 11, addr, length)
            except InjectionFailed as e:
                log.warning(
                    "scratch not unmapped", extra={"fields": {"pid": self.pid, "error": str(e)}}
                )
        try:
            if self._poked is not None:
                self._pokedata(*self._poked)
                self._poked = None
            set_regs(self.tid, self.saved)
            if self.calls:
                self._hand_back_signals()
            if self._options_set:
                ptrace(PTRACE_SETOPTIONS, self.tid, 0, 0)
            if self.calls:
                self._park()
        except PtraceError as e:
            if e.errno == errno.ESRCH:
                raise ProcessExited(self.pid, "syscall injection") from None
            raise InjectionFailed(self.pid, "restore", str(e)) from None

    def _hand_back_signals(self) -> None:
        """The thread now sits in our last SIGTRAP stop; make the thaw deliver what the
        original stop (or a signal caught while stepping) would have delivered."""
        held = list(self.held)
        info: bytes | None = None
        if self.saved_siginfo is not None:
            info = self.saved_siginfo  # fp.pending_signals[tid] already names it
        elif held:
            first = held.pop(0)
            info = first.info
            self.fp.pending_signals[self.tid] = first.sig
        if info is not None:
            buf = ctypes.create_string_buffer(info, 128)
            ptrace(PTRACE_SETSIGINFO, self.tid, 0, ctypes.addressof(buf))
        for h in held:
            self._requeue(h)

    def _park(self) -> None:
        """Leave the stepped thread in an interrupt stop with single-stepping off, as
        freeze left it.

        After the last step it sits in our SIGTRAP stop with the trap flag forced on.
        PTRACE_DETACH clears both, but a tracer that *dies* does not (exit_ptrace skips
        ptrace_disable): the target would take a SIGTRAP at its next system call return
        and die. A dead agent must never take a member down, so the thread resumes with
        no signal (which disables single-stepping) straight into a pending interrupt
        stop, inside get_signal() still: registers and restart state are unchanged. A
        signal the thaw was to hand back is queued again instead.
        """
        sig = self.fp.pending_signals.pop(self.tid, 0)
        if sig:
            self._requeue(HeldSignal(sig, _siginfo(self.tid)))
        ptrace(PTRACE_INTERRUPT, self.tid, 0, 0)
        ptrace(PTRACE_CONT, self.tid, 0, 0)
        status = self._wait()
        if (status >> 16) != PTRACE_EVENT_STOP:
            # A signal arrived first: a signal-delivery stop, handed back at the thaw.
            self.fp.pending_signals[self.tid] = os.WSTOPSIG(status)

    def _requeue(self, h: HeldSignal) -> None:
        buf = ctypes.create_string_buffer(h.info, 128)
        r = _libc.syscall(NR_RT_TGSIGQUEUEINFO, self.pid, self.tid, h.sig, buf)
        if r < 0:  # the kernel refuses si_code >= 0 from another process: plain tgkill
            _libc.syscall(NR_TGKILL, self.pid, self.tid, h.sig)
        log.info("signal requeued", extra={"fields": {"pid": self.pid, "signal": h.sig}})

    # -- memory ------------------------------------------------------------------

    def read(self, addr: int, n: int) -> bytes:
        try:
            return os.pread(self._mem, n, addr)
        except OSError as e:
            raise InjectionFailed(self.pid, f"read at 0x{addr:x}", e.strerror) from None

    def write(self, addr: int, data: bytes) -> None:
        try:
            done = os.pwrite(self._mem, data, addr)
        except OSError as e:
            raise InjectionFailed(self.pid, f"write at 0x{addr:x}", e.strerror) from None
        if done != len(data):
            raise InjectionFailed(self.pid, f"write at 0x{addr:x}", "short write")

    def _peek_bytes(self, addr: int, n: int) -> bytes:
        with contextlib.suppress(InjectionFailed):
            return self.read(addr, n)
        return b""

    def _peekdata(self, addr: int) -> int:
        try:
            return int(ptrace(PTRACE_PEEKDATA, self.tid, addr, 0, check_errno=True)) & _U64
        except PtraceError as e:
            raise InjectionFailed(self.pid, f"PEEKDATA 0x{addr:x}", str(e)) from None

    def _pokedata(self, addr: int, word: int) -> None:
        ptrace(PTRACE_POKEDATA, self.tid, addr, word & _U64)

    def scratch(self, length: int = 4096) -> int:
        """A private read-write mapping in the target, unmapped when the session ends."""
        if self._scratch is None:
            addr = self.check("mmap", 9, 0, length, 3, 0x22, _U64, 0)
            self._scratch = (addr, length)
        return self._scratch[0]

    # -- system calls ------------------------------------------------------------

    def syscall(self, nr: int, *args: int) -> int:
        """Run one system call in the target; returns rax as a signed number
        (-errno on failure). Interrupted calls (-ERESTART*) are run again."""
        if not self._open:
            raise InjectionFailed(self.pid, f"syscall {nr}", "session is closed")
        if len(args) > 6:
            raise ValueError("at most 6 arguments")
        a = [int(x) & _U64 for x in args] + [0] * (6 - len(args))
        regs = _copy(self.saved)
        regs.rip, regs.rax, regs.orig_rax = self.site, nr, _U64
        regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9 = a
        for _ in range(100):
            rax = self._step(regs)
            self.calls += 1
            res = rax - (1 << 64) if rax >> 63 else rax
            if -res not in _RESTART:
                return res
        raise InjectionFailed(self.pid, f"syscall {nr}", "interrupted 100 times")

    def check(self, name: str, nr: int, *args: int) -> int:
        """syscall(), raising InjectionFailed(name, strerror) on a negative result."""
        res = self.syscall(nr, *args)
        if res < 0:
            raise InjectionFailed(self.pid, name, os.strerror(-res))
        return res

    def _step(self, regs: user_regs_struct) -> int:
        tid = self.tid
        try:
            set_regs(tid, regs)
            while True:
                ptrace(PTRACE_SINGLESTEP, tid, 0, 0)
                status = self._wait()
                if (status >> 16) != 0:
                    continue  # a group stop or interrupt stop: step on
                sig = os.WSTOPSIG(status)
                info = _siginfo(tid)
                si_code = struct.unpack_from("<i", info, 8)[0]
                if sig == signal.SIGTRAP and si_code > 0:  # a trap the kernel made: ours
                    now = get_regs(tid)
                    if now.rip == self.site + 2:
                        return int(now.rax)
                    if now.rip != self.site:
                        raise InjectionFailed(self.pid, "step", f"thread stopped at 0x{now.rip:x}")
                    continue
                self.held.append(HeldSignal(sig, info))
        except PtraceError as e:
            if e.errno == errno.ESRCH:
                raise ProcessExited(self.pid, "syscall injection") from None
            raise InjectionFailed(self.pid, "step", str(e)) from None

    def _wait(self) -> int:
        deadline = time.monotonic() + self.timeout
        spins = 0
        interrupted = False
        while True:
            try:
                wpid, status = os.waitpid(self.tid, os.WNOHANG | WALL)
            except ChildProcessError:
                raise ProcessExited(self.pid, "syscall injection") from None
            if wpid:
                if os.WIFSTOPPED(status):
                    if interrupted:
                        raise InjectionFailed(self.pid, "step", "system call did not return")
                    return status
                raise ProcessExited(self.pid, "syscall injection")
            if time.monotonic() > deadline:
                if interrupted:
                    raise InjectionFailed(self.pid, "step", "thread lost: did not stop")
                # Stop it where it is so close() can still put its registers back.
                ptrace(PTRACE_INTERRUPT, self.tid, 0, 0)
                interrupted, deadline = True, time.monotonic() + self.timeout
            spins += 1
            if spins > 200:
                time.sleep(0.00005)
            else:
                os.sched_yield()
