"""The agent's real `LocalBackend`: the local API (nodeagent/localapi/rules.py) served by the
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
  (`RestoreIntoOp`, answered through the agent's local commands, not the control stream).

Why the client API for attach and checkpoint, not a new control-stream message: it exists,
is tested, and keeps the coordinator unchanged; the agent calls it through
`cpcoord.api.Client` with a credential of its own (`--local-api-token-file`, an admin
token, when the coordinator enforces auth). The peer rules (only itself and its own job
unless root) are enforced in front of this backend by nodeagent.localapi.rules, on the
kernel's word about the caller (SO_PEERCRED). The agent is seen through `LocalAgent`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from cpcoord.api import Client, MemberHealth
from cpcoord.api import Member as RemoteMember
from cpcoord.errors import (
    CpcoordError,
    DuplicateMember,
    JobBusy,
    NotAMember,
    RegionNotRegistered,
    UnknownJob,
    UnknownMember,
)
from cpcoord.gen.v1 import agent_pb2, agent_pb2_grpc
from cpcoord.grpcutil import from_error_detail
from nodeagent.daemon import restore_ops
from nodeagent.daemon.membership import Members
from nodeagent.daemon.worker_ops import Op, RestoreIntoOp
from nodeagent.localapi.rules import (
    LocalRegion,
    LocalRestoreResult,
    Membership,
    Registration,
    RestoreRequest,
    uid_of,
)
from nodeagent.proc.procfs import ProcessIdentity

log = logging.getLogger(__name__)
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


class LocalAgent(Protocol):
    """What the backend needs of the running agent (nodeagent/daemon/agent.py)."""

    members: Members

    @property
    def node(self) -> str: ...

    def control_stub(self) -> tuple[agent_pb2_grpc.AgentControlStub, float]:
        """The welcomed session's stub for pages (on its bulk connection, not the
        control stream's) and call timeout (AgentUnavailable while not connected)."""
        ...

    def run_local(self, make: Callable[[int], Op], timeout: float) -> agent_pb2.CommandResult:
        """Run `make(command_id)` on the ptrace thread; its result, not sent upstream."""
        ...


class AgentBackend:
    """The LocalBackend of a running Agent (see the module docstring)."""

    def __init__(self, agent: LocalAgent, connect: Callable[[], Client]) -> None:
        self.agent = agent
        self.node = agent.node
        self._connect = connect  # the coordinator's client, opened at first use
        self._client: Client | None = None
        self._client_lock = threading.Lock()
        self._lock = threading.RLock()  # membership changes, one at a time
        self._owners: dict[Key, int] = {}  # every member registered here, kept after exit
        self._regions: dict[Key, dict[str, LocalRegion]] = {}
        self._procs: dict[Key, ProcessIdentity] = {}

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- the coordinator -------------------------------------------------------------------

    def _api(self) -> Client:
        with self._client_lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _remote(self, job: str, member: str) -> RemoteMember | None:
        """The member as the coordinator knows it, if it does."""
        try:
            jobs = self._api().jobs(job)
        except UnknownJob:
            return None
        return next((m for j in jobs if j.name == job for m in j.members if m.name == member), None)

    def _detach(self, job: str, member: str) -> None:
        with contextlib.suppress(UnknownMember, UnknownJob):
            self._api().detach(job, member)

    def _checkpoint(self, job: str) -> int:
        return when_free(lambda: self._api().checkpoint(job).number)

    # -- who is what -----------------------------------------------------------------------

    def membership(self, process: ProcessIdentity) -> Membership | None:
        m = self.agent.members.by_pid(process.pid)
        if m is None or m.ident != process:
            return None
        uid = self._owners.get(m.key)
        if uid is None:
            uid = uid_of(process.pid)
        return Membership(m.job, m.name, 0 if uid is None else uid)

    def job_owners(self, job: str) -> Mapping[str, int]:
        with self._lock:
            out = {name: uid for (j, name), uid in self._owners.items() if j == job}
        for m in self.agent.members.of_job(job):  # attached by `cpcoord run`/`attach`
            if m.name not in out and m.alive:
                uid = uid_of(m.ident.pid)
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
            when_free(lambda: self._detach(job, member))
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
        self._api().attach(
            key[0],
            key[1],
            process.pid,
            start_time=process.start_time,
            node=self.node,
            regions=spans,
        )
        self._regions[key] = regions
        self._procs[key] = process

    # -- LocalBackend ------------------------------------------------------------------------

    def register(self, r: Registration) -> Membership:
        process, uid, job, member = r.process, r.uid, r.job, r.member
        key = (job, member)
        with self._lock:
            remote = self._remote(job, member)
            held = self.agent.members.get(job, member)
            running = remote is not None and remote.health is MemberHealth.RUNNING
            if remote is not None and running and remote.pid != process.pid:
                # Another process has it: elsewhere, or here but not (yet) held by this
                # agent (it restarted and has not been given its members back).
                here_unheld = held is None and os.path.exists(f"/proc/{remote.pid}")
                if remote.node != self.node or here_unheld:
                    raise DuplicateMember(job, member)
            same = held is not None and held.ident == process and held.alive
            if held is not None and not same and held.alive and held.ident.alive():
                raise DuplicateMember(job, member)
            previous = self._current(key, process) if same else {}
            merged = {**previous, **{g.name: g for g in r.regions}}
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
        return self._checkpoint(membership.job)

    def checkpoint_job(self, job: str) -> int:
        return self._checkpoint(job)

    def restore(self, r: RestoreRequest) -> LocalRestoreResult:
        process, job, member = r.process, r.membership.job, r.membership.member
        with self._lock:
            regions = self._current((job, member), process)
        wanted = list(r.names) if r.names else sorted(regions)
        for n in wanted:
            if n not in regions:
                raise RegionNotRegistered(process.pid, n)
        detail = self._api().generation(job, r.generation or 0)
        number = detail.info.number
        if member not in {m.member for m in detail.members}:
            raise UnknownMember(job, member, f"in generation {number}")
        stub, timeout = self.agent.control_stub()
        contents = restore_ops.download(stub, job, number, member, timeout)
        now = tuple((n, regions[n].addr, regions[n].size) for n in wanted)

        def op(cid: int) -> RestoreIntoOp:
            # epoch 0: answered locally, whatever the stream's epoch
            return RestoreIntoOp(cid, member, process, now, contents, None, 0)

        res = self.agent.run_local(op, RESTORE_TIMEOUT_S)
        if res.HasField("error"):
            raise from_error_detail(res.error.error, res.error.message, res.error.status)
        log.info(
            "local restore",
            extra={"fields": {"job": job, "member": member, "generation": number}},
        )
        return LocalRestoreResult(job, member, number, tuple((n, s) for n, _, s in now))
