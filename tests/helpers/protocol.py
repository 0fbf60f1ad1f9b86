"""A small generation for the protocol core's unit tests (test_protocol.py,
test_protocol_table.py): three members on two nodes (`LAYOUT`), its `spec`, and
`to_state`, which drives a generation by legal events into any state.
"""

from __future__ import annotations

from coordinator.protocol import Generation
from coordinator.protocol.messages import (
    AgentFrozen,
    AgentPrepared,
    Begin,
    Cancel,
    Command,
    EmitProgress,
    MemberRestored,
    MemberStaged,
    MemberUploaded,
    StoreCommitted,
)
from coordinator.protocol.values import GenState, Kind, ProgressKind, Spec, Timing

LAYOUT = {"a": "n1", "b": "n1", "c": "n2"}
TIMING = Timing(lease_s=10.0, freeze_timeout_s=4.0, commit_timeout_s=60.0, prepare_timeout_s=30.0)


def spec(kind: Kind = Kind.CHECKPOINT, full: bool = False, prepare: bool = False) -> Spec:
    return Spec.of("train", 7, LAYOUT, kind=kind, full=full, timing=TIMING, prepare=prepare)


def progress(cmds: list[Command]) -> list[ProgressKind]:
    return [c.event.kind for c in cmds if isinstance(c, EmitProgress)]


def without_progress(cmds: list[Command]) -> list[Command]:
    return [c for c in cmds if not isinstance(c, EmitProgress)]


def to_state(state: GenState, kind: Kind = Kind.CHECKPOINT) -> Generation:
    """A generation driven by legal events into `state`. A restore (and PRIMING of any
    kind) goes through the prepare phase, as the coordinator's restores do."""
    g = Generation(spec(kind, prepare=kind is Kind.RESTORE or state is GenState.PRIMING))
    if state is GenState.NEW:
        return g
    g.handle(Begin(100.0))
    if state is GenState.PRIMING:
        return g
    if g.state is GenState.PRIMING:
        g.handle(AgentPrepared("n1", 100.0))
        g.handle(AgentPrepared("n2", 100.0))
    if state is GenState.PREPARING:
        return g
    g.handle(AgentFrozen("n1"))
    g.handle(AgentFrozen("n2", ("c",)))
    if state is GenState.FROZEN:
        return g
    if state is GenState.ABORTED:
        g.handle(Cancel("test"))
        return g
    if kind is Kind.RESTORE:
        for m, n in LAYOUT.items():
            g.handle(MemberRestored(n, m))
        assert g.state is GenState.COMMITTED
        return g
    for m, n in LAYOUT.items():
        g.handle(MemberStaged(n, m))
        g.handle(MemberUploaded(n, m))
    if state is GenState.COMMITTED:
        g.handle(StoreCommitted())
    assert g.state is state
    return g
