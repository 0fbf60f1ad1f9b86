"""A real coordinator and one real agent that serves the local API on a socket in a tmp
dir (`cpcoord agent --socket`), for tests of the process-side library and `cpcoord run`.

The socket lives under /tmp in a 0755 directory (pytest's tmp_path is 0700), so a second
user created by a test can reach it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed.cluster import Cluster
from testbed.daemons import REPO, public_tmpdir, wait_for

NODE = "n1"


@dataclass
class SocketCluster:
    cluster: Cluster
    socket: Path

    def env(self, job: str = "", member: str = "") -> dict[str, str]:
        """The environment of a process that talks to this agent (as job/member)."""
        env = dict(os.environ, PYTHONPATH=str(REPO), CPCOORD_AGENT_SOCKET=str(self.socket))
        env.pop("CPCOORD_COORDINATOR", None)
        if job:
            env["CPCOORD_JOB"] = job
        if member:
            env["CPCOORD_MEMBER"] = member
        return env

    def generations(self, job: str) -> list[int]:
        """Committed generations of a job, oldest first ([] for an unknown job)."""
        r = self.cluster.cli("generations", "--job", job, "--json", check=False)
        if r.returncode != 0:
            return []
        data = json.loads(r.stdout)
        rows = data["generations"] if isinstance(data, dict) else data
        return sorted(g["generation"] for g in rows if g["state"] == "committed")

    def members(self, job: str) -> dict[str, dict[str, Any]]:
        jobs = self.cluster.cli_json("jobs", "--job", job, check=False) or {"jobs": []}
        return {m["name"]: m for j in jobs["jobs"] for m in j["members"]}


def start_socket_agent(c: Cluster, sock: Path, node: str = NODE) -> None:
    """Start the agent of `node` on a started cluster, serving the local API on `sock`;
    return once it is connected and the socket is there."""
    c.start_agent(node, args=["--socket", str(sock)])
    c.wait_agents([node], timeout=60)
    wait_for(sock.exists, 30, "the agent's socket")


@pytest.fixture
def socket_cluster(tmp_path: Path) -> Iterator[SocketCluster]:
    sockdir = public_tmpdir("cpcoord-sock-")
    sock = sockdir / "agent.sock"
    c = Cluster(tmp_path / "cluster", nodes=())
    c.root.mkdir(parents=True, exist_ok=True)
    try:
        c.start()
        start_socket_agent(c, sock)
        yield SocketCluster(c, sock)
    finally:
        c.close()
        shutil.rmtree(sockdir, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)
