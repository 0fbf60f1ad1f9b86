"""The agent's local API backend, its pure parts: register/unregister as coordinator calls
(with a scripted coordinator client and member table), local command results, retry while a
job is busy, and `cpcoord run`'s exit status mapping."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import pytest

from cpcoord.api import Member, MemberHealth
from cpcoord.cli.run import exit_code
from cpcoord.errors import (
    DuplicateMember,
    InvalidArgument,
    JobBusy,
    LocalCommandTimeout,
    NotAMember,
    RegionNotRegistered,
    UnknownJob,
    UnknownMember,
)
from cpcoord.gen.v1 import agent_pb2
from nodeagent.daemon.local_commands import LocalCommands
from nodeagent.localapi import backend as lb
from nodeagent.localapi.rules import LocalRegion, Membership, Registration
from nodeagent.proc.procfs import ProcessIdentity

ME = ProcessIdentity.of(os.getpid())


def remote(node: str, pid: int, running: bool) -> Member:
    health = MemberHealth.RUNNING if running else MemberHealth.GONE
    return Member("j", "x", node, pid, 0, (), health)


@dataclass
class FakeApi:
    """The part of cpcoord.api.Client the backend calls, scripted."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)
    remote: dict[tuple[str, str], Member] = field(default_factory=dict)
    members: Any = None  # the FakeMembers the attach fills, as the agent's worker would

    def jobs(self, job: str = "") -> list[Any]:
        held = [replace(m, name=n) for (j, n), m in self.remote.items() if j == job]
        if not held:
            raise UnknownJob(job)
        return [SimpleNamespace(name=job, members=held)]

    def attach(self, job: str, member: str, pid: int, **kw: Any) -> None:
        node, regions = kw["node"], tuple(kw["regions"])  # as cpcoord.api.Client takes them
        self.calls.append(("attach", job, member, pid, node, regions))
        if any(n == "unmapped" for n, _, _ in regions):
            raise InvalidArgument("region unmapped is not mapped")
        self.remote[(job, member)] = remote(node, pid, True)
        spans = tuple(SimpleNamespace(name=n, start=s, end=e) for n, s, e in regions)
        self.members.add(job, member, ProcessIdentity(pid, kw["start_time"]), spans)

    def detach(self, job: str, member: str) -> None:
        self.calls.append(("detach", job, member))
        if self.remote.pop((job, member), None) is None:
            raise UnknownMember(job, member)
        self.members.table.pop((job, member), None)

    def checkpoint(self, job: str) -> Any:
        self.calls.append(("checkpoint", job))
        return SimpleNamespace(number=7)


class FakeMembers:
    def __init__(self) -> None:
        self.table: dict[tuple[str, str], Any] = {}

    def add(self, job: str, name: str, ident: ProcessIdentity, regions: Any) -> None:
        self.table[(job, name)] = SimpleNamespace(
            job=job, name=name, ident=ident, regions=regions, alive=True, key=(job, name)
        )

    def get(self, job: str, name: str) -> Any:
        return self.table.get((job, name))

    def by_pid(self, pid: int) -> Any:
        return next((m for m in self.table.values() if m.ident.pid == pid and m.alive), None)

    def of_job(self, job: str) -> list[Any]:
        return [m for m in self.table.values() if m.job == job]


def register(
    b: lb.AgentBackend, p: ProcessIdentity, uid: int, job: str, member: str, rs: list[LocalRegion]
) -> Membership:
    return b.register(Registration(p, uid, job, member, tuple(rs)))


def backend() -> tuple[lb.AgentBackend, FakeApi, FakeMembers]:
    members = FakeMembers()
    api = FakeApi(members=members)
    agent = SimpleNamespace(node="n1", members=members)
    return lb.AgentBackend(agent, lambda: api), api, members  # type: ignore[arg-type,return-value]


def test_register_attaches_then_reattaches_with_all_regions() -> None:
    b, api, _ = backend()
    register(b, ME, 1000, "j", "m", [LocalRegion("a", 0x10000, 100)])
    assert api.calls == [("attach", "j", "m", ME.pid, "n1", (("a", 0x10000, 0x11000),))]
    m = b.membership(ME)
    assert m is not None and (m.job, m.member, m.uid) == ("j", "m", 1000)
    api.calls.clear()
    register(b, ME, 1000, "j", "m", [LocalRegion("b", 0x20000, 8192)])
    assert api.calls[0] == ("detach", "j", "m")
    assert api.calls[1][5] == (("a", 0x10000, 0x11000), ("b", 0x20000, 0x22000))
    assert b.job_owners("j") == {"m": 1000}


def test_a_refused_register_keeps_the_regions_it_had() -> None:
    b, api, members = backend()
    register(b, ME, 0, "j", "m", [LocalRegion("a", 0x10000, 10)])
    api.calls.clear()
    with pytest.raises(InvalidArgument, match="unmapped"):
        register(b, ME, 0, "j", "m", [LocalRegion("unmapped", 0x90000, 10)])
    assert [c[0] for c in api.calls] == ["detach", "attach", "attach"]
    assert api.calls[-1][5] == (("a", 0x10000, 0x11000),)
    assert members.get("j", "m") is not None and b._current(("j", "m"), ME).keys() == {"a"}


def test_a_new_process_of_a_member_starts_from_its_own_regions() -> None:
    """The member's first process registered a and b and died; `cpcoord run` attached a
    new process (whole memory, no regions known); it registers a only: the attach holds
    its a alone, never b at the dead process's address."""
    b, api, members = backend()
    old = ProcessIdentity(ME.pid, ME.start_time - 1)  # the same pid, an earlier process
    register(b, old, 0, "j", "m", [LocalRegion("a", 0x10000, 10), LocalRegion("b", 0x20000, 10)])
    members.table[("j", "m")].alive = False
    members.add("j", "m", ME, None)  # what `cpcoord run` attached: no explicit regions
    api.calls.clear()
    register(b, ME, 0, "j", "m", [LocalRegion("a", 0x30000, 10)])
    assert api.calls[-1][0] == "attach"
    assert api.calls[-1][5] == (("a", 0x30000, 0x31000),)
    assert b._current(("j", "m"), ME).keys() == {"a"}


def test_register_refuses_a_live_member_of_another_process_or_node() -> None:
    b, api, members = backend()
    other = ProcessIdentity.of(1)  # init lives
    members.add("j", "m", other, ())
    with pytest.raises(DuplicateMember):
        register(b, ME, 0, "j", "m", [LocalRegion("a", 0x10000, 10)])
    api.remote[("j", "x")] = remote("n2", 55, True)
    with pytest.raises(DuplicateMember):
        register(b, ME, 0, "j", "x", [LocalRegion("a", 0x10000, 10)])
    # Known to the coordinator on this node, but not held here (the agent restarted):
    # refused while that process lives, taken over once it is gone.
    api.remote[("j", "y")] = remote("n1", 1, True)
    with pytest.raises(DuplicateMember):
        register(b, ME, 0, "j", "y", [LocalRegion("a", 0x10000, 10)])
    assert api.calls == []
    api.remote[("j", "y")] = remote("n1", 2**22 + 12345, True)  # no such pid
    register(b, ME, 0, "j", "y", [LocalRegion("a", 0x10000, 10)])
    assert [c[0] for c in api.calls] == ["detach", "attach"]
    api.calls.clear()
    # Gone on another node: taken over here.
    api.remote[("j", "x")] = remote("n2", 55, False)
    register(b, ME, 0, "j", "x", [LocalRegion("a", 0x10000, 10)])
    assert [c[0] for c in api.calls] == ["detach", "attach"]


def test_unregister_narrows_and_the_last_region_detaches() -> None:
    b, api, _ = backend()
    register(b, ME, 0, "j", "m", [LocalRegion("a", 0x10000, 10), LocalRegion("b", 0x20000, 10)])
    with pytest.raises(RegionNotRegistered):
        b.unregister(ME, ["zz"])
    api.calls.clear()
    b.unregister(ME, ["a"])
    assert api.calls == [
        ("detach", "j", "m"),
        ("attach", "j", "m", ME.pid, "n1", (("b", 0x20000, 0x21000),)),
    ]
    api.calls.clear()
    b.unregister(ME, ["b"])
    assert api.calls == [("detach", "j", "m")]
    assert b.membership(ME) is None
    with pytest.raises(NotAMember):
        b.unregister(ME, ["b"])
    assert b.job_owners("j") == {"m": 0}  # the owner is remembered after it left


def test_local_commands_deliver_only_their_own_results() -> None:
    lc = LocalCommands()
    cid = lc.new()
    theirs = agent_pb2.AgentMessage(result=agent_pb2.CommandResult(command_id=5))
    assert not lc.deliver(theirs)
    assert not lc.deliver(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(sequence=1)))
    mine = agent_pb2.AgentMessage(result=agent_pb2.CommandResult(command_id=cid))
    threading.Timer(0.05, lc.deliver, args=(mine,)).start()
    assert lc.wait(cid, 10).command_id == cid
    assert lc.deliver(mine)  # a late duplicate is still not sent to the coordinator
    cid2 = lc.new()
    with pytest.raises(LocalCommandTimeout):
        lc.wait(cid2, 0.01)


def test_when_free_retries_busy_jobs_then_gives_up() -> None:
    busy = [JobBusy("j", 1), JobBusy("j", 1)]

    def fn() -> int:
        if busy:
            raise busy.pop()
        return 9

    assert lb.when_free(fn, 10) == 9
    with pytest.raises(JobBusy):
        lb.when_free(lambda: (_ for _ in ()).throw(JobBusy("j", 2)), 0.05)


def test_exit_status_like_a_shell() -> None:
    assert exit_code(0) == 0
    assert exit_code(3 << 8) == 3
    assert exit_code(signal.SIGKILL) == 137
    assert exit_code(signal.SIGTERM) == 143
