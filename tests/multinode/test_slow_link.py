"""A healthy agent busy sending pages over a slow link is not lost.

node-1's uplink is shaped to 0.25 MB/s (tc tbf, tests/helpers/netns.py `throttle`; the
problem was found with two agents behind a 1 MB/s coordinator link, which this base
cannot shape). Its agent takes the coordinator data path, so its members' pages go up
the same link as its heartbeats. A full checkpoint of 2 x 2 MiB of incompressible pages
takes ~17 s on the wire, several times the 3 silent intervals (3 s) after which the
coordinator declares an agent lost, with the DEFAULT heartbeat (1 s). It must commit,
exactly. Before the fix it aborted `agent_lost` ("silent for 3.1 s") after ~4 s, every
run: the heartbeats shared one TCP connection with the uploads and queued behind the
megabytes of page data already handed to gRPC and the kernel. (At 0.5 MB/s they
arrived 2-3.5 s apart and up to 10 s late, and 1 run in 3 aborted.)

That a dead link is still declared lost in bounded time is test_multinode.py's job
(link down mid-upload, 100% packet loss).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cpcoord.image import load_image, region_bytes
from tests.helpers.netns import NetnsCluster, netns_cluster  # noqa: F401 - the fixture

pytestmark = [pytest.mark.multinode, pytest.mark.integration, pytest.mark.slow]
JOB = "slow"
PAGES = 512  # 2 MiB per member
RATE = "2mbit"  # 0.25 MB/s


def test_upload_over_slow_link_keeps_agent_alive(
    netns_cluster: Callable[..., NetnsCluster],  # noqa: F811
    tmp_path: Path,
) -> None:
    c = netns_cluster(nodes=("node-1",))  # heartbeat_ms: the default, 1000
    assert c.heartbeat_ms == 1000
    members = {f"m{i}": c.target("node-1", [f"data:{PAGES}:anon:random:{i + 3}"]) for i in range(2)}
    for name, t in members.items():
        c.attach(JOB, name, t, "node-1")
    want = {name: t.read("data") for name, t in members.items()}
    c.throttle("node-1", RATE)
    try:
        t0 = time.monotonic()
        r = c.cli_json("checkpoint", "--job", JOB, "--full", check=False)
        took = time.monotonic() - t0
        sent, overlimits = c.shaped("node-1")
    finally:
        c.unthrottle("node-1")
    print(f"2 x {PAGES * 4 // 1024} MiB over {RATE}: {took:.1f}s, {r}")
    # The shaper carried the pages and made them wait: the upload took many intervals.
    assert sent > 2 * PAGES * 4096 and overlimits > 0, (sent, overlimits)
    assert r is not None and r.get("state") == "committed", r
    assert took > 6 * c.heartbeat_ms / 1000, f"{took:.1f}s: the link was not slow enough"
    out = tmp_path / "export"
    c.cli("export", "--job", JOB, "--generation", str(r["generation"]), "--out", str(out))
    im = load_image(out)
    for name, data in want.items():
        (reg,) = im.member(name).regions
        got = np.asarray(region_bytes(im, name, reg.name))
        assert np.array_equal(got, data), f"member {name} differs"
    for t in members.values():
        t.assert_running()
