"""The ptrace ABI the node agent speaks (x86-64): request numbers, options, wait flags,
regset notes, the kernel's internal restart codes, and the register get/set calls.

Owns: every ptrace constant freeze, tracees, inject and registers use, defined once, and
the two raw register calls they share. The name is not `ptrace` so that it never shadows
the python-ptrace package whose `ptrace()` binding it wraps.
"""

from __future__ import annotations

import ctypes

from ptrace.binding.func import ptrace
from ptrace.binding.linux_struct import user_regs_struct

PTRACE_PEEKDATA = 2
PTRACE_POKEDATA = 5
PTRACE_CONT = 7
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETSIGINFO = 0x4202
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
PTRACE_EVENT_STOP = 128
PTRACE_O_TRACESYSGOOD = 1
PTRACE_O_SUSPEND_SECCOMP = 1 << 21

WALL = 0x40000000  # __WALL: wait for threads too

# Regset notes for PTRACE_GETREGSET / PTRACE_SETREGSET.
NT_PRFPREG = 2
NT_X86_XSTATE = 0x202

# Results a system call returns when a signal interrupted it before it did anything
# (include/linux/errno.h, never seen by user space).
ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516
RESTART_CODES = frozenset({ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK})

U64 = (1 << 64) - 1


class Iovec(ctypes.Structure):
    """struct iovec, as PTRACE_GETREGSET / PTRACE_SETREGSET take it."""

    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def get_regs(tid: int) -> user_regs_struct:
    regs = user_regs_struct()
    ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def set_regs(tid: int, regs: user_regs_struct) -> None:
    ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))


def copy_regs(regs: user_regs_struct) -> user_regs_struct:
    out = user_regs_struct()
    ctypes.memmove(ctypes.addressof(out), ctypes.addressof(regs), ctypes.sizeof(regs))
    return out


def regs_dict(regs: user_regs_struct) -> dict[str, int]:
    return {name: int(getattr(regs, name)) for name, _ in user_regs_struct._fields_}
