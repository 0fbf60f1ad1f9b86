"""Run system calls inside a frozen process, over ptrace, on one of its threads (x86-64).

Owns the injection session (`Injector`): pick a thread, save its registers and signal
mask, find a `syscall` instruction in the target (the first `0f 05` in its [vdso]; else,
like CRIU's compel, poke one over the first word of an executable mapping and put it
back), run chosen system calls there one at a time, and restore the thread exactly.

One call: the saved registers with rip = the instruction, rax = the number, the six
argument registers and orig_rax = -1 are set, and the thread is resumed with
PTRACE_SYSCALL: it stops at the call's entry and again at its exit (syscall-stops,
WSTOPSIG = SIGTRAP | 0x80 with PTRACE_O_TRACESYSGOOD), with the result in rax. Nothing
after the instruction runs. No single-stepping and no breakpoint: a trap the kernel
*sends* (force_sig(SIGTRAP) after a single step or an int3) unblocks SIGTRAP and resets a
handler of it to SIG_DFL when the thread blocks or ignores it, so a program that blocks
and handles SIGTRAP would be killed by its next one (docs/uffd-wp.md, "Injection").
A syscall-stop is a ptrace stop, not a signal: nothing of the thread's signal state moves.

Signals: for the session every signal is blocked in the stepped thread (PTRACE_SETSIGMASK),
so it dequeues nothing; the mask is put back at the end. A signal the thread had already
dequeued when the freeze stopped it is handed back to the kernel by resuming with it while
it is blocked (the kernel queues it again, siginfo and target unchanged). The one thread
kind that cannot be blocked up front is one interrupted in a call that swaps the mask
(sigsuspend, ppoll, pselect6, epoll_pwait...: PTRACE_SETSIGMASK would drop the mask the
call must put back); it is chosen last, blocked after its first call, and what it
dequeues meanwhile is held and queued again at the end.

Restart semantics (docs/uffd-wp.md, "Injection"): a frozen thread stops inside
get_signal(); a call it was blocked in has returned -ERESTART* with orig_rax naming it,
and the kernel restarts it only when get_signal() returns, from the registers it finds
then. Our calls run with orig_rax = -1, touch no restart_block, and the thread is parked
again in an interrupt stop inside get_signal() with the saved registers: the interrupted
call restarts (or returns EINTR) exactly as after the freeze alone. A thread inside its
rseq critical section is never chosen. Every call must come from the thread that froze
the process.

Which thread is chosen, and its signal and stop state, is `inject_thread`'s business;
where the `syscall` instruction is found, `inject_site`'s.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
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
from nodeagent.proc import inject_site
from nodeagent.proc.freeze import FrozenProcess
from nodeagent.proc.inject_thread import (
    ALL_SIGNALS,
    HeldSignal,
    choose_thread,
    get_sigmask,
    requeue,
    seccomp_mode,
    set_sigmask,
    siginfo,
    swaps_mask,
    wait_stop,
)
from nodeagent.proc.procfs import read_maps
from nodeagent.proc.ptrace_abi import (
    PTRACE_CONT,
    PTRACE_EVENT_STOP,
    PTRACE_INTERRUPT,
    PTRACE_O_SUSPEND_SECCOMP,
    PTRACE_O_TRACESYSGOOD,
    PTRACE_PEEKDATA,
    PTRACE_POKEDATA,
    PTRACE_SETOPTIONS,
    PTRACE_SYSCALL,
    RESTART_CODES,
    U64,
    copy_regs,
    get_regs,
    set_regs,
)

log = logging.getLogger(__name__)

SEIZE_OPTIONS = 0
SYSCALL_STOP = signal.SIGTRAP | 0x80


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
        self.saved_mask: int | None = None  # the mask to put back; None: not read yet
        self._blocked = False  # every signal blocked in the thread (we set it)
        self._stop_sig: HeldSignal | None = None  # the signal of the stop we found
        self.held: list[HeldSignal] = []  # signals dequeued by the thread meanwhile
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
            self.tid, self.saved = choose_thread(self.fp, self._want_tid, self.read)
            self._open = True
            self._set_options()
            self._block_signals()
            self.site = self._find_site()
        except PtraceError as e:
            self.close()
            if e.errno == errno.ESRCH:
                raise ProcessExited(self.pid, "syscall injection") from None
            raise InjectionFailed(self.pid, "setup", str(e)) from None
        except BaseException:
            self.close()
            raise

    def _set_options(self) -> None:
        """TRACESYSGOOD, so a syscall-stop never looks like a SIGTRAP; and, under seccomp
        (a filter may forbid userfaultfd or mmap, or kill the target for them), the
        filters suspended for our calls."""
        opts = PTRACE_O_TRACESYSGOOD
        if seccomp_mode(self.pid, self.tid):
            opts |= PTRACE_O_SUSPEND_SECCOMP
        try:
            ptrace(PTRACE_SETOPTIONS, self.tid, 0, opts)
        except PtraceError as e:
            if e.errno == errno.ESRCH:
                raise
            raise TrackerUnavailable(
                "uffd-wp",
                f"pid {self.pid} runs under seccomp and PTRACE_O_SUSPEND_SECCOMP failed ({e})",
            ) from None
        self._options_set = True

    def _block_signals(self) -> None:
        """Block every signal in the thread for the session (none is dequeued, so none
        is delivered at our fake registers). A signal the freeze found the thread
        dequeuing (its signal-delivery stop) goes back on the first resume."""
        pending = self.fp.pending_signals.pop(self.tid, 0)
        if pending:
            self._stop_sig = HeldSignal(pending, siginfo(self.tid))
        if swaps_mask(self.saved):
            return  # its true mask is known only once the kernel has put it back
        self.saved_mask = get_sigmask(self.tid)
        set_sigmask(self.tid, ALL_SIGNALS)
        self._blocked = True

    def _first_resume_signal(self) -> int:
        """The data of the first resume: the stop's own signal while it is blocked (the
        kernel then queues it again itself, siginfo and target unchanged, and delivers
        it after the thaw); else 0, and it is held and queued again at the end."""
        h, self._stop_sig = self._stop_sig, None
        if h is None:
            return 0
        if self._blocked:
            return h.sig
        self.held.append(h)
        return 0

    def _find_site(self) -> int:
        key = (self.pid, self.fp.ident.start_time)
        known = inject_site.cached(key) if self._site_mode != "poke" else None
        if known is not None and self._peek_bytes(known, 2) == inject_site.SYSCALL_INSN:
            return known
        if self._site_mode in ("auto", "vdso"):
            at = inject_site.vdso_site(self.pid, self._peek_bytes)
            if at:
                inject_site.remember(key, at)
                return at
            if self._site_mode == "vdso":
                raise InjectionFailed(self.pid, "setup", "no syscall instruction in [vdso]")
        try:
            maps = read_maps(self.pid)
        except NoSuchProcess:
            raise ProcessExited(self.pid, "syscall injection") from None
        for m in maps:
            if "x" in m.perms and m.readable and not m.path.startswith("["):
                word = self._peekdata(m.start)
                self._poked = (m.start, word)
                self._pokedata(m.start, (word & ~0xFFFF) | 0x050F)
                return m.start
        raise InjectionFailed(self.pid, "setup", "no executable mapping to hold a syscall")

    def close(self) -> None:
        """Free the scratch memory, put back code, registers, mask, signals; idempotent."""
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
                self._park()
            elif self._stop_sig is not None:  # never resumed: still the stop's own signal
                self.fp.pending_signals[self.tid] = self._stop_sig.sig
                self._stop_sig = None
            if self._blocked and self.saved_mask is not None:
                set_sigmask(self.tid, self.saved_mask)
                self._blocked = False
            for h in self.held:
                requeue(self.pid, self.tid, h)
            self.held = []
            if self._options_set:
                ptrace(PTRACE_SETOPTIONS, self.tid, 0, SEIZE_OPTIONS)
                self._options_set = False
        except PtraceError as e:
            if e.errno == errno.ESRCH:
                raise ProcessExited(self.pid, "syscall injection") from None
            raise InjectionFailed(self.pid, "restore", str(e)) from None

    def _park(self) -> None:
        """Leave the thread in an interrupt stop inside get_signal(), as the freeze left
        it: from its last syscall-exit stop it resumes (PTRACE_CONT, which also ends
        syscall tracing) straight into a pending interrupt, before any signal is
        dequeued. Registers and restart state are the saved ones."""
        ptrace(PTRACE_INTERRUPT, self.tid, 0, 0)
        ptrace(PTRACE_CONT, self.tid, 0, 0)
        status = self._wait()
        if (status >> 16) != PTRACE_EVENT_STOP:
            # A signal-delivery stop (only when the mask was not ours to block): it is
            # handed back at the thaw, with its siginfo.
            self.fp.pending_signals[self.tid] = os.WSTOPSIG(status)

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
            return int(ptrace(PTRACE_PEEKDATA, self.tid, addr, 0, check_errno=True)) & U64
        except PtraceError as e:
            raise InjectionFailed(self.pid, f"PEEKDATA 0x{addr:x}", str(e)) from None

    def _pokedata(self, addr: int, word: int) -> None:
        ptrace(PTRACE_POKEDATA, self.tid, addr, word & U64)

    def scratch(self, length: int = 4096) -> int:
        """A private read-write mapping in the target, unmapped when the session ends."""
        if self._scratch is None:
            addr = self.check("mmap", 9, 0, length, 3, 0x22, U64, 0)
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
        a = [int(x) & U64 for x in args] + [0] * (6 - len(args))
        regs = copy_regs(self.saved)
        regs.rip, regs.rax, regs.orig_rax = self.site, nr, U64
        regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9 = a
        for _ in range(100):
            rax = self._run(regs, nr)
            self.calls += 1
            res = rax - (1 << 64) if rax >> 63 else rax
            if -res not in RESTART_CODES:
                return res
        raise InjectionFailed(self.pid, f"syscall {nr}", "interrupted 100 times")

    def check(self, name: str, nr: int, *args: int) -> int:
        """syscall(), raising InjectionFailed(name, strerror) on a negative result."""
        res = self.syscall(nr, *args)
        if res < 0:
            raise InjectionFailed(self.pid, name, os.strerror(-res))
        return res

    def _run(self, regs: user_regs_struct, nr: int) -> int:
        """One call from `regs`, between its entry and exit syscall-stops; the thread is
        left in the exit stop. Returns rax."""
        tid = self.tid
        entered = False
        try:
            set_regs(tid, regs)
            while True:
                ptrace(PTRACE_SYSCALL, tid, 0, self._first_resume_signal())
                status = self._wait()
                if (status >> 16) != 0:
                    continue  # a group stop or interrupt stop: go on
                sig = os.WSTOPSIG(status)
                if sig != SYSCALL_STOP:
                    # Dequeued while the mask was not yet ours: held, queued again later.
                    self.held.append(HeldSignal(sig, siginfo(tid)))
                    continue
                now = get_regs(tid)
                if now.rip != self.site + 2 or (int(now.orig_rax) & U64) != nr:
                    raise InjectionFailed(
                        self.pid, "syscall", f"thread stopped at 0x{now.rip:x} in {now.orig_rax}"
                    )
                if entered:
                    return int(now.rax)
                entered = True
                if not self._blocked:
                    self._block_after_first_call()
        except PtraceError as e:
            if e.errno == errno.ESRCH:
                raise ProcessExited(self.pid, "syscall injection") from None
            raise InjectionFailed(self.pid, "syscall", str(e)) from None

    def _block_after_first_call(self) -> None:
        """A mask-swapping thread: the kernel has put its own mask back on the way to our
        first call; that is the mask to restore, and from now on all are blocked."""
        self.saved_mask = get_sigmask(self.tid)
        set_sigmask(self.tid, ALL_SIGNALS)
        self._blocked = True

    def _wait(self) -> int:
        return wait_stop(self.pid, self.tid, self.timeout)
