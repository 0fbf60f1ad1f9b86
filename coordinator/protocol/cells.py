"""The cells of the protocol table (coordinator/protocol/table.py) and the helpers its
actions share: refusing, progress, member lookups, the abort and the Freeze to every node.

Split from the table so the phases' actions (table.py, prepare.py) can share them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from coordinator.protocol.messages import (
    AgentFrozen,
    Command,
    DropGeneration,
    EmitProgress,
    Event,
    FreezeFailed,
    MemberFailed,
    ProgressEvent,
    SendAbort,
    SendFreeze,
)
from coordinator.protocol.values import (
    AbortReason,
    Deadlines,
    GenState,
    Kind,
    MemberRecord,
    MemberState,
    ProgressKind,
    Snapshot,
)
from cpcoord.errors import ProtocolViolation, UnknownMember

Result = tuple[Snapshot, tuple[Command, ...]]
Action = Callable[[Snapshot, Event], Result]


@dataclass(frozen=True)
class Cell:
    """One cell of the table: what `event` does in `state`."""

    action: Action
    targets: frozenset[GenState]  # states it may lead to; empty for a refusal
    rule: str  # the rule in words, rendered into docs/protocol.md
    refuses: bool = False
    ignores: bool = False


# -- helpers -------------------------------------------------------------------------


def refusal(snap: Snapshot, event: Event, why: str) -> ProtocolViolation:
    return ProtocolViolation(
        type(event).__name__, snap.state.name, snap.spec.job, snap.spec.generation, why
    )


def progress(
    snap: Snapshot, kind: ProgressKind, m: MemberRecord | None = None, **kw: object
) -> EmitProgress:
    sp = snap.spec
    done = snap.count(sp.done_state)
    ev = ProgressEvent(kind, sp.job, sp.generation, done=done, total=len(snap.members))
    if m is not None:
        ev = dataclasses.replace(ev, member=m.name, node=m.node, stats=m.stats)
    return EmitProgress(dataclasses.replace(ev, detail=snap.detail, **kw))  # type: ignore[arg-type]


def targets(snap: Snapshot, event: AgentFrozen | FreezeFailed | MemberFailed) -> list[str]:
    """The members an event names; an empty name means all of the node's members."""
    if event.node not in snap.spec.nodes:
        raise refusal(snap, event, f"node {event.node} holds no member of this generation")
    names = list(event.members) if isinstance(event, AgentFrozen) else [event.member]
    names = [n for n in names if n] or list(snap.spec.members_on(event.node))
    return [member(snap, event.node, n).name for n in names]


def member(snap: Snapshot, node: str, name: str) -> MemberRecord:
    rec = snap.member(name)
    if rec is None or rec.node != node:
        where = f"on node {node!r} in generation {snap.spec.generation}"
        raise UnknownMember(snap.spec.job, name, where)
    return rec


def set_members(snap: Snapshot, recs: Iterable[MemberRecord]) -> Snapshot:
    return snap.with_members(recs)


def live_nodes(snap: Snapshot) -> list[str]:
    return [n for n in snap.spec.nodes if n not in snap.lost]


def abort(snap: Snapshot, reason: AbortReason, detail: str = "") -> Result:
    """ABORTED: every reachable agent that got Freeze gets Abort (thaw, drop staging, keep
    the changed set pending); the driver drops the generation's catalog entry."""
    out: list[Command] = []
    if snap.state is not GenState.NEW:
        sp = snap.spec
        out += [SendAbort(n, sp.job, sp.generation, reason, detail) for n in live_nodes(snap)]
    if snap.spec.kind is Kind.CHECKPOINT:
        out.append(DropGeneration(snap.spec.job, snap.spec.generation, reason))
    new = dataclasses.replace(snap, state=GenState.ABORTED, reason=reason, detail=detail)
    out.append(progress(new, ProgressKind.ABORTED, reason=reason))
    return new, tuple(out)


def still_frozen(snap: Snapshot) -> list[MemberRecord]:
    """Members the lease still covers: not yet thawed (restore thaws all at the end)."""
    if snap.spec.kind is Kind.RESTORE:
        return list(snap.members)
    return [m for m in snap.members if m.state in (MemberState.PENDING, MemberState.FROZEN)]


def any_still_frozen(snap: Snapshot) -> bool:
    """`bool(still_frozen(snap))` without walking the members."""
    if snap.spec.kind is Kind.RESTORE:
        return bool(snap.members)
    return snap.count(MemberState.PENDING) + snap.count(MemberState.FROZEN) > 0


# -- actions -------------------------------------------------------------------------


def ignore_event(snap: Snapshot, event: Event) -> Result:
    return snap, ()


def refuser(why: str) -> Action:
    def act(snap: Snapshot, event: Event) -> Result:
        raise refusal(snap, event, why)

    return act


def act(action: Action, targets: Iterable[GenState], rule: str) -> Cell:
    return Cell(action, frozenset(targets), rule)


def refuse(why: str, action: Action | None = None) -> Cell:
    return Cell(action or refuser(why), frozenset(), "refused: " + why, refuses=True)


def ignore(state: GenState, why: str) -> Cell:
    return Cell(ignore_event, frozenset({state}), "ignored: " + why, ignores=True)


def freeze_all(snap: Snapshot, now: float, state: GenState = GenState.PREPARING) -> Result:
    """Freeze to every node, the freeze and lease deadlines from `now` (Begin, or the last
    Prepared of a prepare phase, whose deadline stays); progress FREEZE_SENT."""
    sp, t = snap.spec, snap.spec.timing
    old = snap.deadlines
    new = dataclasses.replace(
        snap,
        state=state,
        deadlines=Deadlines(
            now + t.freeze_timeout_s,
            now + t.lease_s,
            now + t.commit_timeout_s,
            old.prepare_at if old is not None else float("inf"),
        ),
    )
    out: list[Command] = [
        SendFreeze(n, sp.job, sp.generation, sp.kind, t.lease_s, sp.members_on(n))
        for n in sp.nodes
        if n not in snap.lost
    ]
    out.append(progress(new, ProgressKind.FREEZE_SENT))
    return new, tuple(out)
