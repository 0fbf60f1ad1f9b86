"""The transition table itself: complete, each cell does what it says, and the copy in
docs/protocol.md is current (coordinator/protocol/table.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.protocol import TABLE, render_table
from coordinator.protocol.messages import (
    EVENT_TYPES,
    AgentFrozen,
    AgentLost,
    AgentPrepared,
    Begin,
    Cancel,
    Event,
    FreezeFailed,
    MemberFailed,
    MemberGone,
    MemberRestored,
    MemberStaged,
    MemberUploaded,
    StoreCommitted,
    StoreFailed,
    Tick,
)
from coordinator.protocol.values import AbortReason, GenState, Kind, Stats
from cpcoord.errors import CpcoordError
from tests.helpers.protocol import LAYOUT, to_state

ROOT = Path(__file__).resolve().parents[2]


def samples(event_type: type[Event]) -> list[Event]:
    """Well-formed instances of an event type, one per member/node where it names one."""
    make: dict[type[Event], Callable[[str, str], Event]] = {
        Begin: lambda m, n: Begin(100.0),
        AgentPrepared: lambda m, n: AgentPrepared(n, 100.0, (m,)),
        AgentFrozen: lambda m, n: AgentFrozen(n, (m,)),
        FreezeFailed: lambda m, n: FreezeFailed(n, m, "EPERM"),
        MemberStaged: lambda m, n: MemberStaged(n, m, Stats(pages=3)),
        MemberUploaded: lambda m, n: MemberUploaded(n, m),
        MemberRestored: lambda m, n: MemberRestored(n, m),
        MemberFailed: lambda m, n: MemberFailed(n, m, AbortReason.CAPTURE_FAILED, "EIO"),
        MemberGone: lambda m, n: MemberGone(n, m, "exit 9"),
        AgentLost: lambda m, n: AgentLost(n),
        Tick: lambda m, n: Tick(1e6),
        StoreCommitted: lambda m, n: StoreCommitted(),
        StoreFailed: lambda m, n: StoreFailed("ENOSPC"),
        Cancel: lambda m, n: Cancel("user"),
    }
    return [make[event_type](m, n) for m, n in LAYOUT.items()]


def test_table_is_complete() -> None:
    assert set(TABLE) == {(s, e) for s in GenState for e in EVENT_TYPES}
    for (state, _), cell in TABLE.items():
        assert not (cell.refuses and cell.targets)
        assert not cell.ignores or cell.targets == {state}


CELLS = [
    (k, s, e)
    for k in Kind
    for s in GenState
    for e in EVENT_TYPES
    if not (k is Kind.RESTORE and s is GenState.CAPTURED)  # a restore is never CAPTURED
]


@pytest.mark.parametrize(
    ("kind", "state", "event_type"),
    CELLS,
    ids=lambda x: x.__name__ if isinstance(x, type) else x.name,
)
def test_every_cell_does_what_the_table_says(
    kind: Kind, state: GenState, event_type: type[Event]
) -> None:
    cell = TABLE[(state, event_type)]
    moved = False
    for event in samples(event_type):
        g = to_state(state, kind)
        before = g.snapshot
        try:
            cmds = g.handle(event)
        except CpcoordError:
            assert g.snapshot == before, "a refusal changed the state"
            assert not cell.ignores
            continue
        assert not cell.refuses, f"{event} was accepted in {state}"
        assert g.state in cell.targets
        if cell.ignores:
            assert cmds == [] and g.snapshot == before
        moved = moved or g.snapshot != before
    # An acting cell has an effect on some sample, except a report that the other kind
    # refuses or that needs an earlier report first (MemberUploaded right after the barrier).
    inert = {(Kind.CHECKPOINT, MemberRestored), (Kind.RESTORE, MemberStaged)}
    inert |= {(Kind.RESTORE, MemberUploaded), (Kind.CHECKPOINT, MemberUploaded)}
    if not (cell.refuses or cell.ignores or (kind, event_type) in inert):
        assert moved, "no sample had any effect"


def test_docs_show_the_table() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    begin, end = "<!-- table:begin -->\n", "<!-- table:end -->"
    assert begin in doc and end in doc
    shown = doc.split(begin, 1)[1].split(end, 1)[0]
    assert shown == render_table(), (
        "docs/protocol.md is stale: python -m coordinator.protocol docs/protocol.md"
    )
