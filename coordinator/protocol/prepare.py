"""The prepare phase of the protocol core: before anything is frozen, every agent gets
ready for what it will do frozen, and only then does the Freeze go out.

A spec with `prepare` (today: a restore, which prefetches the pages it will write; a
checkpoint could pre-copy the same way) begins in PRIMING: Prepare to every node, the
prepare deadline set (generous: a download is slow, never frozen). Each node answers
Prepared (or Failed for a member: abort with its reason); when every node has, the
Freeze goes out and the freeze, lease and commit deadlines start then, so the lease
covers only the frozen part. An abort during the phase sends Abort to every live node:
the agents free what they prepared.
"""

from __future__ import annotations

import dataclasses

from coordinator.protocol.cells import Result, abort, freeze_all, live_nodes, refusal
from coordinator.protocol.messages import AgentPrepared, Command, Event, SendPrepare, Tick
from coordinator.protocol.values import AbortReason, Deadlines, GenState, Snapshot


def begin_prepare(snap: Snapshot, now: float) -> Result:
    """PRIMING: Prepare to every node; only the prepare and commit deadlines run."""
    sp, t = snap.spec, snap.spec.timing
    inf = float("inf")
    new = dataclasses.replace(
        snap,
        state=GenState.PRIMING,
        deadlines=Deadlines(
            inf, inf, now + t.prepare_timeout_s + t.commit_timeout_s, now + t.prepare_timeout_s
        ),
    )
    out: list[Command] = [
        SendPrepare(n, sp.job, sp.generation, sp.kind, sp.members_on(n)) for n in sp.nodes
    ]
    return new, tuple(out)


def prepared(snap: Snapshot, event: Event) -> Result:
    """A node is ready; when every node is: Freeze to all (deadlines from now)."""
    assert isinstance(event, AgentPrepared)
    if event.node not in snap.spec.nodes:
        raise refusal(snap, event, f"node {event.node} holds no member of this generation")
    new = dataclasses.replace(snap, prepared=snap.prepared | {event.node})
    if any(n not in new.prepared for n in live_nodes(new)):
        return new, ()
    return freeze_all(new, event.now)


def prepare_tick(snap: Snapshot, event: Event) -> Result:
    assert isinstance(event, Tick) and snap.deadlines is not None
    d = snap.deadlines
    if event.now >= d.prepare_at:
        waiting = [n for n in snap.spec.nodes if n not in snap.prepared]
        return abort(snap, AbortReason.PREPARE_TIMEOUT, "not prepared: " + ", ".join(waiting))
    if event.now >= d.commit_at:
        return abort(snap, AbortReason.COMMIT_TIMEOUT, f"in state {snap.state.name}")
    return snap, ()
