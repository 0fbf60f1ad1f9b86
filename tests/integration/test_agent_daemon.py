"""`cpcoord agent` as a real daemon against a real `cpcoord coordinator` (both
subprocesses, loopback): checkpoints byte-exact through the store, a dead agent never
leaves a member stopped, reconnect after a coordinator restart re-announces the members,
a member's death is reported. Cluster helpers: tests/helpers/cluster.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cpcoord.image import load_image, region_bytes
from testbed.cluster import Cluster
from testbed.daemons import REPO, daemon_env, wait_for
from testbed.driver import Target, task_states
from tests.helpers.e2e import attach

pytestmark = [pytest.mark.integration, pytest.mark.slow]
JOB = "train"


def exported(c: Cluster, tmp: Path, gen: int, member: str, start: int) -> np.ndarray:
    out = tmp / f"export-{gen}-{time.monotonic_ns()}"
    c.cli("export", "--job", JOB, "--generation", str(gen), "--out", str(out))
    image = load_image(out)
    region = next(r for r in image.member(member).regions if r.start == start)
    return np.array(region_bytes(image, member, region.name))


def stopped(t: Target) -> bool:
    states = task_states(t.pid)
    return bool(states) and all(s in "tT" for s in states.values())


def test_checkpoints_through_the_store_are_exact(
    cluster_factory: Callable[..., Cluster], target_factory: Any, tmp_path: Path
) -> None:
    c = cluster_factory(nodes=("node-a", "node-b"))
    a = target_factory(maps=["data:256:anon:random:1", "zeros:64:anon:zero"])
    b = target_factory(maps=["data:128"])
    attach(c, JOB, "a", a, "node-a", ("data", "zeros"))
    attach(c, JOB, "b", b, "node-b")

    g1 = c.cli_json("checkpoint", "--job", JOB)
    assert g1["state"] == "committed" and g1["full"], g1
    assert g1["pages_captured"] == 256 + 64 + 128 and g1["zero_pages"] == 64
    assert g1["frozen_seconds"] < 2.0
    want_a, want_b = a.read("data"), b.read("data")
    assert (exported(c, tmp_path, g1["generation"], "a", a.mapping("data").addr) == want_a).all()
    assert (exported(c, tmp_path, g1["generation"], "b", b.mapping("data").addr) == want_b).all()
    zeros = exported(c, tmp_path, g1["generation"], "a", a.mapping("zeros").addr)
    assert not zeros.any()

    a.cmd("write", name="data", page=100, count=3, counter=5)
    b.cmd("write", name="data", page=0, count=1, counter=6)
    g2 = c.cli_json("checkpoint", "--job", JOB)
    assert g2["state"] == "committed" and not g2["full"], g2
    assert g2["pages_captured"] == 4  # the tracker's changed set, nothing more
    assert (
        exported(c, tmp_path, g2["generation"], "a", a.mapping("data").addr) == a.read("data")
    ).all()
    assert (
        exported(c, tmp_path, g2["generation"], "b", b.mapping("data").addr) == b.read("data")
    ).all()
    # The older generation still reads as it was.
    assert (exported(c, tmp_path, g1["generation"], "a", a.mapping("data").addr) == want_a).all()
    a.assert_running()
    b.assert_running()


@pytest.mark.parametrize("phase", ["agent.freeze", "agent.capture"])
def test_killed_agent_never_leaves_a_member_stopped(
    cluster_factory: Callable[..., Cluster], target_factory: Any, phase: str
) -> None:
    c = cluster_factory(nodes=("node-a",))
    t = target_factory(maps=["data:64"], writers=["data:2"])
    attach(c, JOB, "m0", t, "node-a")
    c.restart_agent("node-a", pause=[phase])
    c.wait_agents(["node-a"])
    if c.cli_json("jobs", "--job", JOB)["jobs"][0]["members"][0]["health"] != "running":
        wait_for(lambda: c.members_running(JOB), 20, "member re-attached")
    argv = [sys.executable, "-m", "cpcoord", "checkpoint", "--job", JOB, "--json",
            "--coordinator", c.address]  # fmt: skip
    ck = subprocess.Popen(argv, cwd=REPO, env=daemon_env(), stdout=subprocess.PIPE, text=True)
    try:
        c.wait_fault(phase)
        assert stopped(t), task_states(t.pid)  # paused with the member frozen
        t0 = time.monotonic()
        c.agents["node-a"].kill(signal.SIGKILL)
        wait_for(
            lambda: not any(s in "tT" for s in task_states(t.pid).values()),
            5,
            "the kernel releasing every thread",
        )
        assert time.monotonic() - t0 < 2.0
        t.assert_running()
        out, _ = ck.communicate(timeout=60)
        assert ck.returncode == 52, out  # GenerationAborted
    finally:
        if ck.poll() is None:
            ck.kill()
    gens = c.cli_json("generations", "--job", JOB)
    assert all(g["state"] != "committed" for g in gens["generations"]), gens


def test_reconnect_after_coordinator_restart(
    cluster_factory: Callable[..., Cluster], target_factory: Any, tmp_path: Path
) -> None:
    c = cluster_factory(nodes=("node-a",))
    t = target_factory(maps=["data:64"])
    attach(c, JOB, "m0", t, "node-a")
    g1 = c.cli_json("checkpoint", "--job", JOB)
    assert g1["state"] == "committed"
    assert c.coordinator is not None
    c.coordinator.kill(signal.SIGKILL)
    time.sleep(1.0)  # the agent is backing off meanwhile
    assert c.agents["node-a"].alive()
    c.start_coordinator()
    c.wait_agents(["node-a"], timeout=30)
    wait_for(lambda: c.members_running(JOB), 20, "members re-announced")
    # One agent process, two control streams; the second Hello carried the member.
    log = (c.root / "agent-node-a.log").read_text().splitlines()
    attached = [ln for ln in log if "msg=attached" in ln]
    assert len(attached) == 2, attached
    assert "members=0" in attached[0] and "members=1" in attached[1], attached
    t.cmd("write", name="data", page=7, count=1, counter=3)
    g2 = c.cli_json("checkpoint", "--job", JOB)
    assert g2["state"] == "committed" and g2["generation"] > g1["generation"], g2
    got = exported(c, tmp_path, g2["generation"], "m0", t.mapping("data").addr)
    assert (got == t.read("data")).all()


def test_member_death_is_reported_to_the_coordinator(
    cluster_factory: Callable[..., Cluster], target_factory: Any
) -> None:
    c = cluster_factory(nodes=("node-a",))
    t = target_factory()
    attach(c, JOB, "m0", t, "node-a")
    os.kill(t.pid, signal.SIGKILL)

    def gone() -> dict[str, Any] | None:
        m = c.cli_json("jobs", "--job", JOB)["jobs"][0]["members"][0]
        return m if m["health"] != "running" else None

    m = wait_for(gone, 10, "member reported gone")
    assert "killed by signal 9" in m["detail"] or "exited" in m["detail"], m
    r = c.cli("checkpoint", "--job", JOB, check=False)
    assert r.returncode != 0
