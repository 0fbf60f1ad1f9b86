"""What an agent says on its control stream, turned into protocol events.

One function per message kind: a report about a generation becomes the core's event
for that generation's flight (reports about a generation no longer in flight are late
and dropped, as the core would ignore them anyway); MemberGone is also recorded in the
membership; CommandResults wake the waiting command; heartbeats only prove liveness.
`Uploaded` is believed only if the member's UploadPages stream completed here.
A `Staged` of a whole-memory member carries every thread's registers at the cut and its
kernel side (fds, offsets, queues): they are kept on the flight (checked, never logged)
for the manifest (commit.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from coordinator import levels, members_ops, partners, tree_members
from coordinator.flight import Flight
from coordinator.protocol.messages import (
    AgentFrozen,
    AgentPrepared,
    Event,
    FreezeFailed,
    MemberFailed,
    MemberGone,
    MemberRestored,
    MemberStaged,
    MemberUploaded,
)
from coordinator.protocol.values import AGENT_REASONS, MAX_WARNING, MAX_WARNINGS, AbortReason, Stats
from coordinator.store.manifest import ThreadRegs
from cpcoord import kstate
from cpcoord.errors import CpcoordError, InvalidArgument, ProtocolViolation
from cpcoord.faults import fault_point
from cpcoord.gen.v1 import agent_pb2, common_pb2
from cpcoord.log import log_event

if TYPE_CHECKING:
    from coordinator.agents import AgentSession
    from coordinator.engine_view import EngineView

log = logging.getLogger("cpcoord.coordinator.agent")


def stats_of(m: common_pb2.MemberStats, page_size: int) -> Stats:
    pages = int(m.pages)
    return Stats(
        pages=pages,
        bytes_logical=int(m.bytes_logical) or pages * page_size,
        bytes_stored_new=int(m.bytes_stored_new),
        frozen_seconds=max(0.0, float(m.frozen_seconds)),
        pages_written=int(m.pages_written),
        bytes_prefetched=int(m.bytes_prefetched),
        read_direct=int(m.read_direct),
        # (capped: a member with many fds must not get its report refused)
        kernel_warnings=tuple(w[:MAX_WARNING] for w in m.kernel_warnings[:MAX_WARNINGS]),
    )


def threads_of(
    msgs: Sequence[common_pb2.ThreadRegisters], starts: Sequence[int] = ()
) -> tuple[ThreadRegs, ...]:
    """A Staged's registers (and start times, parallel or empty) as the manifest keeps
    them, sorted by tid; InvalidArgument when they cannot be a process's threads."""
    if starts and len(starts) != len(msgs):
        raise InvalidArgument(f"Staged has {len(starts)} start times for {len(msgs)} threads")
    times = list(starts) or [0] * len(msgs)
    out = sorted(
        (
            ThreadRegs(t.tid, t.arch, bytes(t.regs), bytes(t.fpregs), int(st))
            for t, st in zip(msgs, times, strict=True)
        ),
        key=lambda t: t.tid,
    )
    tids = [t.tid for t in out]
    if len(set(tids)) != len(tids):
        raise InvalidArgument("Staged lists a thread twice")
    for t in out:
        if why := t.problem():
            raise InvalidArgument(f"Staged registers: {why}")
    return tuple(out)


def reason_of(value: int) -> AbortReason | None:
    try:
        name = common_pb2.AbortReason.Name(value)
    except ValueError:
        return None
    try:
        return AbortReason(name.removeprefix("ABORT_REASON_").lower())
    except ValueError:
        return None


def _flight(engine: EngineView, job: str, n: int) -> Flight | None:
    f = engine.flights.get(job)
    return f if f is not None and f.number == n else None


def handle(engine: EngineView, s: AgentSession, msg: agent_pb2.AgentMessage) -> None:
    """Dispatch one message (called by the stream's handler thread, in order)."""
    s.heard()
    kind = msg.WhichOneof("body")
    if kind == "heartbeat" or kind is None:
        return
    fault_point("coordinator.agent_message")
    if kind == "result":
        if not s.deliver(msg.result):
            log_event(
                log, logging.DEBUG, "unawaited result", node=s.node, command=msg.result.command_id
            )
        return
    if kind == "hello":
        raise ProtocolViolation("Hello", "attached", "-", 0, "a second Hello on one stream")
    if kind == "tree_members":
        tree_members.joined(engine, s, msg.tree_members)
        return
    if kind == "drained":
        levels.drained(engine, s, msg.drained)
        return
    if kind == "partnered":
        partners.partnered(engine, s, msg.partnered)
        return
    if kind == "member_gone":
        g = msg.member_gone
        members_ops.mark_gone(engine, g.job, g.member, g.detail or f"exit status {g.exit_status}")
        log_event(
            log,
            logging.WARNING,
            "member gone",
            job=g.job,
            member=g.member,
            node=s.node,
            detail=g.detail,
        )
        with engine.lock:
            f = engine.flights.get(g.job)
            if f is not None and f.gen.snapshot.member(g.member) is not None:
                engine.feed(f, MemberGone(s.node, g.member, g.detail))
        return
    body = getattr(msg, kind)
    with engine.lock:
        f = _flight(engine, body.job, body.generation)
        if f is None:
            log_event(
                log,
                logging.DEBUG,
                "late report",
                node=s.node,
                kind=kind,
                job=body.job,
                generation=body.generation,
            )
            return
        try:
            ev = _event(engine, f, s.node, kind, body)
        except CpcoordError as e:
            log_event(log, logging.WARNING, "report refused", node=s.node, kind=kind, why=str(e))
            return
        if ev is not None:
            engine.feed(f, ev)


def _event(engine: EngineView, f: Flight, node: str, kind: str, body: object) -> Event | None:
    ps = engine.opt.page_size
    if kind == "prepared":
        pr: agent_pb2.Prepared = body  # type: ignore[assignment]
        return AgentPrepared(node, engine.clock(), tuple(pr.members))
    if kind == "frozen":
        fr: agent_pb2.Frozen = body  # type: ignore[assignment]
        return AgentFrozen(node, tuple(m.name for m in fr.members))
    if kind == "staged":
        st: agent_pb2.Staged = body  # type: ignore[assignment]
        if st.threads and f.gen.snapshot.member(st.member) is not None:
            try:
                f.threads[st.member] = threads_of(st.threads, st.thread_start_times)
            except InvalidArgument as e:
                return MemberFailed(node, st.member, AbortReason.BAD_DATA, str(e))
        if st.stats.precopy_rounds:  # shown in the member's progress events (servicer)
            f.precopy[st.member] = st.stats
        if st.HasField("kernel") and f.gen.snapshot.member(st.member) is not None:
            try:
                f.kernel[st.member] = kstate.from_proto(st.kernel)
            except InvalidArgument as e:
                return MemberFailed(node, st.member, AbortReason.BAD_DATA, str(e))
        return MemberStaged(node, st.member, stats_of(st.stats, ps))
    if kind == "uploaded":
        up: agent_pb2.Uploaded = body  # type: ignore[assignment]
        done = f.uploads.get(up.member)
        if done is None:
            why = "reported Uploaded without a completed UploadPages stream"
            return MemberFailed(node, up.member, AbortReason.BAD_DATA, why)
        agent = stats_of(up.stats, ps)
        return MemberUploaded(
            node,
            up.member,
            Stats(
                pages=max(agent.pages, done.pages),
                bytes_logical=max(agent.pages, done.pages) * ps,
                bytes_stored_new=done.bytes_stored_new,
                frozen_seconds=agent.frozen_seconds,
            ),
        )
    if kind == "failed":
        fl: agent_pb2.Failed = body  # type: ignore[assignment]
        reason = reason_of(fl.reason)
        detail = fl.detail or (fl.error.message if fl.HasField("error") else "")
        if reason is AbortReason.FREEZE_FAILED:
            return FreezeFailed(node, fl.member, detail)
        if reason not in AGENT_REASONS or reason is None:
            raise InvalidArgument(f"Failed with reason {fl.reason} is not an agent's to give")
        if fl.member and fl.member not in detail:
            # Clients see this detail (e.g. a MISMATCH): it must name the member.
            detail = f"member {fl.member}: {detail}" if detail else f"member {fl.member}"
        return MemberFailed(node, fl.member, reason, detail)
    if kind == "restored":
        rs: agent_pb2.Restored = body  # type: ignore[assignment]
        if rs.stats.tracker_kept and f.gen.snapshot.member(rs.member) is not None:
            f.tracker_kept.add(rs.member)  # its next capture may stay incremental
        return MemberRestored(node, rs.member, stats_of(rs.stats, ps))
    raise InvalidArgument(f"unknown message {kind}")
