"""Membership operations of the engine: attach, detach, reconcile an agent's members
after it (re)connects, and the health of each member as clients see it.

Attach asks the member's agent first (AttachMember, answered by a CommandResult: the
agent checks the process and its regions) and records the member only if the agent
agreed, so a refused attach changes nothing. After a (re)connect the agent's Hello lists
the members it still holds; the coordinator re-attaches the ones it lacks (a restarted
agent holds nothing, and its trackers start over: the next capture of those members is
full), marks the ones whose process died as gone, and detaches the ones it no longer
knows. Until that is done the node is not `ready` and checkpoints of its jobs wait.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from coordinator import tree_members
from coordinator.agents import AgentSession
from coordinator.membership import MemberRec, check_regions
from cpcoord.errors import (
    AgentTimeout,
    AgentUnavailable,
    CpcoordError,
    DuplicateMember,
    InvalidArgument,
    JobBusy,
    MemberNotRunning,
    NoSuchProcess,
    PidReused,
)
from cpcoord.gen.v1 import agent_pb2, types_pb2
from cpcoord.log import log_event
from cpcoord.ranges import check_name

if TYPE_CHECKING:
    from coordinator.engine_view import EngineView

log = logging.getLogger("cpcoord.coordinator.members")


@dataclass(frozen=True)
class AttachRequest:
    job: str
    member: str
    pid: int
    start_time: int = 0
    node: str = ""
    regions: Sequence[tuple[str, int, int]] = ()
    tracker: str = ""
    tree: bool = False  # the process and its descendants, as group `member`


def _attach_msg(rec: MemberRec) -> agent_pb2.AttachMember:
    return agent_pb2.AttachMember(
        job=rec.job,
        member=rec.name,
        process=types_pb2.ProcessIdentity(pid=rec.pid, start_time=rec.start_time),
        regions=[types_pb2.Region(name=r.name, start=r.start, end=r.end) for r in rec.regions],
        tracker=rec.tracker,
        group=rec.group,
    )


def attach(engine: EngineView, req: AttachRequest) -> tuple[MemberRec, types_pb2.Member]:
    """Attach a process as a member; returns the record and the agent's view of it."""
    check_name(req.job)
    if req.pid < 1:
        raise InvalidArgument(f"pid must be >= 1, got {req.pid}")
    regions = check_regions(list(req.regions))
    if req.tracker:
        check_name(req.tracker)
    with engine.lock:
        engine.members.check_new(req.job, req.member)
        node = req.node
        if node:
            check_name(node)
        else:
            live = [s.node for s in engine.agents.connected()]
            if len(live) != 1:
                raise InvalidArgument(
                    f"give --node: {len(live)} agents are connected ({', '.join(live) or 'none'})"
                )
            node = live[0]
        s = engine.agents.require(node)
        key = (req.job, req.member)
        if key in engine.attaching:
            raise DuplicateMember(req.job, req.member)
        engine.attaching.add(key)
    try:
        group = req.member if req.tree else ""
        rec = MemberRec(
            req.job, req.member, node, req.pid, req.start_time, regions, req.tracker, group=group
        )
        res = s.ask("AttachMember", engine.opt.command_timeout_s, attach_member=_attach_msg(rec))
        got = res.member
        rec = replace(
            rec, pid=got.process.pid or rec.pid, start_time=got.process.start_time or rec.start_time
        )
        with engine.lock:
            rec = engine.members.add(rec)
    except BaseException:
        with engine.lock:
            engine.attaching.discard(key)
        raise
    with engine.lock:
        engine.attaching.discard(key)
    log_event(
        log, logging.INFO, "member attached", job=rec.job, member=rec.name, node=node, pid=rec.pid
    )
    engine.events.publish("member_attached", job=rec.job, member=rec.name, node=node)
    return rec, res.member


def detach(engine: EngineView, job: str, member: str) -> MemberRec:
    """Forget a member (its committed generations stay); the root of a tree takes its
    whole group with it, root first so that its agent stops finding descendants.
    Refused while the job has a generation in flight."""
    check_name(job)
    check_name(member)
    with engine.lock:
        rec = engine.members.require(job, member)
        busy = engine.flights.get(job)
        if busy is not None:
            raise JobBusy(job, busy.number)
        s = engine.agents.current(rec.node)
        group = [rec]
        if rec.group == rec.name:  # a root: its descendants go too
            group += sorted(
                (
                    r
                    for r in engine.members.of_job(job)
                    if r.group == rec.name and r.name != rec.name
                ),
                key=lambda r: r.name,
            )
        for r in group:
            engine.members.remove(job, r.name)
    for r in group:
        _detach_on_agent(engine, s if r.node == rec.node else engine.agents.current(r.node), r)
        log_event(log, logging.INFO, "member detached", job=job, member=r.name)
        engine.events.publish("member_detached", job=job, member=r.name, node=r.node)
    return rec


def _detach_on_agent(engine: EngineView, s: AgentSession | None, rec: MemberRec) -> None:
    if s is None:
        return
    try:
        s.ask(
            "DetachMember",
            engine.opt.command_timeout_s,
            detach_member=agent_pb2.DetachMember(job=rec.job, member=rec.name),
        )
    except CpcoordError as e:  # it is detached here; the agent forgets it at reconnect
        log_event(
            log,
            logging.WARNING,
            "agent did not detach",
            job=rec.job,
            member=rec.name,
            node=rec.node,
            why=str(e),
        )


def mark_gone(engine: EngineView, job: str, member: str, detail: str) -> MemberRec | None:
    with engine.lock:
        rec = engine.members.get(job, member)
        if rec is None or rec.gone:
            return rec
        if tree_members.is_descendant(rec):
            tree_members.drop(engine, rec, detail)
            return None
        engine.events.publish("member_gone", job=job, member=member, node=rec.node, detail=detail)
        return engine.members.update(replace(rec, gone=True, detail=detail))


def reconcile(engine: EngineView, s: AgentSession) -> None:
    """Bring the agent's members in line with the catalog; then the node is ready."""
    held = {(h.job, h.member.name): h for h in s.hello.members}
    with engine.lock:
        recs = engine.members.on_node(s.node)
    try:
        for rec in recs:
            h = held.pop((rec.job, rec.name), None)
            if h is not None:
                if not h.alive:
                    mark_gone(engine, rec.job, rec.name, "exited while its agent was away")
                continue
            if rec.gone:
                continue
            try:
                s.ask("AttachMember", engine.opt.command_timeout_s, attach_member=_attach_msg(rec))
            except (NoSuchProcess, PidReused) as e:
                mark_gone(engine, rec.job, rec.name, str(e))
                continue
            with engine.lock:  # a fresh tracker: its next capture must be full
                cur = engine.members.get(rec.job, rec.name)
                if cur is not None:
                    engine.members.update(replace(cur, committed=0))
        for (job, name), _ in held.items():
            s.send(detach_member=agent_pb2.DetachMember(job=job, member=name))
    except (AgentUnavailable, AgentTimeout) as e:
        log_event(log, logging.WARNING, "reconcile stopped", node=s.node, why=str(e))
        return
    except CpcoordError as e:
        log_event(log, logging.ERROR, "reconcile failed", node=s.node, why=str(e))
    s.ready = True
    log_event(log, logging.INFO, "agent ready", node=s.node, members=len(recs))


def check_ready(engine: EngineView, job: str, recs: Sequence[MemberRec], hint: str = "") -> None:
    """Under the lock, before a flight of `job` begins: none is in flight (JobBusy), every
    member's process runs (MemberNotRunning, its detail + `hint`) and its node's agent is
    connected and reconciled (AgentUnavailable)."""
    busy = engine.flights.get(job)
    if busy is not None:
        raise JobBusy(job, busy.number)
    for m in recs:
        if m.gone:
            raise MemberNotRunning(m.name, m.job, f"{m.detail or 'its process exited'}{hint}")
        s = engine.agents.current(m.node)
        if s is None or not s.ready:
            raise AgentUnavailable(m.node)


def health(engine: EngineView, rec: MemberRec) -> tuple[str, str]:
    """RUNNING, GONE or AGENT_DISCONNECTED, with a detail."""
    if rec.gone:
        return "GONE", rec.detail
    s = engine.agents.current(rec.node)
    if s is None:
        return "AGENT_DISCONNECTED", f"node {rec.node} has no connected agent"
    if not s.ready:
        return "AGENT_DISCONNECTED", f"node {rec.node} is reconnecting"
    return "RUNNING", ""
