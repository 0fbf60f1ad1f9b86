"""Node agent metrics, each test on a fresh CollectorRegistry: the event-driven set
(`AgentMetrics`), the state gauges and the tracker backends read at scrape time (against
a scripted state and the agent's own tracker registry), and `serve` exposing the
registry passed in over HTTP."""

from __future__ import annotations

import socket
import urllib.request
from dataclasses import dataclass

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.daemon import metrics
from nodeagent.daemon.metrics import AgentMetrics, TrackerCollector, install, unserved
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


@dataclass
class State:
    connected: bool = False
    held: int = 0
    frozen: int = 0

    def is_connected(self) -> bool:
        return self.connected

    def members_held(self) -> int:
        return self.held

    def members_frozen(self) -> int:
        return self.frozen


def test_state_gauges_are_read_at_scrape_time() -> None:
    reg = CollectorRegistry()
    m = AgentMetrics(reg)
    # Nothing observed yet (the agent is not built): nothing held, not connected.
    assert sample(reg, "cpcoord_agent_connected") == 0
    assert sample(reg, "cpcoord_agent_frozen_members") == 0
    st = State()
    m.observe(st)
    st.connected, st.held, st.frozen = True, 3, 2
    assert sample(reg, "cpcoord_agent_connected") == 1
    assert sample(reg, "cpcoord_agent_members") == 3
    assert sample(reg, "cpcoord_agent_frozen_members") == 2
    st.frozen = 0
    assert sample(reg, "cpcoord_agent_frozen_members") == 0


def test_nothing_on_the_global_registry() -> None:
    unserved().members_gone.inc()
    assert prometheus_client.REGISTRY.get_sample_value("cpcoord_agent_connected") is None
    assert prometheus_client.REGISTRY.get_sample_value("cpcoord_agent_members_gone_total") is None


def test_serve_exposes_the_registry_passed_in() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reg = CollectorRegistry()
    m = install(reg, "none")
    metrics.serve(port, reg, addr="127.0.0.1")
    m.members_gone.inc()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    got = {
        (smp.name, tuple(sorted(smp.labels.items()))): smp.value
        for fam in text_string_to_metric_families(text)
        for smp in fam.samples
    }
    assert got[("cpcoord_agent_members_gone_total", ())] == 1
    assert got[("cpcoord_agent_tracker_default", (("tracker", "none"),))] == 1
    assert got[("cpcoord_agent_connected", ())] == 0


def _version() -> str:
    from cpcoord import __version__

    return __version__
