"""Partner copies across network namespaces (issue 17, must-show 2): three nodes, each in
a namespace of its own, with node caches and partner listeners on their own addresses,
the store a SeaweedFS S3 server on a link of its own; the drain is held (1 byte/s), so
after `checkpoint --wait partner` generation 1 lives only in the node caches and their
partner copies. node-2's agent is killed and its cache deleted; its member is restored
into a new process on node-3 (node-2's partner, which holds its packs) byte for byte, and
the next checkpoints go on with node-2 gone.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from testbed.driver import Target
from tests.helpers.e2e import export, exported
from tests.helpers.netns import SUBNET, NetnsCluster, netns_cluster  # noqa: F401 - fixture
from tests.helpers.netns_s3 import NsSeaweed, netns_s3_cluster  # noqa: F401 - the fixture

pytestmark = [pytest.mark.multinode, pytest.mark.integration, pytest.mark.slow]

JOB = "pn"
NODES = ("node-1", "node-2", "node-3")
Factory = Callable[..., tuple[NetnsCluster, NsSeaweed]]


def _level(c: NetnsCluster, n: int) -> dict:
    gens = c.cli_json("generations", "--job", JOB)["generations"]
    (g,) = [g for g in gens if g["generation"] == n]
    return g


def test_a_lost_node_is_restored_on_another_from_its_partner_copy(
    netns_s3_cluster: Factory,  # noqa: F811
    tmp_path: Path,
) -> None:
    caches = {n: tmp_path / f"cache-{n}" for n in NODES}
    args = {
        n: ("--cache", str(caches[n]), "--drain-rate", "1",
            "--partner-listen", f"{SUBNET}.{11 + i}:0")
        for i, n in enumerate(NODES)
    }  # fmt: skip
    c, _sw = netns_s3_cluster(nodes=NODES, data_path="direct", agent_args=args)
    members: dict[str, Target] = {}
    for i, node in enumerate(NODES, start=1):
        t = c.target(node, [f"data:256:anon:random:{70 + i}"])
        c.attach(JOB, f"m{i}", t, node)
        members[f"m{i}"] = t
    r = c.cli_json("checkpoint", "--job", JOB, "--wait", "partner")
    assert r["state"] == "committed" and r["level"] == "partner", r
    want = {n: t.read("data") for n, t in members.items()}
    assert [p for p in (caches["node-3"] / "partner" / "node-2").rglob("*") if p.is_file()]
    c.agents["node-2"].kill()
    shutil.rmtree(caches["node-2"])
    end = time.monotonic() + 30
    while c.agents_json().get("node-2", True):
        assert time.monotonic() < end, "node-2 still connected"
        time.sleep(0.2)
    assert _level(c, 1)["level"] == "partner"
    m = members["m2"].mapping("data")
    region = f"range-{m.addr:x}-{m.end:x}"
    tn = c.target("node-3", ["other:8", "data:256"])
    n = tn.mapping("data")
    c.cli(
        "restore", "--job", JOB, "--generation", "1", "--member", "m2", "--into", str(tn.pid),
        "--node", "node-3", "--region", f"{region}={n.addr:#x}-{n.end:#x}",
    )  # fmt: skip
    assert np.array_equal(tn.read("data"), want["m2"]), "not the partner copy's bytes"
    assert np.array_equal(tn.read("other"), tn.expected("other", 0, 8)), "a neighbour changed"
    tn.assert_running()
    # The next checkpoints go on without node-2: m2 is the new process on node-3.
    c.cli("detach", "--job", JOB, "--member", "m2")
    c.attach(JOB, "m2", tn, "node-3")
    members["m2"] = tn
    for k in range(2):
        tn.cmd("write", name="data", page=k, count=8, counter=80 + k)
        r2 = c.cli_json("checkpoint", "--job", JOB, "--wait", "partner")
        assert r2["state"] == "committed" and r2["level"] == "partner", r2
    out = tmp_path / "export-last"
    export(c, JOB, r2["generation"], out)
    for name, t in members.items():
        got, offsets = exported(out, name)
        data = t.read("data")
        assert np.array_equal(got[offsets], data[offsets]), name
    for t in members.values():
        t.assert_running()
