"""cpcoord.api's message -> value conversion: forward compatibility (enum values and
fields this client does not know), unset messages as None, Diff continuation messages
merged, and string enums that compare equal to the CLI's JSON words."""

from __future__ import annotations

from cpcoord.api import AbortReason, GenerationState, ProgressKind, WatchKind, convert
from cpcoord.gen.v1 import common_pb2, coordinator_pb2, types_pb2


def test_unknown_enum_values_read_as_unspecified() -> None:
    ev = coordinator_pb2.CheckpointEvent(job="j", generation=3)
    ev.kind = 999  # type: ignore[assignment]  # a value from a newer coordinator
    ev.reason = 77  # type: ignore[assignment]
    got = convert.progress(ev)
    assert got.kind is ProgressKind.UNSPECIFIED and got.reason is AbortReason.UNSPECIFIED
    assert got.generation == 3 and got.info is None and got.stats is None
    w = coordinator_pb2.WatchEvent(seq=5)
    w.kind = 4242  # type: ignore[assignment]
    assert convert.watch_event(w).kind is WatchKind.UNSPECIFIED
    assert ProgressKind("made_up") is ProgressKind.UNSPECIFIED


def test_unknown_fields_are_ignored() -> None:
    # A newer server's message with a field number this client has never heard of.
    raw = coordinator_pb2.GenerationInfo(job="j", number=2).SerializeToString()
    raw += b"\xf8\x06\x01"  # field 111, varint 1
    g = convert.generation(coordinator_pb2.GenerationInfo.FromString(raw))
    assert g.job == "j" and g.number == 2 and g.parent is None


def test_generation_and_progress_values() -> None:
    info = coordinator_pb2.GenerationInfo(
        job="j",
        number=4,
        parent=3,
        state=common_pb2.GENERATION_STATE_ABORTED,
        reason=common_pb2.ABORT_REASON_AGENT_LOST,
        detail="node-a: stream ended",
    )
    ev = coordinator_pb2.CheckpointEvent(
        kind=common_pb2.PROGRESS_KIND_ABORTED, job="j", generation=4, info=info
    )
    ev.stats.CopyFrom(common_pb2.MemberStats(pages=8, frozen_seconds=0.25, tracker="uffd-wp"))
    p = convert.progress(ev)
    assert p.final and p.kind == "aborted" and p.info is not None
    assert p.info.state is GenerationState.ABORTED and not p.info.committed
    assert p.info.reason == "agent_lost" and p.info.parent == 3
    assert p.stats is not None and p.stats.pages == 8 and p.stats.tracker == "uffd-wp"
    r = convert.progress(coordinator_pb2.RestoreEvent(kind=common_pb2.PROGRESS_KIND_COMMITTED))
    assert r.final and r.info is None


def test_diff_continuations_merge() -> None:
    def msg(member: str, region: str, runs: list[tuple[int, int]]) -> coordinator_pb2.DiffResponse:
        n = sum(c for _, c in runs)
        return coordinator_pb2.DiffResponse(
            member=member,
            region=region,
            changed=[types_pb2.PageRun(offset=o, count=c) for o, c in runs],
            pages_changed=n,
            bytes_changed=n * 4096,
        )

    out = convert.region_diffs(
        [msg("a", "r", [(0, 2)]), msg("a", "r", [(10, 1)]), msg("b", "r", [(3, 3)])]
    )
    assert [(d.member, d.changed, d.pages_changed) for d in out] == [
        ("a", ((0, 2), (10, 1)), 3),
        ("b", ((3, 3),), 3),
    ]
    assert out[0].bytes_changed == 3 * 4096
