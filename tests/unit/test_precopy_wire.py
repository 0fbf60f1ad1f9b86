"""How the coordinator asks agents for pre-copy: a checkpoint's Freeze carries `precopy`,
its time (half the freeze deadline) and whether the node's members are all full; a
restore's never does; `--no-precopy` turns it off."""

from __future__ import annotations

from coordinator.flight import CheckpointOptions
from coordinator.outbound import outbound
from coordinator.protocol.messages import SendFreeze
from coordinator.protocol.values import Kind
from cpcoord.gen.v1 import agent_pb2


def test_half_the_freeze_deadline_goes_to_precopy() -> None:
    assert CheckpointOptions("j").precopy_ms() == 2500  # lease 10 s, freeze 5 s
    assert CheckpointOptions("j", lease_ms=4000, freeze_timeout_ms=1000).precopy_ms() == 500
    assert CheckpointOptions("j", precopy=False).precopy_ms() == 0


def test_a_checkpoint_freeze_asks_for_precopy() -> None:
    c = SendFreeze("n1", "j", 3, Kind.CHECKPOINT, 10.0, ("a", "b"))
    msg = outbound(c, frozenset({"n1"}), 2500).message
    assert isinstance(msg, agent_pb2.Freeze)
    assert (msg.precopy, msg.precopy_ms, msg.full) == (True, 2500, True)
    msg = outbound(c, frozenset({"n2"}), 2500).message
    assert isinstance(msg, agent_pb2.Freeze)
    assert (msg.precopy, msg.full) == (True, False)
    off = outbound(c, frozenset({"n1"}), 0).message
    assert isinstance(off, agent_pb2.Freeze)
    assert (off.precopy, off.precopy_ms, off.full) == (False, 0, False)


def test_a_restore_freeze_never_does() -> None:
    c = SendFreeze("n1", "j", 3, Kind.RESTORE, 10.0, ("a",))
    msg = outbound(c, frozenset({"n1"}), 2500).message
    assert isinstance(msg, agent_pb2.Freeze)
    assert not msg.precopy and msg.precopy_ms == 0
