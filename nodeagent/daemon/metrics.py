"""Prometheus metrics of the node agent (`--metrics-port`), always on a registry passed in.

`AgentMetrics(registry)` builds the agent's set on a registry of the caller's (the daemon
makes one in `cpcoord agent`; tests make one per test; never prometheus_client's
process-global one) and is handed to whatever records: the agent, its ptrace thread and
the capture handoff. Names follow `cpcoord_agent_*`; meanings in docs/metrics.md. Counters
only ever count facts the agent saw; nothing here holds page contents or ids.

Two kinds, as on the coordinator: events are counted as they happen; state (connected,
members held, members frozen) is read from the agent when Prometheus scrapes
(`StateCollector`, fed by `AgentMetrics.observe(state)`), and so are the tracker
backends (`TrackerCollector`: what this kernel offers, which one members that name none
get; the probe results are cached by the tracker registry).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from nodeagent.capture.livecopy import Report as PrecopyReport

FROZEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
UPLOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class AgentState(Protocol):
    """What the agent's state gauges read at scrape time."""

    def is_connected(self) -> bool: ...

    def members_held(self) -> int: ...

    def members_frozen(self) -> int: ...


class StateCollector(Collector):
    """The agent's state gauges, read at scrape time; all 0 until a state is observed
    (an agent not built yet holds nothing and is not connected)."""

    def __init__(self) -> None:
        self.state: AgentState | None = None

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        s = self.state
        for name, doc, value in (
            ("cpcoord_agent_connected", "1 while the control stream is up", _connected(s)),
            ("cpcoord_agent_members", "Members held", s.members_held() if s else 0),
            ("cpcoord_agent_frozen_members", "Members frozen right now", _frozen(s)),
        ):
            yield GaugeMetricFamily(name, doc, value=float(value))
        cache = getattr(s, "cache_stats", None)
        got = cache() if cache is not None else None
        if got is not None:  # --cache (docs/multilevel.md)
            size, pending, drained, full = got
            yield GaugeMetricFamily(
                "cpcoord_agent_cache_bytes", "Bytes of packs in the node cache", value=size
            )
            yield GaugeMetricFamily(
                "cpcoord_agent_drain_pending_packs", "Cached packs still to drain", value=pending
            )
            yield CounterMetricFamily(
                "cpcoord_agent_drain_bytes", "Bytes of cached packs put into the store",
                value=drained,
            )  # fmt: skip
            yield CounterMetricFamily(
                "cpcoord_agent_cache_full", "Packs written to the store directly: cache full",
                value=full,
            )  # fmt: skip
        partner = getattr(s, "partner_stats", None)
        got_p = partner() if partner is not None else None
        if got_p is not None:  # partner copies (docs/multilevel.md)
            held, sent, pfull = got_p
            yield GaugeMetricFamily(
                "cpcoord_agent_partner_held_bytes",
                "Bytes of other nodes' packs held here as partner copies", value=held,
            )  # fmt: skip
            yield CounterMetricFamily(
                "cpcoord_agent_partner_sent_bytes", "Bytes of packs copied to the partner",
                value=sent,
            )  # fmt: skip
            yield CounterMetricFamily(
                "cpcoord_agent_partner_full",
                "Generations the partner refused: its cache was full", value=pfull,
            )  # fmt: skip


def _connected(s: AgentState | None) -> int:
    return 1 if s is not None and s.is_connected() else 0


def _frozen(s: AgentState | None) -> int:
    return s.members_frozen() if s is not None else 0


class AgentMetrics:
    """The agent's metrics on `registry`: the event counters here, the state gauges and
    the tracker backends by collectors registered with them."""

    def __init__(self, registry: CollectorRegistry, tracker: str = "auto") -> None:
        self.registry = r = registry

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(f"cpcoord_agent_{name}", doc, labels, registry=r)

        def seconds(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(f"cpcoord_agent_{name}", doc, buckets=buckets, registry=r)

        self.reconnects = counter("reconnects_total", "Control streams opened after the first")
        self.frozen_seconds = seconds(
            "frozen_seconds", "Per member downtime: freeze, barrier and own copy", FROZEN_BUCKETS
        )
        self.pages_present = counter("pages_present_total", "Pages present at the cut")
        self.pages_captured = counter(
            "pages_captured_total",
            "Pages copied into staging (the changed ones, or all for a full capture)",
        )
        self.upload_seconds = seconds(
            "upload_seconds",
            "Per member upload time (hash, MissingChunks, UploadPages)",
            UPLOAD_BUCKETS,
        )
        self.upload_bytes = counter("upload_bytes_total", "Chunk bytes sent, as sent")
        self.upload_chunks = counter(
            "upload_chunks_total",
            "Chunks of uploads, by whether they were sent or the store had them",
            ["outcome"],
        )
        self.restore_read_bytes = counter(
            "restore_read_bytes_total",
            "Restore reads by data path: stored bytes read from the store (direct), page "
            "bytes received from the coordinator (coordinator), chunk bytes of the last "
            "upload taken from the agent's own staging (memory)",
            ["path"],
        )
        self.zero_pages = counter("zero_pages_total", "Captured pages that were all zeros")
        self.failures = counter("failures_total", "Failed reports sent, by reason", ["reason"])
        self.members_gone = counter("members_gone_total", "Members whose process exited")
        self.captures = counter(
            "captures_total",
            "Member captures staged, by tracker and mode (full, incremental)",
            ["tracker", "mode"],
        )
        self.precopy_rounds = counter(
            "precopy_rounds_total", "Live passes of pre-copied member captures (before the freeze)"
        )
        self.precopy_bytes = counter(
            "precopy_bytes_total", "Bytes copied while members ran (pre-copy live passes)"
        )
        self.precopy_frozen_pages = counter(
            "precopy_frozen_pages_total",
            "Pages of pre-copied captures still copied in the frozen window",
        )
        # Not state read at scrape time: staging is held by uploads in flight, which
        # release it from their own threads (nodeagent/daemon/tracking.py, `handoff`).
        self.staging_bytes = Gauge(
            "cpcoord_agent_staging_bytes",
            "Bytes of captured pages held in staging, waiting for upload",
            registry=r,
        )
        self.info = Info("cpcoord_build", "cpcoord version and component", registry=r)
        self._state = StateCollector()
        r.register(self._state)
        r.register(TrackerCollector(tracker))

    def observe(self, state: AgentState) -> None:
        """Read the state gauges from `state` from now on (the agent, once built)."""
        self._state.state = state

    def observe_precopy(self, report: PrecopyReport) -> None:
        """One pre-copied member capture (nodeagent/capture/precopy.py)."""
        self.precopy_rounds.inc(report.rounds)
        self.precopy_bytes.inc(sum(p.nbytes for p in report.passes))
        self.precopy_frozen_pages.inc(report.frozen_pages)


class TrackerCollector(Collector):
    """Tracker backends at scrape time: which ones this kernel offers, and the one the
    agent uses for members that name none (`--tracker`, `auto` resolved)."""

    def __init__(self, preference: str = "auto") -> None:
        self.preference = preference

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from nodeagent.trackers import registry

        avail = GaugeMetricFamily(
            "cpcoord_agent_tracker_available",
            "Tracker backends this kernel offers: 1 usable, 0 not",
            labels=["tracker"],
        )
        for a in registry.report():
            avail.add_metric([a.name], 1.0 if a.available else 0.0)
        yield avail
        in_use = GaugeMetricFamily(
            "cpcoord_agent_tracker_default",
            "1 for the tracker backend used for members that name none",
            labels=["tracker"],
        )
        # An unavailable preference (TrackerUnavailable) shows as no sample at all.
        with contextlib.suppress(Exception):
            in_use.add_metric([registry.choose(self.preference)], 1.0)
        yield in_use


def install(registry: CollectorRegistry, tracker: str = "auto") -> AgentMetrics:
    """The agent's metrics on `registry`, with the build info set."""
    from cpcoord import __version__

    m = AgentMetrics(registry, tracker)
    m.info.info({"version": __version__, "component": "agent"})
    return m


def unserved() -> AgentMetrics:
    """Metrics nobody scrapes, on a registry of their own (an agent or worker built
    without any: tests, benchmarks)."""
    return AgentMetrics(CollectorRegistry())


def serve(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0") -> None:
    """Serve `registry` on /metrics at `port` (a daemon thread)."""
    start_http_server(port, addr=addr, registry=registry)
