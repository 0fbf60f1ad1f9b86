"""The protocol core: one generation of one job as a sans-io state machine.

Owns the rules of DESIGN.md "The checkpoint protocol": the freeze barrier, early per-member
thaw, deadlines and the abort rules, for a checkpoint and for the restore-in-place variant
(prepare all: prefetch, then freeze all, write all, thaw all; the prepare phase's cells
are coordinator/protocol/prepare.py, the helpers they share coordinator/protocol/cells.py).
Events go in (`Generation.handle`), commands come out;
nothing here does I/O, reads a clock or knows gRPC. Time arrives as `Begin.now` and
`Tick.now` (seconds of the driver's monotonic clock). States and values live in
`coordinator.protocol.values`, events and commands in `coordinator.protocol.messages`;
the rules live here, in `TABLE`, one cell per
(generation state, event type). Each cell refuses (raises a ProtocolViolation, state
unchanged), ignores (no commands, state unchanged) or acts. docs/protocol.md renders the
table (`python -m coordinator.protocol`); a test keeps them equal.

One principle decides the failure cells: a failure aborts the generation only while it
can still cost data of the cut. A member whose copy is staged no longer needs its process
(so its death is recorded, not fatal); a member whose pages are uploaded no longer needs
its agent (so losing that agent is not fatal either: the agent never hears Committed and
keeps its changed set as pending, which can only make the next capture larger).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from coordinator.protocol.cells import (
    Cell,
    Result,
    abort,
    act,
    any_still_frozen,
    freeze_all,
    ignore,
    live_nodes,
    member,
    progress,
    refusal,
    refuse,
    set_members,
    still_frozen,
    targets,
)
from coordinator.protocol.messages import (
    AgentFrozen,
    AgentLost,
    AgentPrepared,
    Begin,
    Cancel,
    Command,
    Commit,
    Event,
    FreezeFailed,
    MemberFailed,
    MemberGone,
    MemberRestored,
    MemberStaged,
    MemberUploaded,
    SendCapture,
    SendCommitted,
    SendRestore,
    SendThaw,
    StoreCommitted,
    StoreFailed,
    Tick,
)
from coordinator.protocol.prepare import begin_prepare, prepare_tick, prepared
from coordinator.protocol.values import (
    AbortReason,
    GenState,
    Kind,
    MemberRecord,
    MemberState,
    ProgressKind,
    Snapshot,
    Spec,
)
from cpcoord.errors import CancelTooLate

Action = Callable[[Snapshot, Event], Result]


def _begin(snap: Snapshot, event: Event) -> Result:
    assert isinstance(event, Begin)
    if snap.spec.prepare:
        return begin_prepare(snap, event.now)
    return freeze_all(snap, event.now)


def _frozen(snap: Snapshot, event: Event) -> Result:
    assert isinstance(event, AgentFrozen)
    recs = [member(snap, event.node, n) for n in targets(snap, event)]
    pending = [r for r in recs if r.state is MemberState.PENDING]
    new = set_members(snap, (dataclasses.replace(r, state=MemberState.FROZEN) for r in pending))
    if new.count(MemberState.PENDING):
        return new, ()
    # The barrier: every member is frozen, the cut is taken.
    sp = new.spec
    new = dataclasses.replace(new, state=GenState.FROZEN)
    out: list[Command] = []
    for n in live_nodes(new):
        if sp.kind is Kind.CHECKPOINT:
            out.append(SendCapture(n, sp.job, sp.generation, sp.full, sp.members_on(n)))
        else:
            out.append(SendRestore(n, sp.job, sp.generation, sp.members_on(n)))
    out.append(progress(new, ProgressKind.BARRIER))
    return new, tuple(out)


def _member_failed(snap: Snapshot, event: Event) -> Result:
    assert isinstance(event, FreezeFailed | MemberFailed)
    reason = event.reason if isinstance(event, MemberFailed) else AbortReason.FREEZE_FAILED
    if any(_needs_agent(snap, member(snap, event.node, n)) for n in targets(snap, event)):
        return abort(snap, reason, f"node {event.node}: {event.detail or reason.value}")
    return snap, ()


def _needs_agent(snap: Snapshot, m: MemberRecord) -> bool:
    return m.state is not snap.spec.done_state


def _gone(snap: Snapshot, event: Event) -> Result:
    assert isinstance(event, MemberGone)
    m = member(snap, event.node, event.member)
    still_needed = (
        m.state is not MemberState.RESTORED
        if snap.spec.kind is Kind.RESTORE
        else m.state in (MemberState.PENDING, MemberState.FROZEN)
    )
    if still_needed:
        return abort(snap, AbortReason.MEMBER_DIED, f"{event.member}: {event.detail}")
    return snap, ()


def _lost(snap: Snapshot, event: Event) -> Result:
    assert isinstance(event, AgentLost)
    if event.node not in snap.spec.nodes or event.node in snap.lost:
        return snap, ()
    new = dataclasses.replace(snap, lost=snap.lost | {event.node})
    if snap.state in (GenState.NEW, GenState.PRIMING, GenState.PREPARING) or any(
        _needs_agent(snap, m) for m in snap.members if m.node == event.node
    ):
        return abort(new, AbortReason.AGENT_LOST, f"node {event.node}: {event.detail}")
    return new, ()


def _advance(kind: Kind, before: MemberState, after: MemberState, pk: ProgressKind) -> Action:
    """A per-member report: `before` -> `after`; a repeat (already at or past `after`) is a
    harmless duplicate; a report about a member that is not yet `before` is refused."""
    order = list(MemberState)

    def act(snap: Snapshot, event: Event) -> Result:
        assert isinstance(event, MemberStaged | MemberUploaded | MemberRestored)
        if snap.spec.kind is not kind:
            raise refusal(snap, event, f"only a {kind.value} generation has this event")
        m = member(snap, event.node, event.member)
        if order.index(m.state) >= order.index(after):
            return snap, ()
        if m.state is not before:
            raise refusal(snap, event, f"member {m.name} is {m.state.name}, not {before.name}")
        rec = dataclasses.replace(m, state=after, stats=m.stats.merge(event.stats))
        new = set_members(snap, [rec])
        out: list[Command] = [progress(new, pk, rec)]
        if new.count(after) != len(new.members) or after is MemberState.STAGED:
            return new, tuple(out)
        sp = new.spec
        if kind is Kind.RESTORE:  # written everywhere: thaw all at once
            new = dataclasses.replace(new, state=GenState.COMMITTED)
            out += [SendThaw(n, sp.job, sp.generation) for n in live_nodes(new)]
            out.append(progress(new, ProgressKind.COMMITTED))
        else:  # uploaded everywhere: the driver writes the manifest and flips the catalog
            new = dataclasses.replace(new, state=GenState.CAPTURED)
            out.append(Commit(sp.job, sp.generation, tuple(m.name for m in new.members)))
            out.append(progress(new, ProgressKind.CAPTURED))
        return new, tuple(out)

    return act


def _tick(snap: Snapshot, event: Event) -> Result:
    assert isinstance(event, Tick) and snap.deadlines is not None
    d, now = snap.deadlines, event.now
    if snap.state is GenState.PREPARING and now >= d.freeze_at:
        pending = [m.name for m in snap.members if m.state is MemberState.PENDING]
        return abort(snap, AbortReason.FREEZE_TIMEOUT, "not frozen: " + ", ".join(pending))
    if snap.state is GenState.FROZEN and now >= d.lease_at and any_still_frozen(snap):
        names = ", ".join(m.name for m in still_frozen(snap))
        return abort(snap, AbortReason.LEASE_EXPIRED, "still frozen: " + names)
    if now >= d.commit_at:
        return abort(snap, AbortReason.COMMIT_TIMEOUT, f"in state {snap.state.name}")
    return snap, ()


def _committed(snap: Snapshot, event: Event) -> Result:
    sp = snap.spec
    new = dataclasses.replace(snap, state=GenState.COMMITTED)
    out: list[Command] = [SendCommitted(n, sp.job, sp.generation) for n in live_nodes(new)]
    out.append(progress(new, ProgressKind.COMMITTED))
    return new, tuple(out)


def _store_failed(snap: Snapshot, event: Event) -> Result:
    assert isinstance(event, StoreFailed)
    return abort(snap, AbortReason.STORE_ERROR, event.detail)


def _cancel(snap: Snapshot, event: Event) -> Result:
    assert isinstance(event, Cancel)
    if snap.state in (GenState.CAPTURED, GenState.COMMITTED):
        raise CancelTooLate(snap.spec.generation, snap.spec.job, snap.state.name)
    return abort(snap, AbortReason.CANCELLED, event.detail)


# -- the table -----------------------------------------------------------------------
# One cell per (state, event type). act(action, targets, rule); refuse(why): raise,
# change nothing; ignore(state, why): no commands, change nothing.

N, PR, P, F, C, OK, AB = list(GenState)
_STAGED = _advance(
    Kind.CHECKPOINT, MemberState.FROZEN, MemberState.STAGED, ProgressKind.MEMBER_STAGED
)
_UPLOADED = _advance(
    Kind.CHECKPOINT, MemberState.STAGED, MemberState.UPLOADED, ProgressKind.MEMBER_UPLOADED
)
_RESTORED = _advance(
    Kind.RESTORE, MemberState.FROZEN, MemberState.RESTORED, ProgressKind.MEMBER_RESTORED
)


_UNSENT = "nothing was sent yet"
_EARLY = "before the barrier nothing is captured or written"
_NO_FREEZE = "no Freeze was sent yet (the prepare phase)"
_LATE = "a late or repeated report; the outcome is decided"
_IF_NEEDED = "abort with its reason, unless every member it names is UPLOADED (RESTORED): ignored"

# fmt: off
TABLE: dict[tuple[GenState, type[Event]], Cell] = {
    (N, Begin): act(_begin, [PR, P],
        "set the deadlines; with a prepare phase (restore): Prepare to every node; else "
        "Freeze to every node, progress FREEZE_SENT"),
    (N, AgentPrepared): refuse(_UNSENT),
    (N, AgentFrozen): refuse(_UNSENT),
    (N, FreezeFailed): refuse(_UNSENT),
    (N, MemberStaged): refuse(_UNSENT),
    (N, MemberUploaded): refuse(_UNSENT),
    (N, MemberRestored): refuse(_UNSENT),
    (N, MemberFailed): refuse(_UNSENT),
    (N, MemberGone): refuse(_UNSENT),
    (N, AgentLost): act(_lost, [N, AB], "a node of the job: abort agent_lost (nothing to send)"),
    (N, Tick): ignore(N, "no deadline runs before Begin"),
    (N, StoreCommitted): refuse("nothing to commit"),
    (N, StoreFailed): act(_store_failed, [AB], "abort store_error"),
    (N, Cancel): act(_cancel, [AB], "abort cancelled (nothing to send)"),
    (PR, Begin): refuse("already begun"),
    (PR, AgentPrepared): act(prepared, [PR, P],
        "the node is prepared (repeats ignored); when every live node is: Freeze to every "
        "node, the freeze, lease and commit deadlines from now, progress FREEZE_SENT"),
    (PR, AgentFrozen): refuse(_NO_FREEZE),
    (PR, FreezeFailed): refuse(_NO_FREEZE),
    (PR, MemberStaged): refuse(_EARLY),
    (PR, MemberUploaded): refuse(_EARLY),
    (PR, MemberRestored): refuse(_EARLY),
    (PR, MemberFailed): act(_member_failed, [AB],
        "abort with its reason (Abort to every live node: they free what they prepared)"),
    (PR, MemberGone): act(_gone, [AB], "abort member_died"),
    (PR, AgentLost): act(_lost, [PR, AB], "a node of the job: abort agent_lost; others ignored"),
    (PR, Tick): act(prepare_tick, [PR, AB],
        "at the prepare deadline: abort prepare_timeout; at the commit deadline: abort "
        "commit_timeout"),
    (PR, StoreCommitted): refuse("nothing to commit"),
    (PR, StoreFailed): act(_store_failed, [AB], "abort store_error"),
    (PR, Cancel): act(_cancel, [AB], "abort cancelled"),
    (P, Begin): refuse("already begun"),
    (P, AgentPrepared): ignore(P, "a repeat: the Freeze is out"),
    (P, AgentFrozen): act(_frozen, [P, F],
        "the named (empty: all the node's) members PENDING->FROZEN, repeats ignored; when "
        "none is PENDING: the barrier: Capture (Restore) to every node, progress BARRIER"),
    (P, FreezeFailed): act(_member_failed, [AB], "abort freeze_failed"),
    (P, MemberStaged): refuse(_EARLY),
    (P, MemberUploaded): refuse(_EARLY),
    (P, MemberRestored): refuse(_EARLY),
    (P, MemberFailed): act(_member_failed, [AB], "abort with its reason"),
    (P, MemberGone): act(_gone, [AB], "abort member_died"),
    (P, AgentLost): act(_lost, [P, AB], "a node of the job: abort agent_lost; others ignored"),
    (P, Tick): act(_tick, [P, AB], "at the freeze deadline: abort freeze_timeout"),
    (P, StoreCommitted): refuse("nothing to commit"),
    (P, StoreFailed): act(_store_failed, [AB], "abort store_error"),
    (P, Cancel): act(_cancel, [AB], "abort cancelled"),
    (F, Begin): refuse("already begun"),
    (F, AgentPrepared): ignore(F, _LATE),
    (F, AgentFrozen): ignore(F, "a repeat: every member is past the barrier"),
    (F, FreezeFailed): act(_member_failed, [F, AB], _IF_NEEDED),
    (F, MemberStaged): act(_STAGED, [F],
        "checkpoint: the member FROZEN->STAGED (its agent thawed it), progress "
        "MEMBER_STAGED; a repeat is ignored; refused in a restore"),
    (F, MemberUploaded): act(_UPLOADED, [F, C],
        "checkpoint: the member STAGED->UPLOADED, progress MEMBER_UPLOADED; refused before "
        "STAGED; a repeat is ignored; when all are UPLOADED: Commit, progress CAPTURED"),
    (F, MemberRestored): act(_RESTORED, [F, OK],
        "restore: the member FROZEN->RESTORED, progress MEMBER_RESTORED; a repeat is "
        "ignored; when all are RESTORED: Thaw to every node, progress COMMITTED"),
    (F, MemberFailed): act(_member_failed, [F, AB], _IF_NEEDED),
    (F, MemberGone): act(_gone, [F, AB],
        "abort member_died, unless the member is STAGED or UPLOADED (RESTORED): ignored"),
    (F, AgentLost): act(_lost, [F, AB],
        "abort agent_lost if the node has a member not UPLOADED (RESTORED), else recorded"),
    (F, Tick): act(_tick, [F, AB],
        "at the lease deadline with a member still frozen: abort lease_expired; at the "
        "commit deadline: abort commit_timeout"),
    (F, StoreCommitted): refuse("no Commit was issued"),
    (F, StoreFailed): act(_store_failed, [AB], "abort store_error"),
    (F, Cancel): act(_cancel, [AB], "abort cancelled"),
    (C, Begin): refuse("already begun"),
    (C, AgentPrepared): ignore(C, _LATE),
    (C, AgentFrozen): ignore(C, _LATE),
    (C, FreezeFailed): ignore(C, "every member is uploaded"),
    (C, MemberStaged): ignore(C, "a repeat: every member is uploaded"),
    (C, MemberUploaded): ignore(C, "a repeat: every member is uploaded"),
    (C, MemberRestored): refuse("only a restore has this event"),
    (C, MemberFailed): ignore(C, "every member is uploaded"),
    (C, MemberGone): ignore(C, "every member is staged"),
    (C, AgentLost): act(_lost, [C], "recorded: that node gets no Committed (keeps pending)"),
    (C, Tick): act(_tick, [C, AB],
        "at the commit deadline: abort commit_timeout (so the driver's catalog flip must be "
        "conditional: it flips only a generation still in flight)"),
    (C, StoreCommitted): act(_committed, [OK], "Committed to every live node; progress COMMITTED"),
    (C, StoreFailed): act(_store_failed, [AB], "abort store_error"),
    (C, Cancel): refuse("CancelTooLate, the store is committing", _cancel),
    (OK, Begin): refuse("already begun"),
    (OK, AgentPrepared): ignore(OK, _LATE),
    (OK, AgentFrozen): ignore(OK, _LATE),
    (OK, FreezeFailed): ignore(OK, _LATE),
    (OK, MemberStaged): ignore(OK, _LATE),
    (OK, MemberUploaded): ignore(OK, _LATE),
    (OK, MemberRestored): ignore(OK, _LATE),
    (OK, MemberFailed): ignore(OK, _LATE),
    (OK, MemberGone): ignore(OK, _LATE),
    (OK, AgentLost): ignore(OK, _LATE),
    (OK, Tick): ignore(OK, "terminal"),
    (OK, StoreCommitted): ignore(OK, "a repeat"),
    (OK, StoreFailed): refuse("committed; a store failure now is a driver bug"),
    (OK, Cancel): refuse("CancelTooLate, committed", _cancel),
    (AB, Begin): refuse("already begun"),
    (AB, AgentPrepared): ignore(AB, _LATE),
    (AB, AgentFrozen): ignore(AB, _LATE + " (Abort follows Freeze on the same stream)"),
    (AB, FreezeFailed): ignore(AB, _LATE),
    (AB, MemberStaged): ignore(AB, _LATE),
    (AB, MemberUploaded): ignore(AB, _LATE),
    (AB, MemberRestored): ignore(AB, _LATE),
    (AB, MemberFailed): ignore(AB, _LATE),
    (AB, MemberGone): ignore(AB, _LATE),
    (AB, AgentLost): ignore(AB, _LATE),
    (AB, Tick): ignore(AB, "terminal"),
    (AB, StoreCommitted): refuse("aborted: the catalog must not flip an aborted generation"),
    (AB, StoreFailed): ignore(AB, "a repeat"),
    (AB, Cancel): ignore(AB, "already aborted"),
}
# fmt: on


def step(snap: Snapshot, event: Event) -> Result:
    """The pure transition: the next snapshot and the commands, or an error (unchanged)."""
    cell = TABLE.get((snap.state, type(event)))
    if cell is None:
        raise refusal(snap, event, "not an event of the protocol")
    return cell.action(snap, event)


class Generation:
    """One generation as an h11-style object: `handle(event)` returns commands or raises a
    CpcoordError and then changes nothing."""

    def __init__(self, spec: Spec) -> None:
        self._snap = Snapshot.start(spec)

    @property
    def snapshot(self) -> Snapshot:
        return self._snap

    @property
    def state(self) -> GenState:
        return self._snap.state

    @property
    def terminal(self) -> bool:
        return self._snap.state in (GenState.COMMITTED, GenState.ABORTED)

    def handle(self, event: Event) -> list[Command]:
        self._snap, cmds = step(self._snap, event)
        return list(cmds)

    def next_deadline(self) -> float | None:
        """When the driver should Tick next (None: no deadline runs)."""
        s, d = self._snap, self._snap.deadlines
        if d is None or self.terminal:
            return None
        if s.state is GenState.PRIMING:
            return min(d.prepare_at, d.commit_at)
        if s.state is GenState.PREPARING:
            return d.freeze_at
        if s.state is GenState.FROZEN and any_still_frozen(s):
            return d.lease_at
        return d.commit_at


def render_table() -> str:
    """The table as Markdown, for docs/protocol.md."""
    lines = ["| state | event | next | rule |", "| --- | --- | --- | --- |"]
    for (state, ev), cell in TABLE.items():
        nxt = ", ".join(s.name for s in GenState if s in cell.targets) or "—"
        lines.append(f"| {state.name} | {ev.__name__} | {nxt} | {cell.rule} |")
    return "\n".join(lines) + "\n"
