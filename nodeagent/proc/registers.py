"""Every thread's registers at the cut, saved and put back over ptrace (x86-64).

Owns `ThreadStates` (value, bytes and proto forms), `save_thread_state(fp)` and
`restore_thread_state(fp, states)`. The capture hook that saves them while a capture holds
the process frozen is `thread_hooks.ThreadStateHooks`.

What is saved per thread: the general registers (PTRACE_GETREGS: `user_regs_struct`,
including fs_base/gs_base, so TLS comes back too) and the FP/vector state
(PTRACE_GETREGSET NT_X86_XSTATE: x87, SSE, AVX, PKRU...; NT_PRFPREG where the kernel has no
XSAVE). Rolling a whole address space back without these corrupts the threads that run
on it, which is why whole-memory restore requires them (restore.py).

Restart of an interrupted system call: a frozen thread sits in a ptrace stop inside
get_signal(); the call it was blocked in returned -ERESTART* and is restarted from the
registers found when the stop ends (nodeagent/proc/inject.py explains the mechanism). Putting
the cut's registers back therefore restarts the call the thread was in *at the cut*. One
case needs care: -ERESTART_RESTARTBLOCK restarts through `restart_syscall`, which reads
the kernel's restart block of the thread's *latest* interruption (a futex or nanosleep
of after the cut). Those are turned into -ERESTARTNOINTR, which re-issues the cut's call
with the cut's arguments: a relative timeout starts again in full (waits may last longer,
never shorter, and never on the wrong futex).

Every call must come from the thread that froze the process (freeze.py).
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ptrace.binding.func import ptrace
from ptrace.binding.linux_struct import user_regs_struct
from ptrace.error import PtraceError

from cpcoord.errors import NoSuchProcess, ProcessExited, RestoreRefused, ThreadStateInvalid
from cpcoord.gen.v1 import common_pb2
from nodeagent.proc.freeze import FrozenProcess
from nodeagent.proc.procfs import read_stat
from nodeagent.proc.ptrace_abi import (
    ERESTART_RESTARTBLOCK,
    ERESTARTNOINTR,
    NT_PRFPREG,
    NT_X86_XSTATE,
    PTRACE_GETREGSET,
    PTRACE_SETREGSET,
    U64,
    Iovec,
    get_regs,
    set_regs,
)

FXSAVE_SIZE = 512  # NT_PRFPREG; an XSAVE area is always larger (legacy area + header)
XSTATE_MAX = 1 << 16
ARCH = "x86_64"
REGS_SIZE = ctypes.sizeof(user_regs_struct)
_MAGIC = b"CPTS"
_VERSION = 1


@dataclass(frozen=True)
class ThreadState:
    """One thread's registers at the cut."""

    tid: int
    start_time: int  # field 22 of its /proc stat; 0 = unknown (e.g. read from a proto)
    arch: str
    regs: bytes  # struct user_regs_struct
    fpregs: bytes  # NT_X86_XSTATE area, or the 512-byte NT_PRFPREG area

    def validate(self) -> None:
        if self.arch != ARCH:
            raise ThreadStateInvalid(f"thread {self.tid}: arch {self.arch!r}, this is {ARCH}")
        if len(self.regs) != REGS_SIZE:
            raise ThreadStateInvalid(f"thread {self.tid}: {len(self.regs)} register bytes")
        if len(self.fpregs) < FXSAVE_SIZE or len(self.fpregs) > XSTATE_MAX:
            raise ThreadStateInvalid(f"thread {self.tid}: {len(self.fpregs)} FP state bytes")


@dataclass(frozen=True)
class ThreadStates:
    """Every thread of a process at the cut, sorted by tid."""

    threads: tuple[ThreadState, ...]

    @property
    def tids(self) -> frozenset[int]:
        return frozenset(t.tid for t in self.threads)

    def to_bytes(self) -> bytes:
        """`CPTS`, u16 version, u32 count, then per thread: i32 tid, u64 start time,
        u8 arch length + arch, u32 length + regs, u32 length + fpregs (little-endian)."""
        out = [_MAGIC, struct.pack("<HI", _VERSION, len(self.threads))]
        for t in self.threads:
            arch = t.arch.encode()
            out.append(struct.pack("<iQB", t.tid, t.start_time, len(arch)) + arch)
            out.append(struct.pack("<I", len(t.regs)) + t.regs)
            out.append(struct.pack("<I", len(t.fpregs)) + t.fpregs)
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> ThreadStates:
        try:
            if data[:4] != _MAGIC:
                raise ThreadStateInvalid("not a thread-state blob (bad magic)")
            version, count = struct.unpack_from("<HI", data, 4)
            if version != _VERSION:
                raise ThreadStateInvalid(f"version {version}, expected {_VERSION}")
            pos = 10
            threads = []
            for _ in range(count):
                tid, start, alen = struct.unpack_from("<iQB", data, pos)
                pos += 13
                arch = data[pos : pos + alen].decode()
                pos += alen
                parts = []
                for _field in range(2):
                    (n,) = struct.unpack_from("<I", data, pos)
                    parts.append(bytes(data[pos + 4 : pos + 4 + n]))
                    if len(parts[-1]) != n:
                        raise ThreadStateInvalid("truncated")
                    pos += 4 + n
                threads.append(ThreadState(tid, start, arch, parts[0], parts[1]))
            if pos != len(data):
                raise ThreadStateInvalid(f"{len(data) - pos} trailing bytes")
        except (struct.error, UnicodeDecodeError) as e:
            raise ThreadStateInvalid(f"truncated or garbled: {e}") from None
        return cls.of(threads)

    def to_proto(self) -> list[common_pb2.ThreadRegisters]:
        """As `PagesHeader.threads` (the start times are not carried there)."""
        return [
            common_pb2.ThreadRegisters(tid=t.tid, arch=t.arch, regs=t.regs, fpregs=t.fpregs)
            for t in self.threads
        ]

    @classmethod
    def from_proto(cls, msgs: Sequence[common_pb2.ThreadRegisters]) -> ThreadStates:
        return cls.of(ThreadState(m.tid, 0, m.arch, bytes(m.regs), bytes(m.fpregs)) for m in msgs)

    @classmethod
    def of(cls, threads: Iterable[ThreadState]) -> ThreadStates:
        items = sorted(threads, key=lambda t: t.tid)
        if not items:
            raise ThreadStateInvalid("no threads")
        if len({t.tid for t in items}) != len(items):
            raise ThreadStateInvalid("a thread appears twice")
        for t in items:
            t.validate()
        return cls(tuple(items))


def _check_arch() -> None:
    if platform.machine() != ARCH:
        raise RestoreRefused("?", f"registers are saved and restored on {ARCH} only")


def _ptrace_errors(fp: FrozenProcess, tid: int, what: str, e: PtraceError) -> Exception:
    if e.errno == errno.ESRCH:
        return ProcessExited(fp.pid, what)
    return ThreadStateInvalid(f"{what} of thread {tid}: {e}")


def _get_fpregs(tid: int) -> bytes:
    buf = ctypes.create_string_buffer(XSTATE_MAX)
    iov = Iovec(ctypes.addressof(buf), XSTATE_MAX)
    try:
        ptrace(PTRACE_GETREGSET, tid, NT_X86_XSTATE, ctypes.addressof(iov))
        return buf.raw[: iov.len]
    except PtraceError as e:
        if e.errno not in (errno.EINVAL, errno.ENODEV, errno.EIO):
            raise
    iov = Iovec(ctypes.addressof(buf), FXSAVE_SIZE)
    ptrace(PTRACE_GETREGSET, tid, NT_PRFPREG, ctypes.addressof(iov))
    return buf.raw[:FXSAVE_SIZE]


def save_thread_state(fp: FrozenProcess) -> ThreadStates:
    """Registers of every frozen thread. Call while frozen, on the freezing thread."""
    _check_arch()
    out = []
    for tid in fp.tids:
        try:
            regs = get_regs(tid)
            fpregs = _get_fpregs(tid)
            start = read_stat(fp.pid, tid).start_time
        except PtraceError as e:
            raise _ptrace_errors(fp, tid, "save registers", e) from None
        except NoSuchProcess:
            raise ProcessExited(fp.pid, "save registers") from None
        raw = ctypes.string_at(ctypes.addressof(regs), REGS_SIZE)
        out.append(ThreadState(tid, start, ARCH, raw, fpregs))
    return ThreadStates.of(out)


def check_threads(member: str, fp: FrozenProcess, states: ThreadStates) -> None:
    """Raise RestoreRefused unless the process has exactly the threads of the cut."""
    now = set(fp.tids)
    new, gone = sorted(now - states.tids), sorted(states.tids - now)
    if new or gone:
        raise RestoreRefused(
            member,
            f"its threads changed since the cut (new: {new[:8]}, gone: {gone[:8]}); "
            "the whole-memory region set needs the same threads as then",
        )
    for t in states.threads:
        if not t.start_time:
            continue
        try:
            start = read_stat(fp.pid, t.tid).start_time
        except NoSuchProcess:
            raise ProcessExited(fp.pid, "restore") from None
        if start != t.start_time:
            raise RestoreRefused(member, f"thread {t.tid} is another thread than at the cut")


def _restartable(regs: bytes) -> user_regs_struct:
    r = user_regs_struct.from_buffer_copy(regs)
    orig = ctypes.c_long(r.orig_rax & U64).value
    rax = ctypes.c_long(r.rax & U64).value
    if orig >= 0 and rax == -ERESTART_RESTARTBLOCK:
        r.rax = -ERESTARTNOINTR & U64  # re-issue the cut's call (see the header)
    return r


def restore_thread_state(
    fp: FrozenProcess, states: ThreadStates, member: str = "?", *, exact: bool = False
) -> int:
    """Put the cut's registers back into every thread; returns the threads restored.
    Refuses (nothing set) unless the process has the same threads as at the cut.
    `exact`: set them as they are (registers saved moments ago, put back after a failed
    restore), without turning an interrupted restart_syscall into a re-issued call."""
    _check_arch()
    check_threads(member, fp, states)
    for t in states.threads:
        regs = user_regs_struct.from_buffer_copy(t.regs) if exact else _restartable(t.regs)
        kind = NT_PRFPREG if len(t.fpregs) == FXSAVE_SIZE else NT_X86_XSTATE
        buf = ctypes.create_string_buffer(t.fpregs, len(t.fpregs))
        iov = Iovec(ctypes.addressof(buf), len(t.fpregs))
        try:
            set_regs(t.tid, regs)
            ptrace(PTRACE_SETREGSET, t.tid, kind, ctypes.addressof(iov))
        except PtraceError as e:
            raise _ptrace_errors(fp, t.tid, "restore registers", e) from None
    return len(states.threads)
