"""API messages (coordinator.proto, common.proto) -> `cpcoord.api.values`.

Enum numbers are read by name: the lower-case suffix of the proto enum name is the
value of the Python enum; a number this client does not know reads as UNSPECIFIED. An
unset message field reads as None (proto3 has no nulls, `HasField` says).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from cpcoord import pagedata
from cpcoord.api import values as v
from cpcoord.gen.v1 import common_pb2, coordinator_pb2, types_pb2


def _name(enum: Any, number: int, prefix: str) -> str:
    try:
        return str(enum.Name(number)).removeprefix(prefix).lower()
    except ValueError:  # a value newer than these stubs
        return "unspecified"


def progress_kind(n: int) -> v.ProgressKind:
    return v.ProgressKind(_name(common_pb2.ProgressKind, n, "PROGRESS_KIND_"))


def state(n: int) -> v.GenerationState:
    return v.GenerationState(_name(common_pb2.GenerationState, n, "GENERATION_STATE_"))


def reason(n: int) -> v.AbortReason:
    return v.AbortReason(_name(common_pb2.AbortReason, n, "ABORT_REASON_"))


def level(n: int) -> v.Level:
    """A DurabilityLevel; UNSPECIFIED (an older coordinator) is STORE."""
    name = _name(common_pb2.DurabilityLevel, n, "DURABILITY_LEVEL_")
    return v.Level.STORE if name == "unspecified" else v.Level(name)


def level_name(lv: v.Level) -> str:
    """The DurabilityLevel name (protobuf constructors take enum values by name)."""
    return "DURABILITY_LEVEL_" + lv.name


def health(n: int) -> v.MemberHealth:
    return v.MemberHealth(_name(coordinator_pb2.MemberHealth, n, "MEMBER_HEALTH_"))


def watch_kind(n: int) -> v.WatchKind:
    return v.WatchKind(_name(coordinator_pb2.WatchEventKind, n, "WATCH_EVENT_KIND_"))


def region(r: types_pb2.Region) -> v.Region:
    runs = tuple((p.offset, p.count) for p in r.all_pages)
    return v.Region(r.name, r.start, r.end, runs)


def member(m: coordinator_pb2.MemberInfo) -> v.Member:
    return v.Member(
        job=m.job,
        name=m.name,
        node=m.node,
        pid=m.process.pid,
        start_time=m.process.start_time,
        regions=tuple(region(r) for r in m.regions),
        health=health(m.health),
        tracker=m.tracker,
        attached_unix_ms=m.attached_unix_ms,
        detail=m.detail,
        group=m.group,
    )


def generation(g: coordinator_pb2.GenerationInfo) -> v.Generation:
    return v.Generation(
        job=g.job,
        number=g.number,
        parent=g.parent or None,
        state=state(g.state),
        reason=reason(g.reason),
        detail=g.detail,
        started_unix_ms=g.started_unix_ms,
        finished_unix_ms=g.finished_unix_ms,
        pinned=g.pinned,
        members=g.members,
        pages=g.pages,
        zero_pages=g.zero_pages,
        bytes_logical=g.bytes_logical,
        bytes_stored=g.bytes_stored,
        bytes_new=g.bytes_new,
        pages_captured=g.pages_captured,
        frozen_seconds=g.frozen_seconds,
        seconds=g.seconds,
        full=g.full,
        level=level(g.level),
        lost=g.lost,
        cache_nodes=tuple(g.cache_nodes),
    )


def job(j: coordinator_pb2.JobInfo) -> v.Job:
    last = generation(j.last_committed) if j.HasField("last_committed") else None
    return v.Job(j.name, tuple(member(m) for m in j.members), last, j.in_flight, j.generations)


def agent(a: coordinator_pb2.AgentInfo) -> v.Agent:
    return v.Agent(
        node=a.node,
        version=a.version,
        capabilities=tuple(a.capabilities),
        trackers=tuple(v.Tracker(t.name, t.available, t.reason) for t in a.trackers),
        connected=a.connected,
        connected_unix_ms=a.connected_unix_ms,
        members=a.members,
        peer=a.peer,
    )


def stats(s: common_pb2.MemberStats) -> v.MemberStats:
    return v.MemberStats(
        s.pages,
        s.zero_pages,
        s.bytes_logical,
        s.bytes_stored_new,
        s.frozen_seconds,
        s.tracker,
        s.full,
    )


def progress(e: Any) -> v.ProgressEvent:
    """A CheckpointEvent or RestoreEvent (same field numbers; only the former has info)."""
    info = (
        generation(e.info)
        if e.DESCRIPTOR.fields_by_name.get("info") and e.HasField("info")
        else None
    )
    return v.ProgressEvent(
        kind=progress_kind(e.kind),
        job=e.job,
        generation=e.generation,
        member=e.member,
        node=e.node,
        stats=stats(e.stats) if e.HasField("stats") else None,
        members_done=e.members_done,
        members_total=e.members_total,
        reason=reason(e.reason),
        detail=e.detail,
        elapsed_seconds=e.elapsed_seconds,
        info=info,
    )


def member_generation(m: coordinator_pb2.MemberGeneration) -> v.MemberGeneration:
    return v.MemberGeneration(
        m.member, m.node, tuple(region(r) for r in m.regions), stats(m.stats), m.threads
    )


def forgotten(node: str, r: coordinator_pb2.ForgetNodeResponse) -> v.ForgottenNode:
    return v.ForgottenNode(
        node=node,
        lost=tuple(generation(g) for g in r.lost),
        packs=r.packs,
        members=tuple(r.members),
    )


def gc_report(e: coordinator_pb2.GarbageCollectEvent) -> v.GcReport:
    return v.GcReport(
        dropped=tuple((d.job, d.generation) for d in e.dropped),
        chunks_dropped=e.chunks_dropped,
        packs_deleted=e.packs_deleted,
        packs_repacked=e.packs_repacked,
        bytes_freed=e.bytes_freed,
        orphan_manifests=e.orphan_manifests,
    )


def store_stats(s: coordinator_pb2.StoreStatsResponse) -> v.StoreStats:
    """Field for field: the values have the response's names."""
    return v.StoreStats(**{f.name: getattr(s, f.name) for f in dataclasses.fields(v.StoreStats)})


def damage(d: coordinator_pb2.Damage) -> v.Damage:
    return v.Damage(d.job, d.generation, d.member, d.chunks, d.first_chunk, d.why)


def watch_event(e: coordinator_pb2.WatchEvent) -> v.WatchEvent:
    return v.WatchEvent(
        kind=watch_kind(e.kind),
        seq=e.seq,
        time_unix_ms=e.time_unix_ms,
        job=e.job,
        member=e.member,
        node=e.node,
        generation=e.generation,
        reason=reason(e.reason),
        detail=e.detail,
        info=generation(e.info) if e.HasField("info") else None,
        progress=progress(e.checkpoint)
        if e.HasField("checkpoint")
        else progress(e.restore)
        if e.HasField("restore")
        else None,
        gc=gc_report(e.gc) if e.HasField("gc") else None,
        lost=e.lost,
    )


def member_pages(job_name: str, mp: pagedata.MemberPages) -> v.MemberPages:
    h = mp.header
    regions = tuple(
        v.RegionPages(r.name, r.start, r.end, r.pages, r.data, r.zero) for r in mp.regions
    )
    return v.MemberPages(job_name or h.job, h.generation, h.member, h.node, h.page_size, regions)


def region_diffs(messages: Iterable[coordinator_pb2.DiffResponse]) -> list[v.RegionDiff]:
    """A Diff stream as one RegionDiff per member and region: a region with many runs
    spans several messages (same member and region, runs continue in order)."""
    out: list[v.RegionDiff] = []
    for m in messages:
        runs = tuple((r.offset, r.count) for r in m.changed)
        prev = out[-1] if out else None
        if prev is not None and (prev.member, prev.region) == (m.member, m.region):
            out[-1] = v.RegionDiff(
                m.member,
                m.region,
                prev.added,
                prev.removed,
                prev.changed + runs,
                prev.pages_changed + m.pages_changed,
                prev.bytes_changed + m.bytes_changed,
            )
        else:
            out.append(
                v.RegionDiff(
                    m.member, m.region, m.added, m.removed, runs, m.pages_changed, m.bytes_changed
                )
            )
    return out
