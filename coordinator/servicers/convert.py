"""Engine values -> API messages (coordinator.proto, common.proto), by enum name."""

from __future__ import annotations

import dataclasses
from typing import Any

from coordinator.flight import Progress, Summary
from coordinator.membership import MemberRec
from coordinator.protocol.values import Stats
from coordinator.store import StoreStats
from coordinator.uploads import MemberUpload
from cpcoord.gen.v1 import agent_pb2, common_pb2, coordinator_pb2, types_pb2

_REASONS = frozenset(common_pb2.AbortReason.keys())
_STATE = {
    "new": "GENERATION_STATE_NEW",
    "preparing": "GENERATION_STATE_PREPARING",
    "frozen": "GENERATION_STATE_FROZEN",
    "captured": "GENERATION_STATE_CAPTURED",
    "committed": "GENERATION_STATE_COMMITTED",
    "aborted": "GENERATION_STATE_ABORTED",
}


def state(value: str) -> str:
    """A GenerationState name (protobuf constructors take enum values by name)."""
    return _STATE.get(value, "GENERATION_STATE_UNSPECIFIED")


def reason(value: str) -> str:
    """An AbortReason name; a reason the enum lacks (the store's own words) is a store
    error."""
    if not value:
        return "ABORT_REASON_UNSPECIFIED"
    name = "ABORT_REASON_" + value.upper()
    return name if name in _REASONS else "ABORT_REASON_STORE_ERROR"


def level(value: str) -> common_pb2.DurabilityLevel:
    """The DurabilityLevel of a catalog level (local, partner, store)."""
    return common_pb2.DurabilityLevel.Value("DURABILITY_LEVEL_" + value.upper())  # type: ignore[return-value]


def member_stats(s: Stats | None, **extra: object) -> common_pb2.MemberStats:
    if s is None:
        return common_pb2.MemberStats(**extra)  # type: ignore[arg-type]
    return common_pb2.MemberStats(
        pages=s.pages,
        bytes_logical=s.bytes_logical,
        bytes_stored_new=s.bytes_stored_new,
        frozen_seconds=s.frozen_seconds,
        pages_written=s.pages_written,
        bytes_prefetched=s.bytes_prefetched,
        read_direct=bool(s.read_direct),
        kernel_warnings=list(s.kernel_warnings),
        **extra,  # type: ignore[arg-type]
    )


def generation_info(s: Summary) -> coordinator_pb2.GenerationInfo:
    out = coordinator_pb2.GenerationInfo(
        job=s.job,
        number=s.number,
        parent=s.parent or 0,
        state=state(s.state),
        reason=reason(s.reason),
        detail=s.detail,
        pages_captured=s.run.pages_captured,
        frozen_seconds=s.run.frozen_seconds,
        seconds=s.run.seconds,
        full=s.run.full,
    )
    out.data_paths.update(dict(s.run.data_paths))
    c = s.catalog
    if c is not None:
        z = c.sizes
        out.started_unix_ms = int(c.started * 1000)
        out.finished_unix_ms = int((c.finished or 0) * 1000)
        out.pinned = c.pinned
        if s.state == "committed":
            out.level = level(c.level.value)
            out.lost = s.lost
            out.cache_nodes.extend(s.cache_nodes)
        out.members, out.pages, out.zero_pages = z.members, z.pages, z.zero_pages
        out.bytes_logical, out.bytes_stored, out.bytes_new = (
            z.bytes_logical,
            z.bytes_stored,
            z.bytes_new,
        )
        if not s.detail and c.reason and not s.reason:
            out.detail = c.reason
    return out


def _progress_fields(p: Progress) -> dict[str, Any]:
    """What CheckpointEvent and RestoreEvent share: one progress step, field by field."""
    e = p.event
    return {
        "kind": "PROGRESS_KIND_" + e.kind.name,
        "job": e.job,
        "generation": e.generation,
        "member": e.member,
        "node": e.node,
        "members_done": e.done,
        "members_total": e.total,
        "reason": reason(e.reason.value if e.reason else ""),
        "detail": e.detail,
        "elapsed_seconds": p.elapsed,
    }


def checkpoint_event(p: Progress) -> coordinator_pb2.CheckpointEvent:
    out = coordinator_pb2.CheckpointEvent(**_progress_fields(p))
    if p.event.stats is not None:
        out.stats.CopyFrom(member_stats(p.event.stats))
    if p.summary is not None:
        out.info.CopyFrom(generation_info(p.summary))
    return out


def restore_event(p: Progress) -> coordinator_pb2.RestoreEvent:
    out = coordinator_pb2.RestoreEvent(**_progress_fields(p))
    if p.event.stats is not None:
        out.stats.CopyFrom(member_stats(p.event.stats))
    return out


def region(name: str, start: int, end: int) -> types_pb2.Region:
    return types_pb2.Region(name=name, start=start, end=end)


def member_info(
    rec: MemberRec, health: str, detail: str, regions: list[types_pb2.Region] | None = None
) -> coordinator_pb2.MemberInfo:
    return coordinator_pb2.MemberInfo(
        job=rec.job,
        name=rec.name,
        node=rec.node,
        process=types_pb2.ProcessIdentity(pid=rec.pid, start_time=rec.start_time),
        regions=regions
        if regions is not None
        else [region(r.name, r.start, r.end) for r in rec.regions],
        health="MEMBER_HEALTH_" + health,
        tracker=rec.tracker,
        attached_unix_ms=rec.attached_ms,
        detail=detail,
        group=rec.group,
    )


def upload_response(done: MemberUpload) -> agent_pb2.UploadResponse:
    """What an UploadPages call answers (the thread-pool and the grpc.aio servicer)."""
    return agent_pb2.UploadResponse(
        pages=done.pages,
        entries=done.entries,
        chunks=done.chunks,
        chunks_new=done.chunks_new,
        bytes_received=done.bytes_received,
        bytes_stored_new=done.bytes_stored_new,
        packs=done.packs,
    )


def store_stats(s: StoreStats) -> coordinator_pb2.StoreStatsResponse:
    """Field for field (the response has the store's names); a ratio without a value
    (an empty store) is 0."""
    values: dict[str, Any] = {k: 0.0 if v is None else v for k, v in dataclasses.asdict(s).items()}
    return coordinator_pb2.StoreStatsResponse(**values)
