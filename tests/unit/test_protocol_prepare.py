"""The prepare phase of the protocol core (coordinator/protocol/prepare.py): nothing is
frozen before every agent is prepared, the prepare deadline is its own (the lease starts
at the Freeze), and an abort during the phase reaches every agent (which frees what it
prefetched)."""

from __future__ import annotations

from coordinator.protocol import Generation
from coordinator.protocol.messages import (
    AgentLost,
    AgentPrepared,
    Begin,
    Cancel,
    MemberFailed,
    SendAbort,
    SendFreeze,
    SendPrepare,
    Tick,
)
from coordinator.protocol.values import AbortReason, GenState, Kind
from tests.helpers.protocol import TIMING, spec


def _primed() -> tuple[Generation, list[object]]:
    g = Generation(spec(Kind.RESTORE, prepare=True))
    return g, list(g.handle(Begin(100.0)))


def test_prepare_goes_first_and_nothing_is_frozen_before_all_are_prepared() -> None:
    g, cmds = _primed()
    assert g.state is GenState.PRIMING
    assert {c.node for c in cmds if isinstance(c, SendPrepare)} == {"n1", "n2"}
    assert not any(isinstance(c, SendFreeze) for c in cmds)
    cmds = g.handle(AgentPrepared("n1", 150.0))
    assert not any(isinstance(c, SendFreeze) for c in cmds) and g.state is GenState.PRIMING
    cmds = g.handle(AgentPrepared("n1", 151.0))  # a repeat
    assert not any(isinstance(c, SendFreeze) for c in cmds)
    cmds = g.handle(AgentPrepared("n2", 160.0))
    assert {c.node for c in cmds if isinstance(c, SendFreeze)} == {"n1", "n2"}
    assert g.state is GenState.PREPARING


def test_the_lease_starts_at_the_freeze_not_at_begin() -> None:
    g, _ = _primed()
    slow = 100.0 + TIMING.lease_s + TIMING.freeze_timeout_s + 5  # a slow download
    assert g.handle(Tick(slow)) == [] and g.state is GenState.PRIMING
    g.handle(AgentPrepared("n1", slow))
    g.handle(AgentPrepared("n2", slow))
    d = g.snapshot.deadlines
    assert d is not None
    assert d.lease_at == slow + TIMING.lease_s and d.freeze_at == slow + TIMING.freeze_timeout_s
    assert g.next_deadline() == d.freeze_at


def test_prepare_timeout_aborts_and_tells_every_agent() -> None:
    g, _ = _primed()
    g.handle(AgentPrepared("n1", 101.0))
    assert g.next_deadline() == 100.0 + TIMING.prepare_timeout_s
    cmds = g.handle(Tick(100.0 + TIMING.prepare_timeout_s))
    assert g.state is GenState.ABORTED
    assert g.snapshot.reason is AbortReason.PREPARE_TIMEOUT and "n2" in g.snapshot.detail
    assert {c.node for c in cmds if isinstance(c, SendAbort)} == {"n1", "n2"}


def test_agent_lost_during_prepare_aborts_and_the_others_free_their_data() -> None:
    g, _ = _primed()
    g.handle(AgentPrepared("n2", 101.0))
    cmds = g.handle(AgentLost("n1", "stream broke"))
    assert g.snapshot.reason is AbortReason.AGENT_LOST
    assert [c.node for c in cmds if isinstance(c, SendAbort)] == ["n2"]
    assert g.handle(AgentPrepared("n2", 102.0)) == []  # late: ignored


def test_cancel_and_failure_during_prepare_abort_with_abort_to_every_agent() -> None:
    g, _ = _primed()
    cmds = g.handle(Cancel("user"))
    assert {c.node for c in cmds if isinstance(c, SendAbort)} == {"n1", "n2"}
    g, _ = _primed()
    cmds = g.handle(MemberFailed("n2", "c", AbortReason.RESTORE_FAILED, "download failed"))
    assert g.snapshot.reason is AbortReason.RESTORE_FAILED
    assert {c.node for c in cmds if isinstance(c, SendAbort)} == {"n1", "n2"}
    assert not any(isinstance(c, SendFreeze) for c in cmds)
