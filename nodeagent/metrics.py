"""Prometheus metrics of the node agent (`--metrics-port`), on a registry passed in.

`AgentMetrics(registry)` builds the set on a registry of the caller's; tests make one
per test. The daemon's call sites still use the module-level names (CONNECTED,
FROZEN_SECONDS, ...), which belong to one default instance on this module's own
registry, `REGISTRY` (never prometheus_client's process-global one). Names follow
`cpcoord_agent_*`; meanings in docs/metrics.md. Counters only ever count facts the agent
saw; nothing here holds page contents or ids.

The tracker backends (what this kernel offers, which one the agent uses by default) are
read at scrape time by `TrackerCollector`: the probe results are cached by the registry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

FROZEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
UPLOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class AgentMetrics:
    """The agent's event-driven metrics on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.connected = Gauge(
            "cpcoord_agent_connected", "1 while the control stream is up", registry=r
        )
        self.reconnects = Counter(
            "cpcoord_agent_reconnects_total", "Control streams opened after the first", registry=r
        )
        self.members = Gauge("cpcoord_agent_members", "Members held", registry=r)
        self.frozen = Gauge("cpcoord_agent_frozen_members", "Members frozen right now", registry=r)
        self.frozen_seconds = Histogram(
            "cpcoord_agent_frozen_seconds",
            "Per member downtime: freeze, barrier and own copy",
            buckets=FROZEN_BUCKETS,
            registry=r,
        )
        self.pages_present = Counter(
            "cpcoord_agent_pages_present_total", "Pages present at the cut", registry=r
        )
        self.pages_captured = Counter(
            "cpcoord_agent_pages_captured_total",
            "Pages copied into staging (the changed ones, or all for a full capture)",
            registry=r,
        )
        self.upload_seconds = Histogram(
            "cpcoord_agent_upload_seconds",
            "Per member upload time (hash, MissingChunks, UploadPages)",
            buckets=UPLOAD_BUCKETS,
            registry=r,
        )
        self.upload_bytes = Counter(
            "cpcoord_agent_upload_bytes_total", "Chunk bytes sent, as sent", registry=r
        )
        self.upload_chunks = Counter(
            "cpcoord_agent_upload_chunks_total",
            "Chunks of uploads, by whether they were sent or the store had them",
            ["outcome"],
            registry=r,
        )
        self.zero_pages = Counter(
            "cpcoord_agent_zero_pages_total", "Captured pages that were all zeros", registry=r
        )
        self.failures = Counter(
            "cpcoord_agent_failures_total", "Failed reports sent, by reason", ["reason"], registry=r
        )
        self.members_gone = Counter(
            "cpcoord_agent_members_gone_total", "Members whose process exited", registry=r
        )
        # Fed once the worker calls them (docs/metrics.md, end of "Agent").
        self.captures = Counter(
            "cpcoord_agent_captures_total",
            "Member captures staged, by tracker and mode (full, incremental)",
            ["tracker", "mode"],
            registry=r,
        )
        self.staging_bytes = Gauge(
            "cpcoord_agent_staging_bytes",
            "Bytes of captured pages held in staging, waiting for upload",
            registry=r,
        )
        self.info = Info("cpcoord_build", "cpcoord version and component", registry=r)


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


def install(
    registry: CollectorRegistry, tracker: str = "auto", metrics: AgentMetrics | None = None
) -> AgentMetrics:
    """Put the agent's metrics on `registry` (or use `metrics`, already on it) plus the
    tracker collector and the build info."""
    from cpcoord import __version__

    m = metrics if metrics is not None else AgentMetrics(registry)
    m.info.info({"version": __version__, "component": "agent"})
    registry.register(TrackerCollector(tracker))
    return m


# The daemon's default instance (the module-level names its call sites use).
REGISTRY = CollectorRegistry(auto_describe=True)
DEFAULT = AgentMetrics(REGISTRY)
CONNECTED = DEFAULT.connected
RECONNECTS = DEFAULT.reconnects
MEMBERS = DEFAULT.members
FROZEN = DEFAULT.frozen
FROZEN_SECONDS = DEFAULT.frozen_seconds
PAGES_PRESENT = DEFAULT.pages_present
PAGES_CAPTURED = DEFAULT.pages_captured
UPLOAD_SECONDS = DEFAULT.upload_seconds
UPLOAD_BYTES = DEFAULT.upload_bytes
UPLOAD_CHUNKS = DEFAULT.upload_chunks
ZERO_PAGES = DEFAULT.zero_pages
FAILURES = DEFAULT.failures
MEMBERS_GONE = DEFAULT.members_gone
CAPTURES = DEFAULT.captures
STAGING_BYTES = DEFAULT.staging_bytes
_installed = False


def serve(
    port: int,
    addr: str = "0.0.0.0",
    registry: CollectorRegistry | None = None,
    tracker: str = "auto",
) -> CollectorRegistry:
    """Serve /metrics on `port` (a daemon thread) and return the registry served:
    `registry` if given (the caller filled it with `install`), else the default instance's,
    completed with the tracker collector on first use."""
    global _installed
    if registry is None:
        registry = REGISTRY
        if not _installed:
            install(REGISTRY, tracker, DEFAULT)
            _installed = True
    start_http_server(port, addr=addr, registry=registry)
    return registry
