"""The coordinator's event bus (coordinator/events.py): filtering, order, sequence numbers,
bounded queues that drop the oldest and count the loss, publishing that never waits for a
reader, progress milestones, and the WatchEvent messages the servicer makes of events."""

from __future__ import annotations

import threading
import time

import pytest

from coordinator.events import EventBus, JobEvent
from coordinator.flight import Progress, RunStats, Summary
from coordinator.protocol.messages import ProgressEvent
from coordinator.protocol.values import AbortReason, ProgressKind
from coordinator.servicers.watch import watch_event
from coordinator.store import GcReport
from cpcoord.errors import TooManyWatchers
from cpcoord.gen.v1 import coordinator_pb2


def drain(w: object) -> list[JobEvent]:
    out = []
    while (ev := w.get(timeout=0)) is not None:  # type: ignore[attr-defined]
        out.append(ev)
    return out


def test_events_arrive_in_order_with_increasing_seq() -> None:
    bus = EventBus(clock=lambda: 12.5)
    w = bus.subscribe()
    bus.publish("agent_connected", node="n1")
    bus.publish("member_attached", job="j", member="m", node="n1")
    bus.publish("member_detached", job="j", member="m", node="n1")
    got = drain(w)
    assert [e.kind for e in got] == ["agent_connected", "member_attached", "member_detached"]
    assert [e.seq for e in got] == [1, 2, 3]
    assert all(e.time_unix_ms == 12500 and e.lost == 0 for e in got)
    assert got[1].job == "j" and got[1].member == "m" and got[1].node == "n1"


def test_job_filter_keeps_agent_events_and_progress_is_opt_in() -> None:
    bus = EventBus()
    only_a = bus.subscribe(jobs=["a"])
    everything = bus.subscribe(include_progress=True)
    bus.publish("member_attached", job="a", member="m")
    bus.publish("member_attached", job="b", member="m")
    bus.publish("agent_disconnected", node="n", detail="gone")
    bus.publish("checkpoint_progress", job="a", generation=1)
    assert [(e.kind, e.job) for e in drain(only_a)] == [
        ("member_attached", "a"),
        ("agent_disconnected", ""),
    ]
    assert [e.kind for e in drain(everything)] == [
        "member_attached",
        "member_attached",
        "agent_disconnected",
        "checkpoint_progress",
    ]


def test_a_slow_watcher_loses_the_oldest_and_is_told_how_many() -> None:
    bus = EventBus()
    slow = bus.subscribe(capacity=4)
    fast = bus.subscribe(capacity=100)
    for i in range(10):
        bus.publish("generation_deleted", job="j", generation=i + 1)
    got = drain(slow)
    assert [e.generation for e in got] == [7, 8, 9, 10]  # the newest stay
    assert [e.lost for e in got] == [6, 0, 0, 0]  # the gap is before the first
    assert slow.lost_total == 6
    assert [e.generation for e in drain(fast)] == list(range(1, 11))
    bus.publish("generation_deleted", job="j", generation=11)
    assert [(e.generation, e.lost) for e in drain(slow)] == [(11, 0)]


def test_publishing_never_waits_for_a_reader() -> None:
    bus = EventBus()
    bus.subscribe(capacity=8)  # never read
    t0 = time.monotonic()
    for _ in range(20_000):
        bus.publish("member_gone", job="j", member="m")
    # Generous: the point is that it returns at all without a reader (no blocking queue).
    assert time.monotonic() - t0 < 30
    assert bus.published == 20_000


def test_get_waits_for_an_event_and_close_wakes_the_reader() -> None:
    bus = EventBus()
    w = bus.subscribe()
    got: list[JobEvent | None] = []
    t = threading.Thread(target=lambda: got.append(w.get(timeout=30)))
    t.start()
    bus.publish("agent_connected", node="x")
    t.join(timeout=30)
    assert got and got[0] is not None and got[0].node == "x"
    t2 = threading.Thread(target=lambda: got.append(w.get(timeout=30)))
    t2.start()
    w.close()
    t2.join(timeout=30)
    assert not t2.is_alive() and got[-1] is None
    assert bus.watchers == 0
    bus.publish("agent_connected", node="y")  # nobody left: fine
    assert w.get(timeout=0) is None


def test_bus_close_ends_every_watcher() -> None:
    bus = EventBus()
    ws = [bus.subscribe() for _ in range(3)]
    bus.close()
    assert all(w.closed and w.get(timeout=0) is None for w in ws)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError):
        EventBus().publish("made_up")


def _progress(
    kind: ProgressKind, reason: AbortReason | None = None, final: bool = False
) -> Progress:
    ev = ProgressEvent(kind, "j", 3, reason=reason, detail="why" if reason else "")
    summary = None
    if final:
        state = "committed" if kind is ProgressKind.COMMITTED else "aborted"
        summary = Summary(None, "j", 3, 2, state, reason.value if reason else "", "", RunStats())
    return Progress(ev, 0.5, summary)


def test_progress_milestones_become_job_events() -> None:
    bus = EventBus()
    w = bus.subscribe(include_progress=True)
    quiet = bus.subscribe()
    for k in (ProgressKind.FREEZE_SENT, ProgressKind.BARRIER, ProgressKind.MEMBER_STAGED):
        bus.progress(_progress(k))
    bus.progress(_progress(ProgressKind.ABORTED, AbortReason.FREEZE_TIMEOUT, final=True))
    kinds = [e.kind for e in drain(w)]
    assert kinds == [
        "checkpoint_progress",
        "generation_started",
        "checkpoint_progress",
        "generation_frozen",
        "checkpoint_progress",
        "checkpoint_progress",
        "generation_aborted",
    ]
    q = drain(quiet)
    assert [e.kind for e in q] == ["generation_started", "generation_frozen", "generation_aborted"]
    assert q[-1].reason == "freeze_timeout" and q[-1].detail == "why"
    # restore flights: their own kinds
    bus.progress(_progress(ProgressKind.FREEZE_SENT), restore=True)
    bus.progress(_progress(ProgressKind.COMMITTED, final=True), restore=True)
    assert [e.kind for e in drain(quiet)] == ["restore_started", "restore_ended"]


def test_gc_ran_reports_deleted_generations_first() -> None:
    bus = EventBus()
    w = bus.subscribe(jobs=["j"])
    report = GcReport(
        dropped=(("j", 1), ("other", 4)),
        orphan_manifests=0,
        chunks_dropped=5,
        packs_deleted=1,
        packs_repacked=0,
        packs_written=0,
        bytes_freed=4096,
        index_files_replaced=0,
        incomplete_discarded=0,
    )
    bus.gc_ran(report)
    got = drain(w)
    assert [(e.kind, e.job, e.generation) for e in got] == [
        ("generation_deleted", "j", 1),
        ("gc_ran", "", 0),
    ]
    msg = watch_event(got[-1])
    assert msg.kind == coordinator_pb2.WATCH_EVENT_KIND_GC_RAN
    assert msg.gc.phase == "done" and msg.gc.chunks_dropped == 5 and msg.gc.bytes_freed == 4096
    assert [(d.job, d.generation) for d in msg.gc.dropped] == [("j", 1), ("other", 4)]


def test_watch_event_messages() -> None:
    bus = EventBus()
    w = bus.subscribe(include_progress=True, capacity=2)
    bus.progress(_progress(ProgressKind.COMMITTED, final=True))
    bus.publish("member_gone", job="j", member="m", node="n", detail="exit status 3")
    a, b = drain(w)
    ma, mb = watch_event(a), watch_event(b)
    assert ma.kind == coordinator_pb2.WATCH_EVENT_KIND_GENERATION_COMMITTED
    assert ma.info.number == 3 and ma.info.parent == 2 and ma.generation == 3
    assert ma.lost == 1  # the checkpoint_progress event was pushed out
    assert mb.kind == coordinator_pb2.WATCH_EVENT_KIND_MEMBER_GONE and mb.detail == "exit status 3"
    assert mb.seq == ma.seq + 1
    p = watch_event(
        JobEvent("checkpoint_progress", 9, 0, job="j", payload=_progress(ProgressKind.BARRIER))
    )
    assert p.checkpoint.kind == 2 and p.checkpoint.job == "j" and not p.HasField("info")


def test_watchers_are_capped() -> None:
    bus = EventBus(max_watchers=2)
    a = bus.subscribe()
    bus.subscribe()
    with pytest.raises(TooManyWatchers):
        bus.subscribe()
    a.close()
    bus.subscribe()  # a slot was freed
