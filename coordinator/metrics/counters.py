"""Prometheus metrics of the coordinator (`--metrics-port`), on a registry passed in.

Two kinds: what *happened* is counted here, fed by the engine's progress hook (outcomes
by abort reason, bytes and pages per job, downtime and phase durations as histograms,
captures per node and tracker); what *is* (agents, jobs, last generation per job, the
store) is read at scrape time by `coordinator/metrics/state.py`. Names and meanings:
docs/metrics.md. Nothing here holds page contents or chunk ids.

The hook runs under the engine lock, so it only does dictionary work and counter
increments; the per-flight phase marks are dropped when the flight ends.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, start_http_server

from coordinator.metrics.state import StateCollector
from coordinator.protocol.values import ProgressKind

if TYPE_CHECKING:
    from coordinator.engine import Engine
    from coordinator.flight import Progress
    from coordinator.uploads import MemberUpload

# Downtime is milliseconds for small members and seconds for large ones (~3.5 GB/s copy).
FROZEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
PHASES = ("freeze", "capture", "upload", "commit")


class FlightView(Protocol):
    """What the hook reads of a coordinator.flight.Flight."""

    job: str
    number: int
    uploads: dict[str, MemberUpload]


@dataclass
class _Marks:
    """Elapsed seconds (since Begin) at which each phase ended, for one flight."""

    last: float = 0.0  # end of the previous phase
    staged: int = 0


class CoordinatorMetrics:
    """Event-driven metrics; `on_progress` is an `Engine.on_progress` hook."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.checkpoints = Counter(
            "cpcoord_checkpoints_total",
            "Generations ended, by outcome (committed, aborted) and abort reason",
            ["job_name", "outcome", "reason"],
            registry=r,
        )
        self.duration = Histogram(
            "cpcoord_checkpoint_duration_seconds",
            "Begin to commit or abort of a generation",
            ["job_name", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.frozen = Histogram(
            "cpcoord_checkpoint_frozen_seconds",
            "Downtime of a committed generation: its longest member's freeze, barrier and copy",
            ["job_name"],
            buckets=FROZEN_BUCKETS,
            registry=r,
        )
        self.phase = Histogram(
            "cpcoord_checkpoint_phase_seconds",
            "Phases of a generation: freeze (begin to barrier), capture (barrier to the last "
            "member thawed), upload (to the last member stored), commit (to committed)",
            ["job_name", "phase"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.logical = Counter(
            "cpcoord_generation_logical_bytes_total",
            "Bytes of the pages committed generations record (pages x page size)",
            ["job_name"],
            registry=r,
        )
        self.stored = Counter(
            "cpcoord_generation_stored_bytes_total",
            "Stored bytes of the distinct chunks committed generations reference",
            ["job_name"],
            registry=r,
        )
        self.new = Counter(
            "cpcoord_generation_new_bytes_total",
            "Stored bytes of the chunks committed generations added to the store",
            ["job_name"],
            registry=r,
        )
        self.pages = Counter(
            "cpcoord_generation_pages_total",
            "Pages committed generations record (present at the cut, zero pages included)",
            ["job_name"],
            registry=r,
        )
        self.captured = Counter(
            "cpcoord_pages_captured_total",
            "Pages captured for committed generations: the changed ones, or all for a full capture",
            ["job_name"],
            registry=r,
        )
        self.changed = Counter(
            "cpcoord_pages_changed_total",
            "Pages an incremental capture found changed (full captures not counted)",
            ["job_name"],
            registry=r,
        )
        self.zero = Counter(
            "cpcoord_pages_zero_total",
            "Captured pages that were all zeros (a marker, never stored)",
            ["job_name"],
            registry=r,
        )
        self.captures = Counter(
            "cpcoord_member_captures_total",
            "Member captures in committed generations, by node, tracker and mode",
            ["job_name", "node", "tracker", "mode"],
            registry=r,
        )
        self.info = Info("cpcoord_build", "cpcoord version and component", registry=r)
        self._marks: dict[tuple[str, int], _Marks] = {}
        self._lock = threading.Lock()

    def on_progress(self, f: FlightView, p: Progress) -> None:
        kind = p.event.kind
        key = (f.job, f.number)
        with self._lock:
            marks = self._marks.setdefault(key, _Marks())
            if kind is ProgressKind.BARRIER:
                self._phase(f.job, "freeze", marks, p.elapsed)
            elif kind is ProgressKind.MEMBER_STAGED:
                marks.staged += 1
                if p.event.total and marks.staged >= p.event.total:
                    self._phase(f.job, "capture", marks, p.elapsed)
            elif kind is ProgressKind.CAPTURED:
                self._phase(f.job, "upload", marks, p.elapsed)
            elif kind is ProgressKind.COMMITTED:
                self._phase(f.job, "commit", marks, p.elapsed)
            if kind in (ProgressKind.COMMITTED, ProgressKind.ABORTED):
                del self._marks[key]
        if kind is ProgressKind.COMMITTED:
            self._committed(f, p)
        elif kind is ProgressKind.ABORTED:
            reason = p.event.reason.value if p.event.reason is not None else ""
            if not reason and p.summary is not None:
                reason = p.summary.reason
            self.checkpoints.labels(f.job, "aborted", reason or "unknown").inc()
            self.duration.labels(f.job, "aborted").observe(p.elapsed)

    def _phase(self, job: str, phase: str, marks: _Marks, elapsed: float) -> None:
        self.phase.labels(job, phase).observe(max(0.0, elapsed - marks.last))
        marks.last = elapsed

    def _committed(self, f: FlightView, p: Progress) -> None:
        job = f.job
        self.checkpoints.labels(job, "committed", "").inc()
        self.duration.labels(job, "committed").observe(p.elapsed)
        s = p.summary
        if s is None:
            return
        self.frozen.labels(job).observe(s.run.frozen_seconds)
        if s.catalog is not None:
            z = s.catalog.sizes
            self.logical.labels(job).inc(z.bytes_logical)
            self.stored.labels(job).inc(z.bytes_stored)
            self.new.labels(job).inc(z.bytes_new)
            self.pages.labels(job).inc(z.pages)
        for u in f.uploads.values():
            mode = "full" if u.full else "incremental"
            self.captures.labels(job, u.node, u.tracker or "none", mode).inc()
            # Pages the coordinator received and checked, not what the agent says it copied.
            self.captured.labels(job).inc(u.pages)
            self.zero.labels(job).inc(u.zero_pages)
            if not u.full:
                self.changed.labels(job).inc(u.pages)


def install(
    engine: Engine, registry: CollectorRegistry, *, stats_min_interval_s: float = 10.0
) -> CoordinatorMetrics:
    """Put the coordinator's metrics on `registry`: the progress hook and the collector
    (whose store-walking figures refresh at most every `stats_min_interval_s`)."""
    from cpcoord import __version__

    m = CoordinatorMetrics(registry)
    m.info.info({"version": __version__, "component": "coordinator"})
    engine.on_progress.append(m.on_progress)
    registry.register(StateCollector(engine, stats_min_interval_s=stats_min_interval_s))
    return m


def serve(
    engine: Engine,
    port: int,
    addr: str = "0.0.0.0",
    registry: CollectorRegistry | None = None,
    *,
    stats_min_interval_s: float = 10.0,
) -> CollectorRegistry:
    """Serve /metrics on `port` (a daemon thread), on a registry of the daemon's own
    (never the process-global one); returns it."""
    reg = registry if registry is not None else CollectorRegistry()
    install(engine, reg, stats_min_interval_s=stats_min_interval_s)
    start_http_server(port, addr=addr, registry=reg)
    return reg
