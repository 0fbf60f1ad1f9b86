"""The agent's side of whole-memory restore in place, as pure logic: a restore
Freeze's layouts become the fit check's MemberLayout (regions and registers at the cut),
explicit members keep their own regions, bad registers are reported against their
member, and oversized register sets are not sent."""

from __future__ import annotations

import pytest

from cpcoord.errors import ThreadStateInvalid
from cpcoord.gen.v1 import agent_pb2, common_pb2, types_pb2
from nodeagent.capture.regions import RegionSpec
from nodeagent.daemon import restore_ops
from nodeagent.daemon.membership import HeldMember
from nodeagent.proc.procfs import ProcessIdentity
from nodeagent.proc.registers import FXSAVE_SIZE, REGS_SIZE, ThreadState, ThreadStates


def regs(tid: int, fp: int = FXSAVE_SIZE) -> common_pb2.ThreadRegisters:
    return common_pb2.ThreadRegisters(
        tid=tid, arch="x86_64", regs=bytes([tid % 256]) * REGS_SIZE, fpregs=b"\1" * fp
    )


def freeze(*layouts: agent_pb2.RestoreLayout) -> agent_pb2.Freeze:
    return agent_pb2.Freeze(
        job="j",
        generation=3,
        kind=common_pb2.OPERATION_KIND_RESTORE,
        members=[lay.member for lay in layouts] + ["x"],
        layouts=layouts,
    )


def member(name: str, regions: tuple[RegionSpec, ...] | None) -> HeldMember:
    return HeldMember("j", name, ProcessIdentity(1, 1), regions)


def test_whole_memory_layout_comes_from_the_freeze() -> None:
    lay = agent_pb2.RestoreLayout(
        member="w",
        regions=[types_pb2.Region(name="heap", start=0x10000, end=0x20000)],
        threads=[regs(12), regs(10)],
        thread_start_times=[1200, 1000],
    )
    layouts = restore_ops.layouts_of(freeze(lay))
    got = restore_ops.layout_of(member("w", None), layouts)
    assert not got.explicit and [(r.name, r.start, r.end) for r in got.regions] == [
        ("heap", 0x10000, 0x20000)
    ]
    assert got.threads is not None
    assert [(t.tid, t.start_time) for t in got.threads.threads] == [(10, 1000), (12, 1200)]
    # Explicit members keep their attached regions; the Freeze's layouts do not apply.
    x = restore_ops.layout_of(member("x", (RegionSpec("r", 0x1000, 0x3000),)), layouts)
    assert x.explicit and x.threads is None and x.regions[0].name == "r"
    # A whole-memory member the Freeze brings nothing for: no registers, refused later.
    none = restore_ops.layout_of(member("v", None), layouts)
    assert not none.explicit and none.threads is None and none.regions == ()


def test_bad_registers_are_reported_against_their_member() -> None:
    bad = agent_pb2.RestoreLayout(member="w", threads=[regs(5, fp=10)])
    odd = agent_pb2.RestoreLayout(member="v", threads=[regs(5)], thread_start_times=[1, 2])
    layouts = restore_ops.layouts_of(freeze(bad, odd))
    with pytest.raises(ThreadStateInvalid, match="FP state"):
        restore_ops.layout_of(member("w", None), layouts)
    with pytest.raises(ThreadStateInvalid, match="2 start times for 1 threads"):
        restore_ops.layout_of(member("v", None), layouts)


def test_register_sets_beyond_the_limit_are_not_sent() -> None:
    one = ThreadState(1, 0, "x86_64", b"\0" * REGS_SIZE, b"\0" * 4096)
    few = ThreadStates.of([one])
    regs, starts = restore_ops.staged_threads("w", few)
    assert [t.tid for t in regs] == [1] and starts == [0]
    n = restore_ops.MAX_STAGED_BYTES // 4096 + 1
    many = ThreadStates.of(ThreadState(i + 1, 0, "x86_64", one.regs, one.fpregs) for i in range(n))
    assert restore_ops.staged_threads("w", many) == ([], [])
    assert restore_ops.staged_threads("w", None) == ([], [])
