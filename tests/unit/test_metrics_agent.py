"""Node agent metrics, each test on a fresh CollectorRegistry: the event-driven set
(`AgentMetrics`), the tracker backends read at scrape time (`TrackerCollector`) against
the agent's own tracker registry, and `serve` exposing the default instance over HTTP
(the one the daemon's call sites feed)."""

from __future__ import annotations

import socket
import urllib.request

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from nodeagent import metrics
from nodeagent.metrics import AgentMetrics, TrackerCollector, install
from nodeagent.trackers import registry as trackers


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def test_event_metrics_on_a_fresh_registry() -> None:
    reg = CollectorRegistry()
    m = AgentMetrics(reg)
    m.frozen_seconds.observe(0.004)
    m.upload_chunks.labels("sent").inc(3)
    m.captures.labels("hash", "incremental").inc()
    assert sample(reg, "cpcoord_agent_frozen_seconds_count") == 1
    assert sample(reg, "cpcoord_agent_frozen_seconds_bucket", le="0.005") == 1
    assert sample(reg, "cpcoord_agent_upload_chunks_total", outcome="sent") == 3
    assert sample(reg, "cpcoord_agent_captures_total", tracker="hash", mode="incremental") == 1
    other = CollectorRegistry()
    AgentMetrics(other)  # one per registry: independent, no duplicate-name clash
    assert sample(other, "cpcoord_agent_upload_chunks_total", outcome="sent") is None


def test_tracker_backends_match_the_probe() -> None:
    reg = CollectorRegistry()
    install(reg, "auto")
    for a in trackers.report():
        want = 1.0 if a.available else 0.0
        assert sample(reg, "cpcoord_agent_tracker_available", tracker=a.name) == want, a
    best = trackers.choose("auto")
    assert sample(reg, "cpcoord_agent_tracker_default", tracker=best) == 1
    assert sample(reg, "cpcoord_agent_tracker_default", tracker="auto") is None
    assert sample(reg, "cpcoord_build_info", component="agent", version=_version()) == 1


def test_a_named_tracker_preference_is_the_default() -> None:
    reg = CollectorRegistry()
    reg.register(TrackerCollector("hash"))
    assert sample(reg, "cpcoord_agent_tracker_default", tracker="hash") == 1
    assert sample(reg, "cpcoord_agent_tracker_default", tracker="none") is None


def test_module_names_are_the_default_instance_off_the_global_registry() -> None:
    assert metrics.REGISTRY is not prometheus_client.REGISTRY
    assert metrics.FROZEN_SECONDS is metrics.DEFAULT.frozen_seconds
    assert metrics.UPLOAD_CHUNKS is metrics.DEFAULT.upload_chunks
    assert prometheus_client.REGISTRY.get_sample_value("cpcoord_agent_connected") is None


def test_serve_exposes_the_default_instance() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics.serve(port, addr="127.0.0.1", tracker="none")
    before = metrics.REGISTRY.get_sample_value("cpcoord_agent_members_gone_total") or 0.0
    metrics.MEMBERS_GONE.inc()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    got = {
        (smp.name, tuple(sorted(smp.labels.items()))): smp.value
        for fam in text_string_to_metric_families(text)
        for smp in fam.samples
    }
    assert got[("cpcoord_agent_members_gone_total", ())] == before + 1
    assert got[("cpcoord_agent_tracker_default", (("tracker", "none"),))] == 1


def _version() -> str:
    from cpcoord import __version__

    return __version__
