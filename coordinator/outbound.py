"""The core's Send* commands as the agent-bound messages of the control stream.

Pure translation (no I/O, no engine state): each command becomes the body field of a
CoordinatorMessage and its message. `required` says what a missing agent means: a
Freeze, Capture or Restore that cannot be sent is the agent lost (the engine feeds
AgentLost); an Abort, Committed or Thaw to an agent that is gone has nothing left to do.
The restore Freeze's layouts and the restore Prepare's differing pages come from the
manifests; the engine adds them (restore.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message

from coordinator.protocol.messages import (
    SendAbort,
    SendCapture,
    SendCommitted,
    SendFreeze,
    SendPrepare,
    SendRestore,
    SendThaw,
)
from cpcoord.gen.v1 import agent_pb2

SendCommand = (
    SendPrepare | SendFreeze | SendCapture | SendAbort | SendCommitted | SendRestore | SendThaw
)
SEND_COMMANDS = (
    SendPrepare,
    SendFreeze,
    SendCapture,
    SendAbort,
    SendCommitted,
    SendRestore,
    SendThaw,
)


@dataclass(frozen=True)
class Outbound:
    node: str
    field: str  # the CoordinatorMessage body field
    message: Message
    required: bool  # not connected: the core hears AgentLost


def outbound(c: SendCommand, full_nodes: frozenset[str], precopy_ms: int = 0) -> Outbound:
    """The message for command `c`; `full_nodes` must capture in full (their trackers do
    not count from the parent); `precopy_ms` > 0: a checkpoint's Freeze asks for pre-copy
    of the members captured in full, bounded by that time."""
    if isinstance(c, SendPrepare):
        prep = agent_pb2.Prepare(
            job=c.job,
            generation=c.generation,
            kind="OPERATION_KIND_" + c.kind.name,
            members=[agent_pb2.PrepareMember(member=m) for m in c.members],
        )
        return Outbound(c.node, "prepare", prep, True)
    if isinstance(c, SendFreeze):
        freeze = agent_pb2.Freeze(
            job=c.job,
            generation=c.generation,
            kind="OPERATION_KIND_" + c.kind.name,
            lease_ms=round(c.lease_s * 1000),
            members=c.members,
        )
        if precopy_ms > 0 and c.kind.name == "CHECKPOINT":
            freeze.precopy = True
            freeze.precopy_ms = precopy_ms
            freeze.full = c.node in full_nodes
        return Outbound(c.node, "freeze", freeze, True)
    if isinstance(c, SendCapture):
        full = c.full or c.node in full_nodes
        cap = agent_pb2.Capture(job=c.job, generation=c.generation, full=full, members=c.members)
        return Outbound(c.node, "capture", cap, True)
    if isinstance(c, SendRestore):
        rs = agent_pb2.Restore(job=c.job, generation=c.generation, members=c.members)
        return Outbound(c.node, "restore", rs, True)
    if isinstance(c, SendAbort):
        reason = "ABORT_REASON_" + c.reason.name
        abort = agent_pb2.Abort(job=c.job, generation=c.generation, reason=reason, detail=c.detail)
        return Outbound(c.node, "abort", abort, False)
    if isinstance(c, SendCommitted):
        done = agent_pb2.Committed(job=c.job, generation=c.generation)
        return Outbound(c.node, "committed", done, False)
    thaw = agent_pb2.Thaw(job=c.job, generation=c.generation)
    return Outbound(c.node, "thaw", thaw, False)
