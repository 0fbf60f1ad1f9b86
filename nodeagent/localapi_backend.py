"""The agent's real `LocalBackend`: the local API (nodeagent/localapi.py) served by the
node agent and its coordinator.

How each request becomes cluster work (docs/local-api.md, "In the agent"):

- register / unregister: the member is (re)attached on the coordinator with explicit
  ranges (`AttachMember`, node = this agent's node): a changed region set is a detach and
  a new attach, so the coordinator's catalog always holds what the process registered. A
  restarted process takes over its member: the old one (gone) is detached first.
- checkpoint (self or job): a `Checkpoint` of the job through the coordinator's client
  API; the reply waits for COMMITTED (an ABORTED generation is `GenerationAborted`).
- restore: the generation's pages of the member come over the agent's own control
  channel (`DownloadPages`, agent credentials), and the ptrace thread writes them into
  the caller at the addresses it registered now, exactly `size` bytes per region
  (`RestoreIntoOp`, answered through `LocalCommands` instead of the control stream).

Why the client API for attach and checkpoint, not a new control-stream message: it exists,
is tested, and keeps the coordinator unchanged; the agent calls it with a credential of
its own (`--local-api-token-file`, an admin token, when the coordinator enforces auth).
The peer rules (only itself and its own job unless root) are enforced in front of this
backend by nodeagent.localapi, on the kernel's word about the caller (SO_PEERCRED).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from cpcoord.errors import (
    CpcoordError,
    DuplicateMember,
    GenerationAborted,
    JobBusy,
    LocalCommandTimeout,
    NotAMember,
    RegionNotRegistered,
    UnknownJob,
    UnknownMember,
)
from cpcoord.gen.v1 import agent_pb2
from cpcoord.grpcutil import from_error_detail
from nodeagent import restore_ops
from nodeagent.localapi import LocalRegion, LocalRestoreResult, Membership
from nodeagent.procfs import ProcessIdentity
from nodeagent.worker_ops import RestoreIntoOp

if TYPE_CHECKING:
    from nodeagent.agent import Agent

log = logging.getLogger(__name__)
# Command ids of local work; the coordinator's count up from 1 and never get this high.
LOCAL_COMMAND_BASE = 1 << 62
RESTORE_TIMEOUT_S = 120.0
# Members of one job often ask for a checkpoint at the same moment (every rank after a
# step): the coordinator runs one operation per job, so the others wait their turn.
BUSY_WAIT_S = 120.0
Key = tuple[str, str]
T = TypeVar("T")


def when_free(fn: Callable[[], T], wait_s: float = BUSY_WAIT_S) -> T:
    """`fn()`, tried again while the job is busy (JobBusy), for up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return fn()
        except JobBusy:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


class LocalCommands:
    """Results of commands the agent gives its own ptrace thread (a RestoreIntoOp for a
    local restore): the agent's emit hands them here instead of to the coordinator."""

    def __init__(self) -> None:
        self._ids = itertools.count(LOCAL_COMMAND_BASE)
        self._lock = threading.Lock()
        self._waiting: dict[int, queue.Queue[agent_pb2.CommandResult]] = {}

    def new(self) -> int:
        cid = next(self._ids)
        with self._lock:
            self._waiting[cid] = queue.Queue(maxsize=1)
        return cid

    def deliver(self, msg: agent_pb2.AgentMessage) -> bool:
        """True when `msg` answers a local command (then it is not sent anywhere)."""
        if msg.WhichOneof("body") != "result" or msg.result.command_id < LOCAL_COMMAND_BASE:
            return False
        with self._lock:
            q = self._waiting.get(msg.result.command_id)
        if q is not None:
            q.put_nowait(msg.result)
        return True

    def wait(self, cid: int, timeout: float) -> agent_pb2.CommandResult:
        with self._lock:
            q = self._waiting[cid]
        try:
            return q.get(timeout=timeout)
        except queue.Empty:
            raise LocalCommandTimeout(f"local command {cid}", f"{timeout:.0f}") from None
        finally:
            with self._lock:
                self._waiting.pop(cid, None)


@dataclass(frozen=True)
class RemoteMember:
    """A member as the coordinator knows it."""

    node: str
    pid: int
    running: bool


class CoordinatorApi(Protocol):
    """The coordinator's client API as the backend uses it."""

    def member(self, job: str, member: str) -> RemoteMember | None: ...

    def attach(
        self,
        job: str,
        member: str,
        process: ProcessIdentity,
        node: str,
        regions: Sequence[tuple[str, int, int]],
    ) -> None: ...

    def detach(self, job: str, member: str) -> None: ...

    def checkpoint(self, job: str) -> int: ...

    def generation(self, job: str, number: int) -> tuple[int, frozenset[str]]:
        """(number, member names) of a committed generation; 0: the latest."""
        ...


class GrpcCoordinatorApi:
    """CoordinatorApi over cpcoord.clientconn (one channel, opened at first use)."""

    def __init__(self, factory: Any) -> None:
        self._factory = factory  # () -> cpcoord.clientconn.Client
        self._client: Any = None
        self._lock = threading.Lock()

    def _c(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._factory()
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def member(self, job: str, member: str) -> RemoteMember | None:
        from cpcoord.gen.v1 import coordinator_pb2

        try:
            resp = self._c().call("ListJobs", coordinator_pb2.ListJobsRequest(job=job))
        except UnknownJob:
            return None
        for j in resp.jobs:
            for m in j.members:
                if j.name == job and m.name == member:
                    running = m.health == coordinator_pb2.MEMBER_HEALTH_RUNNING
                    return RemoteMember(m.node, m.process.pid, running)
        return None

    def attach(
        self,
        job: str,
        member: str,
        process: ProcessIdentity,
        node: str,
        regions: Sequence[tuple[str, int, int]],
    ) -> None:
        from cpcoord.gen.v1 import coordinator_pb2, types_pb2

        req = coordinator_pb2.AttachMemberRequest(
            job=job,
            member=member,
            node=node,
            process=types_pb2.ProcessIdentity(pid=process.pid, start_time=process.start_time),
            regions=[types_pb2.Region(name=n, start=s, end=e) for n, s, e in regions],
        )
        self._c().call("AttachMember", req)

    def detach(self, job: str, member: str) -> None:
        from cpcoord.gen.v1 import coordinator_pb2

        req = coordinator_pb2.DetachMemberRequest(job=job, member=member)
        with contextlib.suppress(UnknownMember, UnknownJob):
            self._c().call("DetachMember", req)

    def checkpoint(self, job: str) -> int:
        from cpcoord.gen.v1 import common_pb2, coordinator_pb2

        last = None
        for ev in self._c().stream("Checkpoint", coordinator_pb2.CheckpointRequest(job=job)):
            last = ev
            if ev.kind == common_pb2.PROGRESS_KIND_COMMITTED:
                return int(ev.generation)
            if ev.kind == common_pb2.PROGRESS_KIND_ABORTED:
                reason = common_pb2.AbortReason.Name(ev.reason).removeprefix("ABORT_REASON_")
                raise GenerationAborted(ev.generation, job, reason.lower(), ev.detail)
        gen = last.generation if last is not None else 0
        raise GenerationAborted(gen, job, "stream ended", "no COMMITTED event")

    def generation(self, job: str, number: int) -> tuple[int, frozenset[str]]:
        from cpcoord.gen.v1 import coordinator_pb2

        req = coordinator_pb2.GetGenerationRequest(job=job, generation=number)
        resp = self._c().call("GetGeneration", req)
        return int(resp.info.number), frozenset(m.member for m in resp.members)


def _uid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[2])
    except OSError:
        pass
    return None


class AgentBackend:
    """The LocalBackend of a running Agent (see the module docstring)."""

    def __init__(self, agent: Agent, api: CoordinatorApi) -> None:
        self.agent = agent
        self.api = api
        self.node = agent.config.node
        self._lock = threading.RLock()  # membership changes, one at a time
        self._owners: dict[Key, int] = {}  # every member registered here, kept after exit
        self._regions: dict[Key, dict[str, LocalRegion]] = {}
        self._procs: dict[Key, ProcessIdentity] = {}

    # -- who is what -----------------------------------------------------------------------

    def membership(self, process: ProcessIdentity) -> Membership | None:
        m = self.agent.members.by_pid(process.pid)
        if m is None or m.ident != process:
            return None
        uid = self._owners.get(m.key)
        if uid is None:
            uid = _uid_of(process.pid)
        return Membership(m.job, m.name, 0 if uid is None else uid)

    def job_owners(self, job: str) -> Mapping[str, int]:
        with self._lock:
            out = {name: uid for (j, name), uid in self._owners.items() if j == job}
        for m in self.agent.members.of_job(job):  # attached by `cpcoord run`/`attach`
            if m.name not in out and m.alive:
                uid = _uid_of(m.ident.pid)
                if uid is not None:
                    out[m.name] = uid
        return out

    def _current(self, key: Key, process: ProcessIdentity) -> dict[str, LocalRegion]:
        """The member's regions as this backend knows them for `process`, else as it
        was attached. Regions a previous process of the member registered are not its:
        a restarted process under `cpcoord run` starts from none of them."""
        if key in self._regions and self._procs.get(key) == process:
            return dict(self._regions[key])
        held = self.agent.members.get(*key)
        if held is None or held.regions is None:
            return {}
        return {r.name: LocalRegion(r.name, r.start, r.end - r.start) for r in held.regions}

    def _reattach(
        self,
        process: ProcessIdentity,
        key: Key,
        regions: dict[str, LocalRegion],
        known: bool,
        previous: dict[str, LocalRegion] | None = None,
    ) -> None:
        """Detach (if known) and attach with `regions`. When the attach is refused (a
        region not mapped, say), the process gets `previous` back: a bad request
        loses nothing."""
        job, member = key
        if known:
            when_free(lambda: self.api.detach(job, member))
        self._regions.pop(key, None)
        self._procs.pop(key, None)
        if not regions:
            return
        try:
            self._attach(process, key, regions)
        except CpcoordError:
            if previous:
                with contextlib.suppress(CpcoordError):
                    self._attach(process, key, previous)
            raise

    def _attach(self, process: ProcessIdentity, key: Key, regions: dict[str, LocalRegion]) -> None:
        spans = [(r.name, r.start, r.end) for r in regions.values()]
        self.api.attach(key[0], key[1], process, self.node, spans)
        self._regions[key] = regions
        self._procs[key] = process

    # -- LocalBackend ------------------------------------------------------------------------

    def register(
        self,
        process: ProcessIdentity,
        uid: int,
        job: str,
        member: str,
        regions: Sequence[LocalRegion],
    ) -> Membership:
        key = (job, member)
        with self._lock:
            remote = self.api.member(job, member)
            held = self.agent.members.get(job, member)
            if remote is not None and remote.running and remote.pid != process.pid:
                # Another process has it: elsewhere, or here but not (yet) held by this
                # agent (it restarted and has not been given its members back).
                here_unheld = held is None and os.path.exists(f"/proc/{remote.pid}")
                if remote.node != self.node or here_unheld:
                    raise DuplicateMember(job, member)
            same = held is not None and held.ident == process and held.alive
            if held is not None and not same and held.alive and held.ident.alive():
                raise DuplicateMember(job, member)
            previous = self._current(key, process) if same else {}
            merged = {**previous, **{r.name: r for r in regions}}
            known = remote is not None or held is not None
            self._reattach(process, key, merged, known, previous)
            self._owners[key] = uid
        log.info(
            "local member registered",
            extra={"fields": {"job": job, "member": member, "pid": process.pid}},
        )
        return Membership(job, member, uid)

    def unregister(self, process: ProcessIdentity, names: Sequence[str]) -> None:
        with self._lock:
            m = self.membership(process)
            if m is None:
                raise NotAMember(process.pid)
            key = (m.job, m.member)
            regions = self._current(key, process)
            for n in names:
                if n not in regions:
                    raise RegionNotRegistered(process.pid, n)
            previous = dict(regions)
            for n in set(names):
                del regions[n]
            self._reattach(process, key, regions, True, previous)

    def checkpoint_member(self, process: ProcessIdentity, membership: Membership) -> int:
        # A generation is of a whole job (the cut is consistent across its members).
        return when_free(lambda: self.api.checkpoint(membership.job))

    def checkpoint_job(self, job: str) -> int:
        return when_free(lambda: self.api.checkpoint(job))

    def restore(
        self,
        process: ProcessIdentity,
        membership: Membership,
        names: Sequence[str] | None,
        generation: int | None,
    ) -> LocalRestoreResult:
        job, member = membership.job, membership.member
        with self._lock:
            regions = self._current((job, member), process)
        wanted = list(names) if names else sorted(regions)
        for n in wanted:
            if n not in regions:
                raise RegionNotRegistered(process.pid, n)
        number, members = self.api.generation(job, generation or 0)
        if member not in members:
            raise UnknownMember(job, member, f"in generation {number}")
        stub, timeout = self.agent.control_stub()
        contents = restore_ops.download(stub, job, number, member, timeout)
        now = tuple((n, regions[n].addr, regions[n].size) for n in wanted)
        cid = self.agent.local_commands.new()
        op = RestoreIntoOp(
            command_id=cid,
            member=member,
            target=process,
            regions_now=now,
            contents=contents,
            error=None,
            epoch=0,  # answered through local_commands, whatever the stream's epoch
        )
        self.agent.worker.submit(op)
        res = self.agent.local_commands.wait(cid, RESTORE_TIMEOUT_S)
        if res.HasField("error"):
            raise from_error_detail(res.error.error, res.error.message, res.error.status)
        log.info(
            "local restore",
            extra={"fields": {"job": job, "member": member, "generation": number}},
        )
        return LocalRestoreResult(job, member, number, tuple((n, s) for n, _, s in now))
