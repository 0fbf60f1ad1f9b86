"""The coordinator's event bus: what happened to jobs and agents, for `Watch` streams.

Engine modules publish with one call (`engine.events.publish("member_attached", job=...,
member=..., node=...)`, `engine.events.progress(...)`, `engine.events.gc_ran(...)`);
each `Watcher` (one per Watch call) has its own bounded queue. Publishing never blocks
and never waits for a reader: it runs under the engine's lock, inside checkpoints, so a
slow dashboard must not slow a checkpoint down. When a watcher's queue is full its
oldest event is dropped and counted; the next event it reads carries that count
(`lost`), so a reader always knows it missed something. Every event gets a sequence
number (`seq`, increasing by one per published event, before filtering).

Kinds (the lower-case suffixes of WatchEventKind in coordinator.proto):
agent_connected, agent_disconnected, member_attached, member_detached, member_gone,
generation_started, generation_frozen, generation_committed, generation_aborted,
generation_deleted, gc_ran, checkpoint_progress, restore_started, restore_progress,
restore_ended. No gRPC here: coordinator/servicers/watch.py turns events into messages.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from cpcoord.errors import TooManyWatchers

KINDS = frozenset(
    {
        "agent_connected",
        "agent_disconnected",
        "member_attached",
        "member_detached",
        "member_gone",
        "generation_started",
        "generation_frozen",
        "generation_committed",
        "generation_aborted",
        "generation_deleted",
        "generation_level",
        "generation_lost",
        "gc_ran",
        "checkpoint_progress",
        "restore_started",
        "restore_progress",
        "restore_ended",
    }
)
AGENT_KINDS = frozenset({"agent_connected", "agent_disconnected", "gc_ran"})  # never filtered
PROGRESS_KINDS = frozenset({"checkpoint_progress", "restore_progress"})  # on request only
DEFAULT_QUEUE = 1024
# Watch streams hold no thread (the server is grpc.aio), but each holds a queue of up
# to DEFAULT_QUEUE events: bounded so a misbehaving dashboard cannot exhaust memory.
MAX_WATCHERS = 64

# The core's progress kinds (coordinator.protocol.values.ProgressKind values) that are
# also job events on their own, per operation.
_CHECKPOINT_STEPS = {
    "freeze_sent": "generation_started",
    "barrier": "generation_frozen",
    "committed": "generation_committed",
    "aborted": "generation_aborted",
}
_RESTORE_STEPS = {"freeze_sent": "restore_started", "committed": "restore_ended"}


@dataclass(frozen=True)
class JobEvent:
    """One thing that happened. `payload` is what the kind carries beyond the plain
    fields: a flight's `Progress` (progress and generation_* kinds) or a `GcReport`."""

    kind: str
    seq: int
    time_unix_ms: int
    job: str = ""
    member: str = ""
    node: str = ""
    generation: int = 0
    reason: str = ""  # an AbortReason value ("agent_lost", ...); "" = none
    detail: str = ""
    payload: Any = None
    lost: int = 0  # events the reading watcher missed just before this one


@dataclass
class Watcher:
    """One reader's bounded queue; `get()` from its thread, `close()` from any."""

    jobs: frozenset[str]
    include_progress: bool
    capacity: int
    _bus: EventBus
    _q: collections.deque[JobEvent] = field(default_factory=collections.deque)
    _lost: int = 0  # dropped since the last event handed out
    lost_total: int = 0
    closed: bool = False
    # Called under the bus's condition after an event is queued or on close: an event
    # loop's reader sets it (call_soon_threadsafe) instead of waiting in get(). No blocking.
    waker: Callable[[], None] | None = None

    def wants(self, ev: JobEvent) -> bool:
        if ev.kind in PROGRESS_KINDS and not self.include_progress:
            return False
        return ev.kind in AGENT_KINDS or not self.jobs or ev.job in self.jobs

    def offer(self, ev: JobEvent) -> None:  # under the bus's condition
        if len(self._q) >= self.capacity:
            self._q.popleft()
            self._lost += 1
            self.lost_total += 1
        self._q.append(ev)
        if self.waker is not None:
            self.waker()

    def get(self, timeout: float | None = None) -> JobEvent | None:
        """The next event (with `lost` set), or None after `timeout` or once closed."""
        with self._bus.cond:
            self._bus.cond.wait_for(lambda: self._q or self.closed, timeout)
            if not self._q:
                return None
            ev = self._q.popleft()
            lost, self._lost = self._lost, 0
        return replace(ev, lost=lost) if lost else ev

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    def __init__(
        self, clock: Callable[[], float] = time.time, max_watchers: int = MAX_WATCHERS
    ) -> None:
        self.clock = clock
        self.max_watchers = max_watchers
        self.cond = threading.Condition(threading.Lock())
        self._watchers: list[Watcher] = []
        self._seq = 0
        self.published = 0

    # -- readers ---------------------------------------------------------------------

    def subscribe(
        self, jobs: Iterable[str] = (), include_progress: bool = False, capacity: int = 0
    ) -> Watcher:
        """A new watcher; TooManyWatchers beyond `max_watchers`."""
        w = Watcher(frozenset(jobs), include_progress, capacity or DEFAULT_QUEUE, self)
        with self.cond:
            if len(self._watchers) >= self.max_watchers:
                raise TooManyWatchers(len(self._watchers))
            self._watchers.append(w)
        return w

    def unsubscribe(self, w: Watcher) -> None:
        with self.cond:
            w.closed = True
            if w in self._watchers:
                self._watchers.remove(w)
            self.cond.notify_all()
        if w.waker is not None:
            w.waker()

    @property
    def watchers(self) -> int:
        with self.cond:
            return len(self._watchers)

    def close(self) -> None:
        """Wake every reader and end their streams (the coordinator is stopping)."""
        with self.cond:
            closing = list(self._watchers)
            for w in closing:
                w.closed = True
            self._watchers.clear()
            self.cond.notify_all()
        for w in closing:
            if w.waker is not None:
                w.waker()

    # -- publishers ------------------------------------------------------------------

    def publish(self, kind: str, **fields: Any) -> JobEvent:
        """Queue an event for every interested watcher; never blocks on them."""
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        with self.cond:
            self._seq += 1
            ev = JobEvent(kind, self._seq, int(self.clock() * 1000), **fields)
            for w in self._watchers:
                if w.wants(ev):
                    w.offer(ev)
            self.published += 1
            self.cond.notify_all()
        return ev

    def progress(self, p: Any, restore: bool = False) -> None:
        """A flight's progress (`coordinator.flight.Progress`): the progress event, and
        for its milestones the job event (generation_started/frozen/committed/aborted,
        restore_started/ended)."""
        e = p.event
        step = e.kind.value
        reason = e.reason.value if e.reason else ""
        base = {"job": e.job, "generation": e.generation, "member": e.member, "node": e.node}
        kind = "restore_progress" if restore else "checkpoint_progress"
        self.publish(kind, reason=reason, detail=e.detail, payload=p, **base)
        milestone = (_RESTORE_STEPS if restore else _CHECKPOINT_STEPS).get(step)
        if restore and step == "aborted":
            milestone = "restore_ended"
        if milestone is not None:
            self.publish(
                milestone,
                job=e.job,
                generation=e.generation,
                reason=reason,
                detail=e.detail,
                payload=p,
            )

    def gc_ran(self, report: Any) -> None:
        """A garbage collection finished (`coordinator.store.GcReport`): one
        generation_deleted per generation retention dropped, then gc_ran."""
        for job, n in report.dropped:
            self.publish("generation_deleted", job=job, generation=n, detail="gc")
        self.publish("gc_ran", payload=report)
