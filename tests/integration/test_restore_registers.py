"""Whole-memory restore with every thread's registers (the default region set).

The C target's threads keep counters in registers (a general register, an SSE register)
and the same counters in memory, check they agree at every step, and sleep in
restartable system calls (nanosleep, a futex with a timeout). Rolling the memory back
with the registers must keep them running; rolling back either without the other is
caught by the program itself (it exits 3), which is what makes these tests able to fail.
"""

from __future__ import annotations

import ctypes
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from ptrace.binding.func import ptrace
from ptrace.binding.linux_struct import user_regs_struct

from cpcoord.errors import RestoreRefused
from cpcoord.ranges import AddressRange
from nodeagent.capture.process import Capture, capture
from nodeagent.proc.freeze import frozen
from nodeagent.proc.procfs import ProcessIdentity
from nodeagent.proc.ptrace_abi import NT_X86_XSTATE, PTRACE_GETREGSET, Iovec
from nodeagent.proc.registers import ThreadStates, restore_thread_state, save_thread_state
from nodeagent.restore.apply import MemberLayout, RegionContents, RegionLayout, restore_members
from nodeagent.restore.thread_hooks import ThreadStateHooks
from testbed.driver import Target
from tests.helpers.restore_c import RESTORE_TARGET, SpinTarget, build_c, digest, read_mem

pytestmark = pytest.mark.integration


# How the program notices registers and memory from different instants: its invariant
# check (exit 3), or a crash on a rolled-back stack (SEGV, BUS; glibc's abort on a
# smashed stack or heap, ABRT; a return into garbage, ILL). Exit 0 would be "unnoticed".
NOTICED = (3, -signal.SIGSEGV, -signal.SIGBUS, -signal.SIGABRT, -signal.SIGILL)


@pytest.fixture(scope="module")
def c_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(RESTORE_TARGET, tmp_path_factory.mktemp("c"))


def whole(t: SpinTarget) -> tuple[Capture, list[RegionContents], ThreadStates]:
    hooks = ThreadStateHooks()
    cap = capture(ProcessIdentity.of(t.pid), None, hooks=hooks)
    assert hooks.states is not None
    return cap, [RegionContents.from_captured(r) for r in cap.regions], hooks.states


def default_layout(
    contents: list[RegionContents], threads: ThreadStates | None, explicit: bool = False
) -> MemberLayout:
    regions = tuple(RegionLayout(c.name, c.start, c.end) for c in contents)
    return MemberLayout("spin", regions, explicit=explicit, threads=threads)


def counters_at_cut(t: SpinTarget, contents: list[RegionContents]) -> dict[str, float]:
    c = next(c for c in contents if c.start <= t.state < c.end)
    off = t.state - c.start
    row = int(np.searchsorted(c.pages, off // 4096))
    assert c.pages[row] == off // 4096, "the state page was not captured"
    return t.counters(bytes(c.data[row, off % 4096 : off % 4096 + 64]))


def wait_progress(t: SpinTarget, floor: dict[str, float], seconds: float = 0.5) -> dict[str, float]:
    """After at least `seconds`, wait (up to 30 s: a loaded machine may not run the
    threads for a while) until every counter is past `floor`."""
    time.sleep(seconds)
    deadline = time.monotonic() + 30
    while True:
        assert t.proc.poll() is None, f"target exited {t.proc.returncode}: {t.stderr()}"
        now = t.counters()
        behind = [k for k in ("main", "fp_n", "naps", "waits") if now[k] <= floor[k]]
        if not behind:
            return now
        assert time.monotonic() < deadline, f"{behind} did not move on from {floor}: {now}"
        time.sleep(0.05)


def test_whole_memory_restore_with_registers_keeps_threads_running(c_exe: Path) -> None:
    with SpinTarget(c_exe) as t:
        time.sleep(0.2)
        _, contents, threads = whole(t)
        assert len(threads.threads) == 4
        cut = counters_at_cut(t, contents)
        wait_progress(t, cut, 0.4)  # far past the cut now
        ident = ProcessIdentity.of(t.pid)
        with frozen(ident) as fp:
            (stats,) = restore_members([(fp, default_layout(contents, threads), contents)])
            # Every captured page holds the cut's bytes again, before anything runs.
            for c in contents:
                for row, page in enumerate(c.pages.tolist()):
                    assert read_mem(t.pid, c.start + page * 4096, 4096) == c.data[row].tobytes()
            assert t.counters() == cut
        assert stats.threads == 4
        # Every thread goes on from the cut, its invariants intact (else it exits 3).
        wait_progress(t, cut)


def test_thread_state_round_trips_and_registers_alone_are_caught(c_exe: Path) -> None:
    with SpinTarget(c_exe) as t:
        ident = ProcessIdentity.of(t.pid)
        with frozen(ident) as fp:
            saved = save_thread_state(fp)
            at_save = t.counters()
        assert ThreadStates.from_bytes(saved.to_bytes()) == saved
        from_proto = ThreadStates.from_proto(saved.to_proto())
        assert [(s.tid, s.regs, s.fpregs) for s in from_proto.threads] == [
            (s.tid, s.regs, s.fpregs) for s in saved.threads
        ]
        # Every thread past the save (not a fixed sleep: under load they may not have
        # moved, and old registers over unmoved memory are consistent: unnoticed).
        wait_progress(t, at_save, 0.3)
        with frozen(ident) as fp:
            assert restore_thread_state(fp, saved) == 4
            for s in saved.threads:
                regs = user_regs_struct()
                ptrace(12, s.tid, 0, ctypes.addressof(regs))  # PTRACE_GETREGS
                got = ctypes.string_at(ctypes.addressof(regs), ctypes.sizeof(regs))
                want = user_regs_struct.from_buffer_copy(s.regs)
                # rax may be turned from -ERESTART_RESTARTBLOCK into -ERESTARTNOINTR.
                if regs.rax != want.rax:
                    assert want.rax == (1 << 64) - 516 and regs.rax == (1 << 64) - 513
                    regs.rax = want.rax
                    got = ctypes.string_at(ctypes.addressof(regs), ctypes.sizeof(regs))
                assert got == s.regs, f"thread {s.tid}: general registers differ"
                buf = ctypes.create_string_buffer(len(s.fpregs))
                iov = Iovec(ctypes.addressof(buf), len(s.fpregs))
                ptrace(PTRACE_GETREGSET, s.tid, NT_X86_XSTATE, ctypes.addressof(iov))
                assert buf.raw[: iov.len] == s.fpregs, f"thread {s.tid}: FP state differs"
        # Registers of the past over the memory of now: the program notices and stops,
        # or a thread crashes first (a stack that no longer matches its frame pointer).
        code = t.wait_exit(10)
        assert code in NOTICED, f"old registers over new memory went unnoticed ({code})"
        if code == 3:
            assert "corrupt" in t.stderr()


def test_memory_without_registers_is_caught_by_the_target(c_exe: Path) -> None:
    """The negative control: what whole-memory restore refuses to do, done anyway."""
    with SpinTarget(c_exe) as t:
        time.sleep(0.1)
        _, contents, _ = whole(t)
        # Every counter past the cut (not a fixed sleep: under load the threads may not
        # have moved on yet, and memory rolled back under unmoved threads is consistent).
        wait_progress(t, counters_at_cut(t, contents), 0.3)
        with frozen(ProcessIdentity.of(t.pid)) as fp:
            restore_members([(fp, default_layout(contents, None, explicit=True), contents)])
        code = t.wait_exit(10)  # the invariant check, or a crash on a rolled-back stack
        assert code in NOTICED, f"went unnoticed ({code})"
        if code == 3:
            assert "corrupt" in t.stderr()


def test_whole_memory_without_registers_is_refused_and_writes_nothing(c_exe: Path) -> None:
    with SpinTarget(c_exe) as t:
        _, contents, _ = whole(t)
        time.sleep(0.2)
        with frozen(ProcessIdentity.of(t.pid)) as fp:
            spans = [(c.start, c.end) for c in contents]
            before = digest(t.pid, spans)
            with pytest.raises(RestoreRefused, match="registers"):
                restore_members([(fp, default_layout(contents, None), contents)])
            assert digest(t.pid, spans) == before
        wait_progress(t, t.counters(), 0.2)


@pytest.mark.parametrize("change", ["new", "gone"])
def test_whole_memory_refused_when_threads_changed(
    target_factory: Callable[..., Target], change: str
) -> None:
    t = target_factory(maps=["data:32"], writers=[] if change == "new" else ["data:2"])
    ident = ProcessIdentity.of(t.pid)
    m = t.mapping("data")
    with frozen(ident) as fp:
        states = save_thread_state(fp)
    # A default-set style region of exactly the mapping (its VMA may be merged with
    # thread stacks that come and go; that is not what this test is about).
    cap = capture(ident, [AddressRange(m.addr, m.end)])
    region = replace(RegionContents.from_captured(cap.regions[0]), name=f"anon-{m.addr:x}")
    if change == "new":
        t.cmd("threads", count=1)
    else:
        t.cmd("stop_writers")
    t.cmd("write", name="data", page=0, count=32, counter=6)
    lay = MemberLayout(
        "py",
        (RegionLayout(region.name, region.start, region.end),),
        explicit=False,
        threads=states,
    )
    with frozen(ident) as fp, pytest.raises(RestoreRefused, match="threads changed") as err:
        restore_members([(fp, lay, [region])])
    assert ("new: [" if change == "new" else "gone: [") in str(err.value)
    assert np.array_equal(t.read("data"), t.expected("data", 0, 32, 6))
    t.assert_running()


def test_registers_refused_half_way_put_back_memory_and_registers(
    c_exe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12 (all or nothing): the memory is written, then setting the cut's
    registers fails after the first thread got them. Every byte and every register goes
    back: the threads go on from where they were, their invariants intact."""
    import nodeagent.restore.apply as restore_mod
    from cpcoord.errors import RestoreUndone, ThreadStateInvalid
    from nodeagent.proc.ptrace_abi import PTRACE_SETREGS

    real = restore_mod.restore_thread_state

    def half(fp: object, states: ThreadStates, member: str = "?", *, exact: bool = False) -> int:
        if exact:  # putting back the registers of just before: the real thing
            return real(fp, states, member, exact=True)  # type: ignore[arg-type]
        # The first thread gets registers it cannot run with (as if half set), then the
        # next is refused: unless they are put back, that thread crashes at once.
        first = states.threads[0]
        regs = user_regs_struct.from_buffer_copy(first.regs)
        regs.rip = 8
        ptrace(PTRACE_SETREGS, first.tid, 0, ctypes.addressof(regs))
        raise ThreadStateInvalid(f"thread {states.threads[1].tid}: refused by the test")

    monkeypatch.setattr(restore_mod, "restore_thread_state", half)
    with SpinTarget(c_exe) as t:
        time.sleep(0.2)
        _, contents, threads = whole(t)
        cut = counters_at_cut(t, contents)
        now = wait_progress(t, cut, 0.4)
        ident = ProcessIdentity.of(t.pid)
        with frozen(ident) as fp:
            before = {c.name: read_mem(t.pid, c.start, c.end - c.start) for c in contents}
            with pytest.raises(RestoreUndone, match="refused by the test"):
                restore_members([(fp, default_layout(contents, threads), contents)])
            for c in contents:
                assert read_mem(t.pid, c.start, c.end - c.start) == before[c.name], c.name
        # From where they were, not from the cut: past `now`, and still consistent.
        wait_progress(t, now)
