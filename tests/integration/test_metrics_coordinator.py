"""Coordinator metrics through the real call sites: the real server and engine (in
process, loopback), scripted agents speaking the real AgentControl protocol
(tests/helpers/fake_agent.py), `coordinator.metrics.serve` on a fresh registry and a
free port, and /metrics read over HTTP and parsed as Prometheus text.

What must hold: outcomes counted by reason, bytes counters equal to the catalog's sizes,
the last-generation gauges equal to the last committed row, connected agents equal to
the agents started (and dropping when one leaves), phase histograms one observation per
phase per committed generation, and dedup and store figures equal to the store's own.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from coordinator import metrics
from cpcoord.gen.v1 import common_pb2, coordinator_pb2, types_pb2
from storecore.backend import LocalBackend
from testbed.cluster import InProcessCoordinator
from testbed.daemons import wait_for
from tests.helpers.cluster import inproc  # noqa: F401
from tests.helpers.fake_agent import PAGE, FakeAgent

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def rand(seed: int, pages: int) -> bytearray:
    return bytearray(np.random.default_rng(seed).integers(0, 256, pages * PAGE, np.uint8).tobytes())


@pytest.fixture
def served(inproc: InProcessCoordinator) -> Iterator[tuple[InProcessCoordinator, int]]:  # noqa: F811
    port = free_port()
    reg = CollectorRegistry()
    # Store figures refresh at every scrape here (the daemon: at most every 10 s).
    metrics.serve(inproc.engine, port, addr="127.0.0.1", registry=reg, stats_min_interval_s=0)
    yield inproc, port


def attach(c: InProcessCoordinator, agent: FakeAgent, job: str, member: str) -> None:
    c.stub.AttachMember(
        coordinator_pb2.AttachMemberRequest(
            job=job,
            member=member,
            node=agent.node,
            process=types_pb2.ProcessIdentity(pid=42),
            regions=agent.region_list(member),
        ),
        timeout=10,
    )


def checkpoint(
    c: InProcessCoordinator, job: str, lease_ms: int = 0, freeze_timeout_ms: int = 0
) -> coordinator_pb2.CheckpointEvent:
    req = coordinator_pb2.CheckpointRequest(
        job=job, lease_ms=lease_ms, freeze_timeout_ms=freeze_timeout_ms
    )
    events = list(c.stub.Checkpoint(req, timeout=30))
    return events[-1]


def test_checkpoints_bytes_agents_and_store_figures(
    served: tuple[InProcessCoordinator, int],
) -> None:
    c, port = served
    a, b = FakeAgent(c.address, "node-a"), FakeAgent(c.address, "node-b")
    try:
        for ag in (a, b):
            ag.wait_welcome()
        wait_for(lambda: len(c.engine.agents.connected()) == 2, what="two agents")
        s0 = scrape(port)
        assert value(s0, "cpcoord_agents_connected") == 2
        assert value(s0, "cpcoord_node_connected", node="node-a") == 1
        assert value(s0, "cpcoord_node_tracker_available", node="node-b", tracker="none") == 1
        assert value(s0, "cpcoord_build_info", component="coordinator", version=_version()) == 1

        a.hold("j", "m1", {"r0": rand(1, 32), "r1": bytearray(16 * PAGE)}, start=0x10000000)
        b.hold("j", "m2", {"r0": rand(2, 24)}, start=0x20000000)
        attach(c, a, "j", "m1")
        attach(c, b, "j", "m2")
        last = checkpoint(c, "j")
        assert last.kind == common_pb2.PROGRESS_KIND_COMMITTED
        a.memory("m1")["r0"][5 * PAGE : 7 * PAGE] = rand(9, 2)
        b.memory("m2")["r0"][0:PAGE] = a.memory("m1")["r0"][0:PAGE]  # a duplicate page
        assert checkpoint(c, "j").kind == common_pb2.PROGRESS_KIND_COMMITTED

        gens = c.repo.generations("j")
        assert [g.number for g in gens] == [1, 2]
        s = scrape(port)
        assert (
            value(s, "cpcoord_checkpoints_total", job_name="j", outcome="committed", reason="") == 2
        )
        for name, field in (
            ("cpcoord_generation_logical_bytes_total", "bytes_logical"),
            ("cpcoord_generation_stored_bytes_total", "bytes_stored"),
            ("cpcoord_generation_new_bytes_total", "bytes_new"),
            ("cpcoord_generation_pages_total", "pages"),
        ):
            want = sum(getattr(g.sizes, field) for g in gens)
            assert value(s, name, job_name="j") == want, name
        assert value(s, "cpcoord_generation_logical_bytes_total", job_name="j") == 2 * 72 * PAGE
        # Generation 1 captured everything (72 pages), generation 2 the 3 changed pages.
        assert value(s, "cpcoord_pages_captured_total", job_name="j") == 72 + 3
        assert value(s, "cpcoord_pages_changed_total", job_name="j") == 3
        assert value(s, "cpcoord_pages_zero_total", job_name="j") == 16
        assert (
            value(
                s,
                "cpcoord_member_captures_total",
                job_name="j",
                node="node-a",
                tracker="none",
                mode="incremental",
            )
            == 1
        )
        g2 = gens[-1]
        assert value(s, "cpcoord_last_generation_number", job_name="j") == 2
        assert (
            value(s, "cpcoord_last_generation_logical_bytes", job_name="j")
            == g2.sizes.bytes_logical
        )
        assert value(s, "cpcoord_last_generation_new_bytes", job_name="j") == g2.sizes.bytes_new
        assert (
            value(s, "cpcoord_last_generation_stored_bytes", job_name="j") == g2.sizes.bytes_stored
        )
        assert (
            abs(value(s, "cpcoord_last_generation_timestamp_seconds", job_name="j") - time.time())
            < 60
        )
        assert value(s, "cpcoord_generations", job_name="j") == 2
        assert value(s, "cpcoord_job_members", job_name="j", state="running") == 2
        # One observation per phase per committed generation, frozen once each.
        for phase in ("freeze", "capture", "upload", "commit"):
            assert (
                value(s, "cpcoord_checkpoint_phase_seconds_count", job_name="j", phase=phase) == 2
            )
        assert value(s, "cpcoord_checkpoint_frozen_seconds_count", job_name="j") == 2
        st = c.repo.stats()
        assert value(s, "cpcoord_store_chunks") == st.chunks > 0
        assert value(s, "cpcoord_store_size_bytes") == st.pack_bytes > 0
        assert value(s, "cpcoord_store_dedup_ratio") == pytest.approx(st.dedup_ratio)
        assert value(s, "cpcoord_store_dedup_ratio") > 1  # generation 2 shares most pages
        if isinstance(c.repo.backend, LocalBackend):
            assert (
                0
                < value(s, "cpcoord_store_filesystem_avail_bytes")
                <= value(s, "cpcoord_store_filesystem_size_bytes")
            )
        else:  # an object store has no file system of ours to measure
            assert ("cpcoord_store_filesystem_avail_bytes", ()) not in s

        b.close()
        wait_for(lambda: len(c.engine.agents.connected()) == 1, what="node-b gone")
        s = scrape(port)
        assert value(s, "cpcoord_agents_connected") == 1
        assert value(s, "cpcoord_node_connected", node="node-b") == 0
    finally:
        a.close()
        b.close()


def test_aborts_counted_by_reason(served: tuple[InProcessCoordinator, int]) -> None:
    c, port = served
    a = FakeAgent(c.address, "node-a", faults={"no_freeze"})
    try:
        a.wait_welcome()
        a.hold("k", "m", {"r0": rand(3, 4)}, start=0x10000000)
        wait_for(lambda: c.engine.agents.connected(), what="agent")
        attach(c, a, "k", "m")
        last = checkpoint(c, "k", lease_ms=400, freeze_timeout_ms=200)
        assert last.kind == common_pb2.PROGRESS_KIND_ABORTED
        s = scrape(port)
        assert (
            value(
                s,
                "cpcoord_checkpoints_total",
                job_name="k",
                outcome="aborted",
                reason="freeze_timeout",
            )
            == 1
        )
        assert (
            value(s, "cpcoord_checkpoint_duration_seconds_count", job_name="k", outcome="aborted")
            == 1
        )
        assert (
            "cpcoord_checkpoints_total",
            (("job_name", "k"), ("outcome", "committed"), ("reason", "")),
        ) not in s
        # No committed generation: no last-generation gauge for the job, and no phase
        # past the one that never ended.
        assert ("cpcoord_last_generation_number", (("job_name", "k"),)) not in s
        assert (
            "cpcoord_checkpoint_phase_seconds_count",
            (("job_name", "k"), ("phase", "freeze")),
        ) not in s
        assert value(s, "cpcoord_checkpoints_in_flight") == 0
    finally:
        a.close()


def _version() -> str:
    from cpcoord import __version__

    return __version__
