"""One generation in flight, as the engine drives it, and what clients see of it.

A Flight wraps the protocol core's `Generation` with what the driver needs around it:
the parent generation (and its manifest, loaded once), which nodes must capture in full,
the finished uploads per member, the subscribers of its progress, and its numbers for
the final GenerationInfo (pages captured, longest downtime, seconds). `Summary` is that
final record, also kept for recent generations so listings can show it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.protocol import Generation
from coordinator.protocol.messages import ProgressEvent
from coordinator.protocol.values import GenState, Timing
from coordinator.store.catalog import GenerationInfo
from coordinator.store.manifest import Manifest, ThreadRegs
from coordinator.uploads import MemberUpload
from cpcoord.errors import InvalidArgument
from cpcoord.gen.v1 import common_pb2
from cpcoord.kstate import KernelState


@dataclass(frozen=True)
class CheckpointOptions:
    job: str
    full: bool = False
    lease_ms: int = 0  # 0 = 10000; 100..600000
    freeze_timeout_ms: int = 0  # 0 = half the lease
    commit_timeout_ms: int = 0  # 0 = 300000
    pin: bool = False
    precopy: bool = True  # members captured in full are copied while running first

    def precopy_ms(self) -> int:
        """The agents' time for live passes: half the freeze deadline (Begin to the
        barrier), so freezing and the Frozen report still fit in the other half
        (docs/decisions.md); 0 when pre-copy is off."""
        return int(self.timing().freeze_timeout_s * 500) if self.precopy else 0

    def timing(self) -> Timing:
        lease = self.lease_ms or 10_000
        if not 100 <= lease <= 600_000:
            raise InvalidArgument(f"lease_ms must be 100..600000, got {lease}")
        freeze = self.freeze_timeout_ms or lease // 2
        commit = self.commit_timeout_ms or max(300_000, lease)
        return Timing(lease / 1000, freeze / 1000, commit / 1000)


@dataclass(frozen=True)
class RunStats:
    """What the catalog does not keep about a generation (in memory only)."""

    pages_captured: int = 0
    frozen_seconds: float = 0.0
    seconds: float = 0.0
    full: bool = False
    tracker: str = ""
    data_paths: tuple[tuple[str, str], ...] = ()  # (member, "direct" | "coordinator")


@dataclass(frozen=True)
class Summary:
    """A generation as GenerationInfo shows it."""

    catalog: GenerationInfo | None  # None: the catalog has no row (it was deleted)
    job: str
    number: int
    parent: int | None
    state: str  # "committed", "aborted", "preparing"
    reason: str = ""  # AbortReason value
    detail: str = ""
    run: RunStats = field(default_factory=RunStats)
    lost: str = ""  # committed but unrestorable: why (a node cache lost; cached.py)
    cache_nodes: tuple[str, ...] = ()  # level local: the nodes whose caches it needs


@dataclass(frozen=True)
class Progress:
    """One item of a Checkpoint stream: the core's event, time since Begin, and (on the
    terminal event) the generation's summary."""

    event: ProgressEvent
    elapsed: float
    summary: Summary | None = None


class Subscription:
    """A Checkpoint call's view of one flight: `get()` until `done`."""

    def __init__(self, flight: Flight) -> None:
        self.flight = flight
        self._q: queue.SimpleQueue[Progress] = queue.SimpleQueue()
        self.done = False
        # Called after each put (from the engine's thread, under its lock): an event
        # loop's reader sets it to wake up instead of holding a thread in get().
        self.waker: Callable[[], None] | None = None

    def put(self, p: Progress) -> None:
        self._q.put(p)
        if self.waker is not None:
            self.waker()

    def get(self, timeout: float | None = None) -> Progress | None:
        try:
            p = self._q.get(timeout=timeout)
        except queue.Empty:
            return None
        if p.summary is not None:
            self.done = True
        return p


class Flight:
    def __init__(
        self,
        gen: Generation,
        parent: int | None,
        full_nodes: frozenset[str],
        *,
        pin: bool = False,
        started: float | None = None,
        precopy_ms: int = 0,
    ) -> None:
        self.gen = gen
        self.precopy_ms = precopy_ms  # sent in Freeze (outbound.py); 0: no pre-copy
        # Member -> its Staged stats when it was pre-copied (rounds, bytes per pass)
        self.precopy: dict[str, common_pb2.MemberStats] = {}
        self.job = gen.snapshot.spec.job
        self.number = gen.snapshot.spec.generation
        self.parent = parent
        self.full_nodes = full_nodes
        self.pin = pin
        self.started = time.monotonic() if started is None else started
        self.started_unix = time.time()
        self.barrier_ns = 0
        self.uploads: dict[str, MemberUpload] = {}
        # Registers at the cut of whole-memory members, from their Staged (agent_events.py)
        self.threads: dict[str, tuple[ThreadRegs, ...]] = {}
        # Their kernel side at the cut (fds, offsets, queues), from the same Staged
        self.kernel: dict[str, KernelState] = {}
        self.force = False  # a restore: roll back although the kernel side differs
        # restore: members whose agent kept the tracker armed and relative to its base
        self.tracker_kept: set[str] = set()
        self.subscribers: list[Subscription] = []
        self.committing = False
        self.summary: Summary | None = None
        self._parent_manifest: Manifest | None = None
        self._parent_lock = threading.Lock()

    @property
    def terminal(self) -> bool:
        return self.gen.terminal

    @property
    def in_flight(self) -> bool:
        return self.gen.state not in (GenState.COMMITTED, GenState.ABORTED)

    def subscribe(self) -> Subscription:
        s = Subscription(self)
        self.subscribers.append(s)
        return s

    def publish(self, p: Progress) -> None:
        for s in self.subscribers:
            s.put(p)

    def parent_manifest(self, load: object) -> Manifest | None:
        """The parent's manifest, loaded once (`load(job, number)`)."""
        if self.parent is None:
            return None
        with self._parent_lock:
            if self._parent_manifest is None:
                self._parent_manifest = load(self.job, self.parent)  # type: ignore[operator]
            return self._parent_manifest

    def run_stats(self) -> RunStats:
        snap = self.gen.snapshot
        tot = snap.totals()
        trackers = {u.tracker for u in self.uploads.values() if u.tracker}
        return RunStats(
            pages_captured=tot.pages,
            frozen_seconds=tot.frozen_seconds,
            seconds=time.monotonic() - self.started,
            full=snap.spec.full
            or (bool(self.uploads) and all(u.full for u in self.uploads.values())),
            tracker=",".join(sorted(trackers)),
            data_paths=tuple(sorted((m, u.data_path) for m, u in self.uploads.items())),
        )
