"""The coordinator's API and protocol driving, against the real server (in process, on a
loopback port) and scripted agents speaking the real AgentControl protocol
(tests/helpers/fake_agent.py): checkpoint, export, listings, retention and pinning,
membership reconciliation, dedup, aborts (agent lost, freeze timeout, client cancel),
health checking and reflection.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from coordinator.engine import Options
from cpcoord.gen.v1 import common_pb2, coordinator_pb2
from cpcoord.image import load_image, region_bytes
from testbed.cluster import InProcessCoordinator
from testbed.daemons import wait_for
from tests.helpers.fake_agent import PAGE, FakeAgent, connected_agents
from tests.helpers.inproc_cli import cli, cli_json, rand, setup_job

pytestmark = pytest.mark.integration


@pytest.fixture
def agents(inproc: InProcessCoordinator) -> Iterator[dict[str, FakeAgent]]:
    with connected_agents(inproc, FakeAgent) as made:
        yield made


def test_checkpoint_commit_export_and_listings(
    inproc: InProcessCoordinator,
    agents: dict[str, FakeAgent],
    capsys,
    tmp_path: Path,
) -> None:
    setup_job(inproc, agents, capsys)
    a = agents["node-a"]
    r1 = cli_json(inproc, capsys, "checkpoint", "--job", "j")
    assert (r1["generation"], r1["state"], r1["members"], r1["full"]) == (1, "committed", 2, True)
    assert r1["pages"] == 32 + 16 + 24 and r1["zero_pages"] == 16
    snap1 = {k: bytes(v) for k, v in a.memory("m1").items()}
    a.memory("m1")["r0"][5 * PAGE : 7 * PAGE] = rand(9, 2)
    a.memory("m1")["r1"][0:PAGE] = rand(10, 1)
    r2 = cli_json(inproc, capsys, "checkpoint", "--job", "j")
    assert r2["parent"] == 1 and not r2["full"]
    assert r2["bytes_stored_new"] <= 3 * PAGE + 1024  # three new pages, nothing else
    capture = [m for k, m in a.events if k == "capture"]
    assert [c.full for c in capture] == [True, False]

    for n, m1 in ((1, snap1), (2, {k: bytes(v) for k, v in a.memory("m1").items()})):
        out = tmp_path / f"e{n}"
        assert (
            cli(inproc, capsys, "export", "--job", "j", "--generation", str(n), "--out", str(out))[
                0
            ]
            == 0
        )
        im = load_image(out)
        for rname, want in m1.items():
            assert np.asarray(region_bytes(im, "m1", rname)).tobytes() == want
        assert np.asarray(region_bytes(im, "m2", "r0")).tobytes() == bytes(
            agents["node-b"].memory("m2")["r0"]
        )

    jobs = cli_json(inproc, capsys, "jobs")["jobs"]
    assert jobs[0]["job"] == "j" and jobs[0]["last_committed"]["generation"] == 2
    assert {m["name"]: m["health"] for m in jobs[0]["members"]} == {
        "m1": "running",
        "m2": "running",
    }
    gens = cli_json(inproc, capsys, "generations", "--job", "j")["generations"]
    assert [g["generation"] for g in gens] == [2, 1]
    got = inproc.stub.GetGeneration(coordinator_pb2.GetGenerationRequest(job="j", generation=0))
    assert got.info.number == 2 and [m.member for m in got.members] == ["m1", "m2"]
    agents_ = inproc.stub.ListAgents(coordinator_pb2.ListAgentsRequest()).agents
    assert [(x.node, x.connected, x.members) for x in agents_] == [
        ("node-a", True, 1),
        ("node-b", True, 1),
    ]
    assert cli_json(inproc, capsys, "verify")["ok"]
    wait_for(lambda: [x.generation for x in a.seen("committed")] == [1, 2], what="Committed")


def test_dedup_across_members_and_zero_pages(
    inproc: InProcessCoordinator,
    agents: dict[str, FakeAgent],
    capsys,
) -> None:
    same = rand(7, 64)
    agents["node-a"].hold("d", "x", {"r": bytearray(same)}, start=0x10000000)
    agents["node-b"].hold("d", "y", {"r": bytearray(same)}, start=0x30000000)
    agents["node-b"].hold("d", "z", {"r": bytearray(256 * PAGE)}, start=0x50000000)
    for m, node in (("x", "node-a"), ("y", "node-b"), ("z", "node-b")):
        assert (
            cli(
                inproc, capsys, "attach", "--job", "d", "--member", m, "--pid", "1", "--node", node
            )[0]
            == 0
        )
    r = cli_json(inproc, capsys, "checkpoint", "--job", "d")
    assert r["bytes_logical"] == (64 + 64 + 256) * PAGE
    assert 64 * PAGE <= r["bytes_stored_new"] < 64 * PAGE * 1.05  # stored once
    assert r["zero_pages"] == 256


def test_retention_pin_and_delete_latest(
    capsys, tmp_path: Path, store_select: Callable[[Path], dict[str, Any]]
) -> None:
    c = InProcessCoordinator(
        tmp_path / "store", Options(keep=2, heartbeat_s=0.5), **store_select(tmp_path)
    )
    a = FakeAgent(c.address, "node-a")
    try:
        a.wait_welcome()
        a.hold("r", "m", {"r0": rand(3, 8)}, start=0x10000000)
        wait_for(lambda: all(s.ready for s in c.engine.agents.connected()))
        assert cli(c, capsys, "attach", "--job", "r", "--member", "m", "--pid", "5")[0] == 0
        assert cli_json(c, capsys, "checkpoint", "--job", "r", "--pin")["pinned"] is True
        for i in range(3):
            a.memory("m")["r0"][0:PAGE] = rand(20 + i, 1)
            cli_json(c, capsys, "checkpoint", "--job", "r")
        gens = cli_json(c, capsys, "generations", "--job", "r")["generations"]
        assert [(g["generation"], g["pinned"]) for g in gens] == [(4, False), (3, False), (1, True)]
        # Deleting the newest generation: the member's tracker base is gone, next is full.
        assert cli(c, capsys, "generations", "--job", "r", "--delete", "4")[0] == 0
        a.memory("m")["r0"][PAGE : 2 * PAGE] = rand(30, 1)
        r = cli_json(c, capsys, "checkpoint", "--job", "r")
        assert r["parent"] == 3 and r["full"]
        assert [m.full for k, m in a.events if k == "capture"][-1] is True
        code, _ = cli(c, capsys, "generations", "--job", "r", "--delete", "1")
        assert code == 67  # pinned
        assert cli(c, capsys, "generations", "--job", "r", "--delete", "1", "--force")[0] == 0
        gc = cli_json(c, capsys, "gc")
        assert gc["chunks_dropped"] >= 1
        assert cli_json(c, capsys, "verify")["ok"]
    finally:
        a.close()
        c.close()


def test_reconnected_agent_gets_its_members_back(
    inproc: InProcessCoordinator,
    agents: dict[str, FakeAgent],
    capsys,
) -> None:
    setup_job(inproc, agents, capsys)
    assert cli_json(inproc, capsys, "checkpoint", "--job", "j")["state"] == "committed"
    old = agents["node-a"]
    old.close()
    wait_for(lambda: inproc.engine.agents.current("node-a") is None, what="node-a lost")
    jobs = cli_json(inproc, capsys, "jobs")["jobs"]
    assert {m["name"]: m["health"] for m in jobs[0]["members"]}["m1"] == "agent_disconnected"
    assert cli(inproc, capsys, "checkpoint", "--job", "j")[0] == 57  # AgentUnavailable
    new = FakeAgent(inproc.address, "node-a", connect=False)
    agents["node-a"] = new
    new.hold("j", "m1", {k: bytearray(v) for k, v in old.memory("m1").items()}, start=0x10000000)
    new.connect()
    wait_for(lambda: "m1" in new.attached, what="m1 re-attached")
    wait_for(lambda: inproc.engine.agents.current("node-a").ready, what="node-a ready")  # type: ignore[union-attr]
    r = cli_json(inproc, capsys, "checkpoint", "--job", "j")
    assert r["state"] == "committed"
    assert [m.full for k, m in new.events if k == "capture"] == [True]  # fresh tracker


def test_member_gone_is_reported_and_refused(
    inproc: InProcessCoordinator,
    agents: dict[str, FakeAgent],
    capsys,
) -> None:
    from cpcoord.gen.v1 import agent_pb2

    setup_job(inproc, agents, capsys)
    agents["node-b"].send(
        member_gone=agent_pb2.MemberGone(job="j", member="m2", detail="killed by signal 9")
    )
    wait_for(lambda: inproc.engine.members.get("j", "m2").gone, what="m2 gone")  # type: ignore[union-attr]
    m2 = next(
        m for m in cli_json(inproc, capsys, "jobs")["jobs"][0]["members"] if m["name"] == "m2"
    )
    assert (m2["health"], m2["detail"]) == ("gone", "killed by signal 9")
    assert cli(inproc, capsys, "checkpoint", "--job", "j")[0] == 74  # MemberNotRunning
    assert cli(inproc, capsys, "detach", "--job", "j", "--member", "m2")[0] == 0
    assert cli_json(inproc, capsys, "checkpoint", "--job", "j")["members"] == 1


def _stream(c: InProcessCoordinator, **kw: object) -> Any:
    return c.stub.Checkpoint(coordinator_pb2.CheckpointRequest(job="j", **kw))  # type: ignore[arg-type]


def _aborted(events: list[coordinator_pb2.CheckpointEvent]) -> str:
    assert events[-1].kind == common_pb2.PROGRESS_KIND_ABORTED, events[-1]
    return common_pb2.AbortReason.Name(events[-1].reason)


def test_agent_lost_during_freeze_aborts(inproc: InProcessCoordinator, capsys) -> None:
    a = FakeAgent(inproc.address, "node-a", faults={"no_freeze"})
    b = FakeAgent(inproc.address, "node-b")
    try:
        setup_job(inproc, {"node-a": a, "node-b": b}, capsys)
        call = _stream(inproc)
        first = next(call)
        assert first.kind == common_pb2.PROGRESS_KIND_FREEZE_SENT
        wait_for(lambda: a.seen("freeze") and b.seen("freeze"), what="freeze sent")
        a.close()
        assert _aborted([first, *call]) == "ABORT_REASON_AGENT_LOST"
        wait_for(lambda: b.seen("abort"), what="abort to the surviving agent")
        gens = inproc.stub.ListGenerations(coordinator_pb2.ListGenerationsRequest(job="j"))
        assert not gens.generations
    finally:
        b.close()


def test_freeze_timeout_and_cancel(inproc: InProcessCoordinator, capsys) -> None:
    a = FakeAgent(inproc.address, "node-a", faults={"no_freeze"})
    b = FakeAgent(inproc.address, "node-b")
    try:
        setup_job(inproc, {"node-a": a, "node-b": b}, capsys)
        t0 = time.monotonic()
        events = list(_stream(inproc, lease_ms=400, freeze_timeout_ms=200))
        assert _aborted(events) == "ABORT_REASON_FREEZE_TIMEOUT"
        assert time.monotonic() - t0 < 3
        call = _stream(inproc)
        next(call)
        call.cancel()
        wait_for(lambda: len(a.seen("abort")) == 2, what="abort after cancel")
        gens = inproc.stub.ListGenerations(
            coordinator_pb2.ListGenerationsRequest(job="j", include_aborted=True)
        ).generations
        assert [common_pb2.AbortReason.Name(g.reason) for g in gens] == [
            "ABORT_REASON_CANCELLED",
            "ABORT_REASON_FREEZE_TIMEOUT",
        ]
    finally:
        a.close()
        b.close()


def test_health_and_reflection(inproc: InProcessCoordinator) -> None:
    h = health_pb2_grpc.HealthStub(inproc.channel)
    for svc in ("", "cpcoord.v1.Coordinator", "cpcoord.v1.AgentControl"):
        r = h.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(inproc.channel)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    resp = next(stub.ServerReflectionInfo(iter([req]), timeout=5))
    names = {s.name for s in resp.list_services_response.service}
    assert {"cpcoord.v1.Coordinator", "cpcoord.v1.AgentControl", "grpc.health.v1.Health"} <= names
