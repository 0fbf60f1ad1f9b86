"""The protocol core flow by flow: checkpoint, restore, deadlines, aborts, refusals
(coordinator/protocol/table.py; the cells one by one: test_protocol_table.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from coordinator.protocol import Generation
from coordinator.protocol.messages import (
    AgentFrozen,
    AgentLost,
    Begin,
    Cancel,
    Command,
    Commit,
    DropGeneration,
    Event,
    FreezeFailed,
    MemberFailed,
    MemberGone,
    MemberRestored,
    MemberStaged,
    MemberUploaded,
    SendAbort,
    SendCapture,
    SendCommitted,
    SendFreeze,
    SendRestore,
    SendThaw,
    StoreCommitted,
    StoreFailed,
    Tick,
)
from coordinator.protocol.values import (
    AbortReason,
    GenState,
    Kind,
    MemberState,
    ProgressKind,
    Spec,
    Stats,
    Timing,
)
from cpcoord.errors import CancelTooLate, CpcoordError, ProtocolViolation, UnknownMember
from tests.helpers.protocol import LAYOUT, progress, spec, to_state, without_progress


def test_checkpoint_happy_path() -> None:
    g = Generation(spec(full=True))
    cmds = g.handle(Begin(100.0))
    assert without_progress(cmds) == [
        SendFreeze("n1", "train", 7, Kind.CHECKPOINT, 10.0, ("a", "b")),
        SendFreeze("n2", "train", 7, Kind.CHECKPOINT, 10.0, ("c",)),
    ]
    assert progress(cmds) == [ProgressKind.FREEZE_SENT]
    assert g.handle(AgentFrozen("n1", ("a",))) == []
    assert g.handle(AgentFrozen("n2")) == []  # b on n1 is still pending: no barrier
    cmds = g.handle(AgentFrozen("n1", ("b",)))
    assert without_progress(cmds) == [
        SendCapture("n1", "train", 7, True, ("a", "b")),
        SendCapture("n2", "train", 7, True, ("c",)),
    ]
    assert progress(cmds) == [ProgressKind.BARRIER] and g.state is GenState.FROZEN
    cmds = g.handle(MemberStaged("n2", "c", Stats(pages=5, frozen_seconds=0.25)))
    assert progress(cmds) == [ProgressKind.MEMBER_STAGED]
    assert g.snapshot.member("c").state is MemberState.STAGED  # type: ignore[union-attr]
    assert g.snapshot.member("a").state is MemberState.FROZEN  # type: ignore[union-attr]
    g.handle(MemberUploaded("n2", "c", Stats(pages=5, bytes_stored_new=100)))
    for m in ("a", "b"):
        g.handle(MemberStaged("n1", m, Stats(pages=1, bytes_logical=4096, frozen_seconds=0.5)))
    assert g.handle(MemberUploaded("n1", "a"))[0].event.done == 2  # type: ignore[attr-defined]
    cmds = g.handle(MemberUploaded("n1", "b"))
    assert without_progress(cmds) == [Commit("train", 7, ("a", "b", "c"))]
    assert progress(cmds) == [ProgressKind.MEMBER_UPLOADED, ProgressKind.CAPTURED]
    assert g.state is GenState.CAPTURED
    cmds = g.handle(StoreCommitted())
    assert without_progress(cmds) == [
        SendCommitted("n1", "train", 7),
        SendCommitted("n2", "train", 7),
    ]
    assert g.state is GenState.COMMITTED and g.terminal and g.next_deadline() is None
    assert g.snapshot.totals() == Stats(7, 8192, 100, 0.5)


def test_upload_before_staged_is_refused_and_changes_nothing() -> None:
    g = to_state(GenState.FROZEN)
    before = g.snapshot
    with pytest.raises(ProtocolViolation, match="member a is FROZEN, not STAGED"):
        g.handle(MemberUploaded("n1", "a"))
    assert g.snapshot == before


def test_reports_before_the_barrier_are_refused() -> None:
    g = to_state(GenState.PREPARING)
    with pytest.raises(ProtocolViolation, match="before the barrier"):
        g.handle(MemberStaged("n1", "a"))


@pytest.mark.parametrize(
    "event",
    [
        AgentFrozen("n2", ("a",)),  # a lives on n1
        AgentFrozen("n1", ("zz",)),
        MemberStaged("n9", "c"),
        MemberFailed("n2", "b", AbortReason.BAD_DATA),
    ],
)
def test_unknown_member_or_wrong_node_is_refused(event: Event) -> None:
    g = to_state(GenState.PREPARING if isinstance(event, AgentFrozen) else GenState.FROZEN)
    before = g.snapshot
    with pytest.raises(UnknownMember, match="job train has no member"):
        g.handle(event)
    assert g.snapshot == before


@pytest.mark.parametrize(
    "event", [AgentFrozen("n9"), FreezeFailed("n9"), MemberFailed("n9", "", AbortReason.BAD_DATA)]
)
def test_a_node_outside_the_generation_is_refused(event: Event) -> None:
    g = to_state(GenState.PREPARING)
    before = g.snapshot
    with pytest.raises(ProtocolViolation, match="node n9 holds no member"):
        g.handle(event)
    assert g.snapshot == before


def test_an_unknown_event_type_is_refused() -> None:
    g = to_state(GenState.FROZEN)
    with pytest.raises(ProtocolViolation, match="not an event of the protocol"):
        g.handle(Event())


def test_duplicates_are_ignored() -> None:
    g = to_state(GenState.FROZEN)
    assert g.handle(AgentFrozen("n1")) == []
    g.handle(MemberStaged("n1", "a"))
    assert g.handle(MemberStaged("n1", "a")) == []
    g.handle(MemberUploaded("n1", "a"))
    assert g.handle(MemberUploaded("n1", "a")) == []
    assert g.handle(MemberStaged("n1", "a")) == []
    g2 = to_state(GenState.PREPARING)
    g2.handle(AgentFrozen("n1", ("a",)))
    assert g2.handle(AgentFrozen("n1", ("a",))) == []


def abort_of(cmds: list[Command]) -> tuple[set[str], AbortReason | None]:
    nodes = {c.node for c in cmds if isinstance(c, SendAbort)}
    reasons = {c.reason for c in cmds if isinstance(c, SendAbort | DropGeneration)}
    assert len(reasons) <= 1
    return nodes, next(iter(reasons), None)


def test_freeze_timeout() -> None:
    g = to_state(GenState.PREPARING)
    g.handle(AgentFrozen("n1"))
    assert g.next_deadline() == 104.0
    assert g.handle(Tick(103.9)) == []
    cmds = g.handle(Tick(104.0))
    assert abort_of(cmds) == ({"n1", "n2"}, AbortReason.FREEZE_TIMEOUT)
    assert g.snapshot.detail == "not frozen: c"
    assert progress(cmds) == [ProgressKind.ABORTED]


def test_lease_expires_only_while_a_member_is_still_frozen() -> None:
    g = to_state(GenState.FROZEN)
    assert g.next_deadline() == 110.0
    for m, n in LAYOUT.items():
        if m != "b":
            g.handle(MemberStaged(n, m))
    cmds = g.handle(Tick(110.0))
    assert abort_of(cmds) == ({"n1", "n2"}, AbortReason.LEASE_EXPIRED)
    assert g.snapshot.detail == "still frozen: b"
    g = to_state(GenState.FROZEN)
    for m, n in LAYOUT.items():
        g.handle(MemberStaged(n, m))
    assert g.next_deadline() == 160.0  # everyone thawed: only the commit deadline runs
    assert g.handle(Tick(159.0)) == [] and g.state is GenState.FROZEN
    assert abort_of(g.handle(Tick(160.0)))[1] is AbortReason.COMMIT_TIMEOUT


def test_commit_timeout_while_the_store_commits() -> None:
    g = to_state(GenState.CAPTURED)
    assert g.next_deadline() == 160.0
    cmds = g.handle(Tick(161.0))
    assert abort_of(cmds) == ({"n1", "n2"}, AbortReason.COMMIT_TIMEOUT)
    with pytest.raises(ProtocolViolation, match="must not flip"):
        g.handle(StoreCommitted())


def test_agent_lost_before_upload_aborts_without_talking_to_it() -> None:
    g = to_state(GenState.FROZEN)
    g.handle(MemberStaged("n2", "c"))
    cmds = g.handle(AgentLost("n2", "stream reset"))
    assert abort_of(cmds) == ({"n1"}, AbortReason.AGENT_LOST)
    assert g.snapshot.lost == {"n2"}
    assert [c for c in cmds if isinstance(c, DropGeneration)] == [
        DropGeneration("train", 7, AbortReason.AGENT_LOST)
    ]


def test_agent_lost_after_its_members_uploaded_is_harmless() -> None:
    g = to_state(GenState.FROZEN)
    g.handle(MemberStaged("n2", "c"))
    g.handle(MemberUploaded("n2", "c"))
    assert g.handle(AgentLost("n2")) == []
    for m in ("a", "b"):
        g.handle(MemberStaged("n1", m))
        g.handle(MemberUploaded("n1", m))
    cmds = g.handle(StoreCommitted())
    assert without_progress(cmds) == [SendCommitted("n1", "train", 7)]  # n2 keeps pending


def test_agent_lost_of_another_node_is_ignored() -> None:
    g = to_state(GenState.PREPARING)
    assert g.handle(AgentLost("n7")) == [] and g.state is GenState.PREPARING


def test_member_gone_before_and_after_staging() -> None:
    g = to_state(GenState.FROZEN)
    g.handle(MemberStaged("n1", "a"))
    assert g.handle(MemberGone("n1", "a", "exit 0")) == []  # its copy is staged already
    cmds = g.handle(MemberGone("n1", "b", "killed by 9"))
    assert abort_of(cmds) == ({"n1", "n2"}, AbortReason.MEMBER_DIED)
    assert g.snapshot.detail == "b: killed by 9"


def test_member_failure_after_upload_is_ignored_before_it_aborts() -> None:
    g = to_state(GenState.FROZEN)
    g.handle(MemberStaged("n1", "a"))
    g.handle(MemberUploaded("n1", "a"))
    assert g.handle(MemberFailed("n1", "a", AbortReason.UPLOAD_FAILED)) == []
    cmds = g.handle(MemberFailed("n1", "", AbortReason.BAD_DATA, "id mismatch"))
    assert abort_of(cmds) == ({"n1", "n2"}, AbortReason.BAD_DATA)
    assert g.snapshot.detail == "node n1: id mismatch"


def test_store_failure_aborts_and_is_final() -> None:
    g = to_state(GenState.CAPTURED)
    cmds = g.handle(StoreFailed("ENOSPC"))
    assert abort_of(cmds) == ({"n1", "n2"}, AbortReason.STORE_ERROR)
    assert g.snapshot.reason is AbortReason.STORE_ERROR and g.snapshot.detail == "ENOSPC"
    for ev in (StoreFailed("again"), Cancel(), Tick(1e9), MemberStaged("n1", "a")):
        assert g.handle(ev) == [] and g.state is GenState.ABORTED


def test_cancel() -> None:
    g = Generation(spec())
    cmds = g.handle(Cancel("changed my mind"))
    assert without_progress(cmds) == [DropGeneration("train", 7, AbortReason.CANCELLED)]
    for state in (GenState.CAPTURED, GenState.COMMITTED):
        g = to_state(state)
        with pytest.raises(CancelTooLate, match=f"it is {state.name}"):
            g.handle(Cancel())
        assert g.state is state


def test_nothing_before_begin() -> None:
    g = Generation(spec())
    assert g.handle(Tick(1e9)) == [] and g.next_deadline() is None
    with pytest.raises(ProtocolViolation, match="nothing was sent yet"):
        g.handle(AgentFrozen("n1"))
    cmds = g.handle(AgentLost("n2"))
    assert not [c for c in cmds if isinstance(c, SendAbort)] and g.state is GenState.ABORTED


def test_restore_freezes_all_writes_all_then_thaws_all() -> None:
    g = to_state(GenState.PREPARING, Kind.RESTORE)
    cmds = g.handle(AgentFrozen("n1"))
    assert cmds == []
    cmds = g.handle(AgentFrozen("n2"))
    assert without_progress(cmds) == [
        SendRestore("n1", "train", 7, ("a", "b")),
        SendRestore("n2", "train", 7, ("c",)),
    ]
    assert g.handle(MemberRestored("n1", "a"))[0].event.kind is ProgressKind.MEMBER_RESTORED  # type: ignore[attr-defined]
    assert g.next_deadline() == 110.0  # every member stays frozen until the end
    with pytest.raises(ProtocolViolation, match="only a checkpoint"):
        g.handle(MemberStaged("n1", "b"))
    g.handle(MemberRestored("n1", "b"))
    cmds = g.handle(MemberRestored("n2", "c"))
    assert without_progress(cmds) == [SendThaw("n1", "train", 7), SendThaw("n2", "train", 7)]
    assert g.state is GenState.COMMITTED


def test_restore_abort_and_lease() -> None:
    g = to_state(GenState.FROZEN, Kind.RESTORE)
    g.handle(MemberRestored("n1", "a"))
    assert g.handle(MemberGone("n1", "a")) == []  # written already
    cmds = g.handle(MemberFailed("n2", "c", AbortReason.MISMATCH, "region heap shrank"))
    assert abort_of(cmds) == ({"n1", "n2"}, AbortReason.MISMATCH)
    assert not [c for c in cmds if isinstance(c, DropGeneration)]  # a restore has no entry
    assert g.snapshot.reason is AbortReason.MISMATCH
    g = to_state(GenState.FROZEN, Kind.RESTORE)
    for m, n in LAYOUT.items():
        if m != "c":
            g.handle(MemberRestored(n, m))
    assert g.handle(Tick(110.0))[0] == SendAbort(
        "n1", "train", 7, AbortReason.LEASE_EXPIRED, "still frozen: a, b, c"
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: Spec.of("j", 1, {}),
        lambda: Spec.of("", 1, {"a": "n"}),
        lambda: Spec.of("j", 0, {"a": "n"}),
        lambda: Spec("j", 1, (("a", "n"), ("a", "m"))),
        lambda: Spec.of("j", 1, {"a": ""}),
        lambda: Timing(lease_s=5, freeze_timeout_s=6),
        lambda: Timing(lease_s=float("nan")),
        lambda: Timing(commit_timeout_s=1),
        lambda: Stats(pages=-1),
        lambda: Stats(frozen_seconds=float("inf")),
        lambda: MemberFailed("n", "a", AbortReason.AGENT_LOST),
        lambda: Tick(float("nan")),
        lambda: AgentFrozen(""),
    ],
)
def test_bad_values_are_refused(make: Callable[[], object]) -> None:
    with pytest.raises(CpcoordError) as exc:
        make()
    assert exc.value.exit_code == 20
