"""ThreadStates forms (bytes, proto) and the restart adjustment, without a process.
Saving and restoring real threads: tests/integration/test_restore_registers.py."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import pytest
from ptrace.binding.linux_struct import user_regs_struct

from cpcoord.errors import ThreadStateInvalid
from nodeagent.proc.registers import REGS_SIZE, ThreadState, ThreadStates, _restartable

U64 = (1 << 64) - 1


def regs(**fields: int) -> bytes:
    r = user_regs_struct()
    for k, v in fields.items():
        setattr(r, k, v & U64)
    return ctypes.string_at(ctypes.addressof(r), REGS_SIZE)


def states() -> ThreadStates:
    return ThreadStates.of(
        [
            ThreadState(12, 99, "x86_64", regs(rip=0x401000, rax=5), bytes(range(256)) * 4),
            ThreadState(10, 98, "x86_64", regs(rip=0x402000), b"\x01" * 512),
        ]
    )


def test_bytes_round_trip_sorted_by_tid() -> None:
    s = states()
    assert [t.tid for t in s.threads] == [10, 12] and s.tids == {10, 12}
    assert ThreadStates.from_bytes(s.to_bytes()) == s


def test_proto_round_trip_drops_only_start_times() -> None:
    s = states()
    back = ThreadStates.from_proto(s.to_proto())
    assert [(t.tid, t.arch, t.regs, t.fpregs, t.start_time) for t in back.threads] == [
        (t.tid, t.arch, t.regs, t.fpregs, 0) for t in s.threads
    ]


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b"XXXX" + b[4:],
        lambda b: b[:-1],
        lambda b: b + b"\0",
        lambda b: b[:20],
        lambda b: b[:4] + b"\x02\x00" + b[6:],
    ],
)
def test_garbled_blobs_are_refused(mangle: Callable[[bytes], bytes]) -> None:
    with pytest.raises(ThreadStateInvalid):
        ThreadStates.from_bytes(mangle(states().to_bytes()))


@pytest.mark.parametrize(
    "bad",
    [
        ThreadState(1, 0, "aarch64", regs(), b"\0" * 512),
        ThreadState(1, 0, "x86_64", b"\0" * 10, b"\0" * 512),
        ThreadState(1, 0, "x86_64", regs(), b"\0" * 100),
    ],
)
def test_invalid_states_are_refused(bad: ThreadState) -> None:
    with pytest.raises(ThreadStateInvalid):
        ThreadStates.of([bad])
    with pytest.raises(ThreadStateInvalid, match="twice"):
        ThreadStates.of([states().threads[0], states().threads[0]])
    with pytest.raises(ThreadStateInvalid, match="no threads"):
        ThreadStates.of([])


def test_restart_block_becomes_a_plain_restart() -> None:
    r = _restartable(regs(orig_rax=202, rax=-516))  # futex, -ERESTART_RESTARTBLOCK
    assert r.rax == -513 & U64 and r.orig_rax == 202
    for orig, rax in ((202, -512), (-1, -516), (35, 0)):  # other restarts, user mode, done
        assert _restartable(regs(orig_rax=orig, rax=rax)).rax == rax & U64
