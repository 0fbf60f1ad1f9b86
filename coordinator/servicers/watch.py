"""`Coordinator.Watch`'s messages: the event bus's events (coordinator/events.py) as
WatchEvents, and a gc run's report as its GarbageCollectEvent. The stream itself is
served on grpc.aio (servicers/streams.py `Watch`); `META_SUBSCRIBED` is the header that
tells the client it is subscribed.
"""

from __future__ import annotations

from coordinator.events import JobEvent
from coordinator.flight import Progress, Summary
from coordinator.servicers import convert
from coordinator.store import GcReport
from cpcoord.gen.v1 import coordinator_pb2

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
    elif isinstance(p, Summary):  # generation_level/lost: the generation as it is now
        out.info.CopyFrom(convert.generation_info(p))
    return out
