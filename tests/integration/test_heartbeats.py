"""Liveness is what arrives: an agent whose reports wait behind the
coordinator's engine (a slow catalog write, a long commit) is still heard, and is never
declared lost while its heartbeats keep coming.

Real daemons on loopback: the coordinator is paused (cpcoord/faults.py) in the middle of
handling one of the agent's reports, for good; the agent's stream must still be read,
its heartbeats seen, and no silence declared for several times the silence limit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from testbed.cluster import Cluster
from testbed.daemons import wait_for

pytestmark = pytest.mark.integration

HEARTBEAT_MS = 300  # lost after 3 silent intervals: 0.9 s


def test_an_agent_whose_reports_wait_is_not_declared_lost(
    cluster_factory: Callable[..., Cluster],
) -> None:
    c = cluster_factory(nodes=("node-a",), heartbeat_ms=HEARTBEAT_MS)
    assert c.coordinator is not None
    c.coordinator.kill()
    c.start_coordinator(pause=["coordinator.agent_message"])
    c.wait_agents(["node-a"])
    agent = c.agents["node-a"]
    seen_daemons = (c.coordinator, agent)
    sleeper = subprocess.Popen(["sleep", "120"])
    # The agent's answer to this attach is the report the coordinator will sit on.
    argv = ["attach", "--job", "j", "--member", "m", "--pid", str(sleeper.pid)]
    attach = subprocess.Popen(
        [sys.executable, "-m", "cpcoord", *argv, "--node", "node-a", "--coordinator", c.address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        c.wait_fault("coordinator.agent_message")
        seen = {d.name: len(d.log.read_text().splitlines()) for d in (c.coordinator, agent)}
        time.sleep(8 * HEARTBEAT_MS / 1000)  # almost three times the silence limit
        news = {d.name: d.log.read_text().splitlines()[seen[d.name] :] for d in seen_daemons}
        assert not [x for x in news[c.coordinator.name] if "agent disconnected" in x], c.logs()
        assert not [x for x in news[agent.name] if "control stream broke" in x], c.logs()
        assert c.agents_json().get("node-a") is True
    finally:
        attach.kill()
        attach.wait()
        sleeper.kill()
        sleeper.wait()


def test_a_silent_agent_is_still_lost(cluster_factory: Callable[..., Cluster]) -> None:
    """The other side: an agent that stops talking (SIGSTOP) is declared lost."""
    c = cluster_factory(nodes=("node-a",), heartbeat_ms=HEARTBEAT_MS)
    agent = c.agents["node-a"]
    os.kill(agent.pid, signal.SIGSTOP)  # the stream stays open, nothing arrives
    try:
        assert c.coordinator is not None
        coordinator = c.coordinator
        wait_for(lambda: "silent for" in coordinator.tail(200), 10, "the agent declared lost")
    finally:
        os.kill(agent.pid, signal.SIGCONT)
