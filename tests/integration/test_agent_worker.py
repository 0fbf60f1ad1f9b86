"""The agent's ptrace thread (nodeagent/daemon/worker.py) on real target processes, without
gRPC: freeze, capture with the member's tracker, thaw, the lease, abort keeping pending
sets, member death, attach/detach. Bytes staged are compared with what the target holds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from cpcoord.gen.v1 import agent_pb2, common_pb2, types_pb2
from nodeagent.daemon.membership import Members
from nodeagent.daemon.worker import Worker
from nodeagent.daemon.worker_ops import (
    AbortOp,
    AttachOp,
    CaptureOp,
    CommittedOp,
    DetachOp,
    DisconnectOp,
    FreezeOp,
    WorkerConfig,
)
from nodeagent.trackers import registry
from nodeagent.upload.stream import StagedMember
from testbed import patterns
from testbed.daemons import daemon_env
from testbed.driver import PAGE, Target, task_states
from tests.conftest import require

pytestmark = pytest.mark.integration
JOB = "job"


class Rig:
    """A worker plus what it reported."""

    def __init__(self, **config: Any) -> None:
        self.events: list[agent_pb2.AgentMessage] = []
        self.staged: dict[tuple[int, str], StagedMember] = {}
        self.cond = threading.Condition()
        self.members = Members()
        self.worker = Worker(
            self.members, self._emit, self._on_staged, WorkerConfig(node="n1", **config)
        )
        self.worker.start()
        self.cid = 0

    def _emit(self, msg: agent_pb2.AgentMessage, epoch: int) -> None:
        with self.cond:
            self.events.append(msg)
            self.cond.notify_all()

    def _on_staged(self, staged: list[StagedMember], epoch: int) -> None:
        with self.cond:
            for sm in staged:
                self.staged[(sm.generation, sm.member)] = sm
            self.cond.notify_all()

    def wait(
        self, kind: str, pred: Callable[[Any], bool] = lambda b: True, timeout: float = 10.0
    ) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for m in self.events:
                    if m.WhichOneof("body") == kind and pred(getattr(m, kind)):
                        return getattr(m, kind)
                left = deadline - time.monotonic()
                assert left > 0, f"no {kind}: {[m.WhichOneof('body') for m in self.events]}"
                self.cond.wait(left)

    def of(self, kind: str) -> list[Any]:
        with self.cond:
            return [getattr(m, kind) for m in self.events if m.WhichOneof("body") == kind]

    def attach(
        self, t: Target, name: str = "m0", maps: tuple[str, ...] = (), tracker: str = ""
    ) -> Any:
        self.cid += 1
        regions = [
            types_pb2.Region(name=n, start=t.mapping(n).addr, end=t.mapping(n).end) for n in maps
        ]
        req = agent_pb2.AttachMember(
            job=JOB,
            member=name,
            process=types_pb2.ProcessIdentity(pid=t.pid),
            regions=regions,
            tracker=tracker,
        )
        cid = self.cid
        self.worker.submit(AttachOp(cid, req, 0))
        return self.wait("result", lambda r: r.command_id == cid)

    def checkpoint(self, gen: int, members: tuple[str, ...] = ("m0",), full: bool = False) -> None:
        self.worker.submit(FreezeOp(JOB, gen, 10_000, members, 0))
        self.wait("frozen", lambda f: f.generation == gen)
        self.worker.submit(CaptureOp(JOB, gen, full, members, 0))
        for m in members:
            self.wait("staged", lambda s, m=m: (s.generation, s.member) == (gen, m))
        self.staged_member(gen, members[-1])

    def staged_member(self, gen: int, member: str = "m0", timeout: float = 10.0) -> StagedMember:
        """Handed to the uploader after the Staged event (once the whole Capture is done)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while (gen, member) not in self.staged:
                left = deadline - time.monotonic()
                assert left > 0, f"member {member} of generation {gen} never handed over"
                self.cond.wait(left)
            return self.staged[(gen, member)]

    def close(self) -> None:
        for sm in self.staged.values():  # what an upload would have released
            sm.release()
        self.worker.stop()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def stopped(t: Target) -> bool:
    states = task_states(t.pid)
    return bool(states) and all(s in "tT" for s in states.values())


def wait_running(*ts: Target, timeout: float = 5.0) -> None:
    """Until no thread of the targets is in a stop (a thaw detaches thread by thread)."""
    deadline = time.monotonic() + timeout
    while any(s in "tT" for t in ts for s in task_states(t.pid).values()):
        assert time.monotonic() < deadline, [task_states(t.pid) for t in ts]
        time.sleep(0.01)
    for t in ts:
        t.assert_running()


def region_bytes(sm: StagedMember, name: str) -> tuple[list[int], np.ndarray]:
    r = next(r for r in sm.regions if r.name == name)
    return r.pages.tolist(), np.asarray(r.data)


def test_full_then_incremental_copies_exactly_the_memory(rig: Rig, target_factory: Any) -> None:
    t = target_factory(maps=["data:64", "cold:32:anon:random:5"])
    res = rig.attach(t, maps=("data", "cold"))
    assert not res.HasField("error"), res.error
    assert sorted(r.name for r in res.member.regions) == ["cold", "data"]  # by address
    assert res.member.process.start_time > 0

    rig.worker.submit(FreezeOp(JOB, 1, 10_000, ("m0",), 0))
    frozen = rig.wait("frozen")
    assert [m.name for m in frozen.members] == ["m0"] and frozen.members[0].threads >= 1
    assert stopped(t), task_states(t.pid)  # every thread in a ptrace stop
    rig.worker.submit(CaptureOp(JOB, 1, False, ("m0",), 0))
    st = rig.wait("staged")
    t.assert_running()
    assert st.stats.full and st.stats.tracker == "none" and st.stats.pages == 96
    assert st.stats.bytes_logical == 96 * PAGE and st.stats.frozen_seconds > 0
    sm = rig.staged_member(1)
    assert sm.full and sm.base_generation == 0
    pages, data = region_bytes(sm, "data")
    assert pages == list(range(64)) and (data == t.read("data")).all()
    pages, data = region_bytes(sm, "cold")
    assert pages == list(range(32)) and (data == t.read("cold")).all()
    sm.release()
    rig.worker.submit(CommittedOp(JOB, 1))

    t.cmd("write", name="data", page=3, count=2, counter=7)
    t.cmd("write", name="cold", page=31, count=1, counter=9)
    rig.checkpoint(2)
    t.assert_running()
    st = next(s for s in rig.of("staged") if s.generation == 2)
    sm = rig.staged[(2, "m0")]
    assert not sm.full and sm.base_generation == 1
    assert st.stats.tracker == registry.choose(registry.AUTO) == sm.tracker
    pages, data = region_bytes(sm, "data")
    assert pages == [3, 4] and (data == t.expected("data", 3, 2, counter=7)).all()
    pages, data = region_bytes(sm, "cold")
    assert pages == [31] and (data == t.read("cold", 31, 1)).all()
    # every page present at the cut is listed, so vanished ones can be dropped
    assert next(r for r in sm.regions if r.name == "cold").all_pages.tolist() == list(range(32))


def test_capture_under_writers_is_one_instant(rig: Rig, target_factory: Any) -> None:
    t = target_factory(maps=["hot:256"], writers=["hot:4"])
    rig.attach(t, maps=("hot",))
    for gen in (1, 2):
        rig.checkpoint(gen, full=True)
        _, data = region_bytes(rig.staged[(gen, "m0")], "hot")
        words = data.view(np.uint64).reshape(256, patterns.WORDS)
        for w in range(4):
            patterns.check_writer(words[w * 64 : (w + 1) * 64], t.mapping("hot").id, w * 64, 64)
        rig.worker.submit(CommittedOp(JOB, gen))
    t.assert_running()


def test_lease_expires_without_capture(rig: Rig, target_factory: Any) -> None:
    t = target_factory()
    rig.attach(t, maps=("data",))
    t0 = time.monotonic()
    rig.worker.submit(FreezeOp(JOB, 1, 500, ("m0",), 0))  # coordinator's lease: 500 ms
    rig.wait("frozen")
    assert stopped(t)
    f = rig.wait("failed", timeout=5)
    took = time.monotonic() - t0
    assert f.reason == common_pb2.ABORT_REASON_LEASE_EXPIRED and f.member == "m0"
    assert f.error.error == "LeaseExpired" and f.generation == 1
    assert 0.5 <= took < 0.5 + 0.5, took
    t.assert_running()
    # A Capture that comes too late is refused, not captured from a running process.
    rig.worker.submit(CaptureOp(JOB, 1, False, ("m0",), 0))
    late = rig.wait("failed", lambda x: x.reason == common_pb2.ABORT_REASON_CAPTURE_FAILED)
    assert late.error.error == "NotFrozen"
    assert not rig.of("staged")


def test_a_bug_in_a_step_thaws_at_once_and_reports(
    rig: Rig, target_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception inside a Capture must not leave the member frozen until
    its lease: the ptrace thread thaws the generation and reports the failure."""
    from nodeagent.daemon import tracking

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError(2, "a bug")

    t = target_factory()
    rig.attach(t, maps=("data",))
    rig.worker.submit(FreezeOp(JOB, 1, 60_000, ("m0",), 0))  # a lease that would not help
    rig.wait("frozen")
    monkeypatch.setattr(tracking, "capture_frozen", broken)
    t0 = time.monotonic()
    rig.worker.submit(CaptureOp(JOB, 1, False, ("m0",), 0))
    f = rig.wait("failed", timeout=5)
    assert f.reason == common_pb2.ABORT_REASON_CAPTURE_FAILED and f.member == "m0"
    assert f.error.error == "AgentStepFailed" and "FileNotFoundError" in f.error.message
    assert time.monotonic() - t0 < 5
    t.assert_running()


def test_agent_lease_caps_the_coordinators() -> None:
    rig = Rig(lease_s=0.4)
    try:
        t = Target()
        try:
            rig.attach(t, maps=("data",))
            t0 = time.monotonic()
            rig.worker.submit(FreezeOp(JOB, 1, 60_000, ("m0",), 0))
            rig.wait("failed", lambda f: f.reason == common_pb2.ABORT_REASON_LEASE_EXPIRED)
            assert time.monotonic() - t0 < 0.4 + 0.5
            t.assert_running()
        finally:
            t.close()
    finally:
        rig.close()


def test_abort_thaws_and_keeps_pending(rig: Rig, target_factory: Any) -> None:
    t = target_factory(maps=["data:64"])
    rig.attach(t, maps=("data",))
    rig.checkpoint(1)
    rig.worker.submit(CommittedOp(JOB, 1))

    t.cmd("write", name="data", page=10, count=1, counter=1)  # A
    rig.checkpoint(2)
    assert region_bytes(rig.staged[(2, "m0")], "data")[0] == [10]
    rig.worker.submit(AbortOp(JOB, 2, 0))  # generation 2 never commits

    t.cmd("write", name="data", page=20, count=1, counter=2)  # B
    rig.worker.submit(FreezeOp(JOB, 3, 10_000, ("m0",), 0))
    rig.wait("frozen", lambda f: f.generation == 3)
    rig.worker.submit(AbortOp(JOB, 3, 0))  # aborted while frozen: thawed, nothing lost
    wait_running(t)

    rig.checkpoint(4)
    pages, data = region_bytes(rig.staged[(4, "m0")], "data")
    assert pages == [10, 20]  # A only through the pending set: not written since gen 2
    assert (data[0] == t.expected("data", 10, 1, counter=1)[0]).all()
    assert (data[1] == t.expected("data", 20, 1, counter=2)[0]).all()
    rig.worker.submit(CommittedOp(JOB, 4))
    rig.checkpoint(5)
    assert region_bytes(rig.staged[(5, "m0")], "data")[0] == []  # committed: forgotten


def test_first_capture_aborted_means_next_is_full(rig: Rig, target_factory: Any) -> None:
    t = target_factory(maps=["data:16"])
    rig.attach(t, maps=("data",))
    rig.checkpoint(1)
    rig.worker.submit(AbortOp(JOB, 1, 0))
    rig.checkpoint(2)
    sm = rig.staged[(2, "m0")]
    assert sm.full and region_bytes(sm, "data")[0] == list(range(16))


def test_disconnect_thaws_everything(rig: Rig, target_factory: Any) -> None:
    a, b = target_factory(), target_factory()
    rig.attach(a, "a", ("data",))
    rig.attach(b, "b", ("data",))
    rig.worker.submit(FreezeOp(JOB, 1, 10_000, ("a", "b"), 0))
    frozen = rig.wait("frozen")
    assert {m.name for m in frozen.members} == {"a", "b"}
    assert stopped(a) and stopped(b)
    rig.worker.submit(DisconnectOp())
    wait_running(a, b)


@pytest.mark.parametrize("while_frozen", [False, True])
def test_member_death_is_reported(rig: Rig, target_factory: Any, while_frozen: bool) -> None:
    t = target_factory()
    rig.attach(t, maps=("data",))
    if while_frozen:
        rig.worker.submit(FreezeOp(JOB, 1, 10_000, ("m0",), 0))
        rig.wait("frozen")
    os.kill(t.pid, signal.SIGKILL)
    gone = rig.wait("member_gone", timeout=5)
    assert gone.member == "m0" and gone.job == JOB and gone.process.pid == t.pid
    if not while_frozen:  # we are not its parent: a zombie still tells how it died
        assert gone.detail == "killed by signal 9" and os.WTERMSIG(gone.exit_status) == 9
    assert t.proc.wait(timeout=5) == -signal.SIGKILL
    assert rig.worker.frozen_keys() == []
    # Told again, never silently dropped: a Freeze naming it gets MemberGone again.
    rig.worker.submit(FreezeOp(JOB, 2, 10_000, ("m0",), 0))
    rig.wait("member_gone", lambda g: g is not gone and g.member == "m0")
    assert len(rig.of("member_gone")) == 2
    assert not rig.members.get(JOB, "m0").alive


def test_attach_refusals_change_nothing(rig: Rig, target_factory: Any) -> None:
    t = target_factory()
    ok = rig.attach(t, maps=("data",))
    assert not ok.HasField("error")
    again = rig.attach(t, maps=("data",))  # an identical repeat is fine
    assert not again.HasField("error")
    other = rig.attach(t, "other")  # same process under another name
    assert other.error.error == "PidAttached" and other.error.status == "ALREADY_EXISTS"
    dup = rig.attach(t)  # same name, other regions
    assert dup.error.error == "DuplicateMember"
    rig.cid += 1
    bad = agent_pb2.AttachMember(
        job=JOB, member="ghost", process=types_pb2.ProcessIdentity(pid=2**22 + 7)
    )
    rig.worker.submit(AttachOp(rig.cid, bad, 0))
    r = rig.wait("result", lambda x: x.command_id == rig.cid)
    assert r.error.error == "NoSuchProcess" and r.error.exit_code == 10
    rig.cid += 1
    unmapped = agent_pb2.AttachMember(
        job=JOB,
        member="x",
        process=types_pb2.ProcessIdentity(pid=os.getppid()),
        regions=[types_pb2.Region(name="r", start=0x1000, end=0x2000)],
    )
    rig.worker.submit(AttachOp(rig.cid, unmapped, 0))
    r = rig.wait("result", lambda x: x.command_id == rig.cid)
    assert r.error.error == "RangeUnmapped"
    assert [m.name for m in rig.members.all()] == ["m0"]


def _uffds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += "userfaultfd" in os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
    return n


def test_detach_disarms_the_tracker(rig: Rig, target_factory: Any) -> None:
    require(registry.availability("uffd-wp").available, "uffd-wp on this kernel")
    t = target_factory()
    rig.attach(t, maps=("data",), tracker="uffd-wp")
    rig.checkpoint(1)
    assert _uffds(t.pid) == 1  # armed: the target holds our uffd
    rig.cid += 1
    rig.worker.submit(DetachOp(rig.cid, JOB, "m0", 0))
    r = rig.wait("result", lambda x: x.command_id == rig.cid)
    assert not r.HasField("error")
    assert _uffds(t.pid) == 0 and rig.members.all() == []
    t.assert_running()


@pytest.mark.parametrize("tracker", ["hash", "none"])
def test_other_trackers(rig: Rig, target_factory: Any, tracker: str) -> None:
    t = target_factory(maps=["data:32"])
    rig.attach(t, maps=("data",), tracker=tracker)
    rig.checkpoint(1)
    rig.worker.submit(CommittedOp(JOB, 1))
    t.cmd("write", name="data", page=5, count=1, counter=3)
    rig.checkpoint(2)
    sm = rig.staged[(2, "m0")]
    pages, data = region_bytes(sm, "data")
    if tracker == "none":
        assert sm.full and pages == list(range(32))
    else:
        assert not sm.full and sm.tracker == "hash" and pages == [5]
    assert (data == t.read("data", pages[0], len(pages))).all()


def test_tracer_death_after_uffd_arm_leaves_the_member_alive(target_factory: Any) -> None:
    """An agent killed right after arming uffd-wp (syscall injection, single-stepping) must
    leave the member running, not dying of a SIGTRAP at its next system call
    (nodeagent/proc/inject.py, Injector._park)."""
    require(registry.availability("uffd-wp").available, "uffd-wp on this kernel")
    t = target_factory()
    # The "agent": a process of its own (not a fork of this threaded one) that freezes,
    # arms and dies while the member is still frozen.
    agent = (
        "import os, sys\n"
        "from nodeagent.proc.freeze import freeze\n"
        "from nodeagent.proc.procfs import ProcessIdentity, read_maps\n"
        "from nodeagent.trackers.uffdwp import UffdWpTracker\n"
        "pid = int(sys.argv[1])\n"
        "fp = freeze(ProcessIdentity.of(pid))\n"
        "UffdWpTracker().arm(fp, read_maps(pid))\n"
        "os._exit(0)  # dies as a killed agent would: nothing cleaned up\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", agent, str(t.pid)],
        capture_output=True, text=True, timeout=120, env=daemon_env(),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for _ in range(3):  # system calls return, the trap flag is off
        t.assert_running()
    assert t.proc.poll() is None


def test_default_regions_whose_layout_changed_are_delivered_whole(
    rig: Rig, target_factory: Any
) -> None:
    """The coordinator inherits undelivered pages only from a region of the same name,
    start and end: a default region that shrank (the tail of its mapping made read-only,
    so the maps line splits) must be sent whole, although none of its pages changed."""
    t = target_factory(maps=["g:16:anon:random:9"])
    rig.attach(t)  # default regions: every writable private mapping
    rig.checkpoint(1)
    rig.worker.submit(CommittedOp(JOB, 1))
    g = t.mapping("g")
    before = next(r for r in rig.staged_member(1).regions if r.start <= g.addr < r.end)
    t.cmd("mprotect", name="g", page=8, count=8, prot="r")
    rig.checkpoint(2)
    sm = rig.staged_member(2)
    assert not sm.full
    reg = next(r for r in sm.regions if r.start <= g.addr < r.end)
    assert (reg.name, reg.start) == (before.name, before.start) and reg.end < before.end
    assert reg.pages.tolist() == reg.all_pages.tolist()  # whole
    first = (g.addr - reg.start) // PAGE
    rows = np.searchsorted(reg.pages, np.arange(first, first + 8, dtype=np.uint64))
    assert (np.asarray(reg.data)[rows] == t.read("g", 0, 8)).all()


def _tracer_tid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("TracerPid:")).split()[1])


def test_a_member_that_cannot_stop_is_held_then_released(tmp_path: Any) -> None:
    """Blocked in vfork(), a member cannot stop before its child exits: the Freeze fails,
    the ptrace thread keeps it (seized, its interrupt pending, never stopped) and detaches
    it the moment vfork returns. Another one still held when the worker stops is let go
    by the thread's end (the kernel's exit_ptrace drops the pending interrupt too)."""
    from testbed.daemons import wait_for
    from tests.helpers.freeze_c import FreezeTarget, build_freeze_target, states, stopped

    exe = build_freeze_target(tmp_path)
    rig = Rig(freeze_timeout_s=0.5)
    with FreezeTarget(exe, "vfork", 4, 2500) as a, FreezeTarget(exe, "vfork", 4, 6000) as b:
        a.child(), b.child()
        for name, t in (("a", a), ("b", b)):
            req = agent_pb2.AttachMember(
                job=JOB, member=name, process=types_pb2.ProcessIdentity(pid=t.pid)
            )
            cid = ord(name)
            rig.worker.submit(AttachOp(cid, req, 0))
            rig.wait("result", lambda r, c=cid: r.command_id == c)
        for gen, name, t in ((1, "a", a), (2, "b", b)):
            rig.worker.submit(FreezeOp(JOB, gen, 10_000, (name,), 0))
            f = rig.wait("failed", lambda x, g=gen: x.generation == g)
            assert f.reason == common_pb2.ABORT_REASON_FREEZE_FAILED and "vfork" in f.detail
            assert _tracer_tid(t.pid) == rig.worker._thread.native_id  # held
            assert task_states(t.pid)[t.pid] == "D"  # and not stopped
        a.expect("back", 5)  # vfork returned: detached on the spot, it runs
        assert not stopped(a.pid) and _tracer_tid(a.pid) == 0
        a.ping()
        a.check()
        rig.close()  # b is still blocked in vfork, held by the thread that just ended
        # (a Python join returns a moment before the OS thread is gone)
        wait_for(lambda: _tracer_tid(b.pid) == 0, 5, "b released by the thread's end")
        assert not stopped(b.pid)
        assert b.proc.poll() is None and states(b.pid)[b.pid] == "D"  # still in vfork
        b.expect("back", 10)  # its child exited: vfork returned, nobody stopped it
        b.ping()
        a.quit()
        b.quit()
