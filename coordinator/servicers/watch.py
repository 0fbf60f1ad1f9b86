"""`Coordinator.Watch`: the event bus (coordinator/events.py) as a gRPC stream.

One watcher per call, removed when the call ends (client gone, deadline, server stop).
The loop polls the watcher with a short timeout so a cancelled call is noticed even when
nothing happens; the bus never waits for this loop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from coordinator.events import EventBus, JobEvent
from coordinator.flight import Progress
from coordinator.servicers import convert
from coordinator.store import GcReport
from cpcoord.errors import CoordinatorStopping
from cpcoord.gen.v1 import coordinator_pb2
from cpcoord.log import log_event
from cpcoord.ranges import check_name

log = logging.getLogger("cpcoord.coordinator")

POLL_S = 0.5
META_SUBSCRIBED = "cpcoord-watch-subscribed"


def gc_event(r: GcReport) -> coordinator_pb2.GarbageCollectEvent:
    """The final GarbageCollectEvent of a gc run (also what GarbageCollect streams)."""
    return coordinator_pb2.GarbageCollectEvent(
        phase="done",
        dropped=[coordinator_pb2.GenerationRef(job=j, generation=n) for j, n in r.dropped],
        chunks_dropped=r.chunks_dropped,
        packs_deleted=r.packs_deleted,
        packs_repacked=r.packs_repacked,
        bytes_freed=r.bytes_freed,
        orphan_manifests=r.orphan_manifests,
    )


def watch_event(ev: JobEvent) -> coordinator_pb2.WatchEvent:
    out = coordinator_pb2.WatchEvent(
        kind="WATCH_EVENT_KIND_" + ev.kind.upper(),
        time_unix_ms=ev.time_unix_ms,
        job=ev.job,
        member=ev.member,
        node=ev.node,
        generation=ev.generation,
        reason=convert.reason(ev.reason),
        detail=ev.detail,
        lost=ev.lost,
        seq=ev.seq,
    )
    p = ev.payload
    if isinstance(p, Progress):
        if ev.kind == "checkpoint_progress":
            out.checkpoint.CopyFrom(convert.checkpoint_event(p))
        elif ev.kind == "restore_progress":
            out.restore.CopyFrom(convert.restore_event(p))
        if p.summary is not None and ev.kind.startswith("generation_"):
            out.info.CopyFrom(convert.generation_info(p.summary))
    elif isinstance(p, GcReport):
        out.gc.CopyFrom(gc_event(p))
    return out


def stream(
    bus: EventBus, request: coordinator_pb2.WatchRequest, context: grpc.ServicerContext
) -> Iterator[coordinator_pb2.WatchEvent]:
    for job in request.jobs:
        check_name(job)
    w = bus.subscribe(request.jobs, request.include_progress)
    context.add_callback(w.close)
    # Headers now tell the client it is subscribed (Client.watch waits for them), so an
    # event after watch() returned is never missed.
    context.send_initial_metadata(((META_SUBSCRIBED, "1"),))
    try:
        while context.is_active() and not w.closed:
            ev = w.get(timeout=POLL_S)
            if ev is not None:
                yield watch_event(ev)
        if context.is_active():
            raise CoordinatorStopping("the Watch stream ends")
    finally:
        w.close()
        if w.lost_total:  # a dashboard too slow for the event rate: worth knowing
            log_event(
                log, logging.INFO, "watch lost events", lost=w.lost_total, peer=context.peer()
            )
