"""Dedup and zero pages through the whole pipeline, with real
daemons and real processes: two members on different nodes with identical memory store
it once through the coordinator (on the direct data path each node stores its own copy
the first time: tests/integration/test_dataplane.py); an all-zero GiB (every page
present, written with zeros) stores almost nothing; and `cpcoord checkpoint --json`
reports both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cpcoord.image import load_image, region_bytes
from testbed.cluster import Cluster
from testbed.driver import PAGE, Target
from tests.helpers.e2e import attach

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_identical_members_store_once_and_zero_gib_stores_nothing(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    coordinator_path = ("--data-path", "coordinator")
    c = cluster_factory(
        nodes=("node-a", "node-b"),
        agent_args={"node-a": coordinator_path, "node-b": coordinator_path},
    )
    pages = 2048  # 8 MiB of incompressible pages, the same in both
    ta = target_factory(maps=[f"data:{pages}:anon:random:7"])
    tb = target_factory(maps=[f"data:{pages}:anon:random:7"])
    attach(c, "twins", "a", ta, "node-a", "data")
    attach(c, "twins", "b", tb, "node-b", "data")
    r = c.cli_json("checkpoint", "--job", "twins")
    size = pages * PAGE
    assert r["state"] == "committed"
    assert r["bytes_logical"] == 2 * size and r["pages_captured"] == 2 * pages
    assert size <= r["bytes_stored_new"] < size * 1.02, r  # stored once, raw (random)
    assert r["bytes_stored"] == r["bytes_stored_new"]
    out = tmp_path / "twins"
    c.cli("export", "--job", "twins", "--out", str(out))
    im = load_image(out)
    for name, t in (("a", ta), ("b", tb)):
        (reg,) = im.member(name).regions
        assert np.array_equal(np.asarray(region_bytes(im, name, reg.name)), t.read("data"))

    gib = (1 << 30) // PAGE
    tz = target_factory(maps=[f"zero:{gib}:anon:zero"])
    attach(c, "zeros", "z", tz, "node-a", "zero")
    z = c.cli_json("checkpoint", "--job", "zeros")
    assert z["state"] == "committed"
    assert z["bytes_logical"] == 1 << 30 and z["pages_captured"] == gib
    assert z["zero_pages"] == gib
    assert z["bytes_stored_new"] < 64 << 10, z  # markers, not data
    stats = c.cli_json("generations", "--job", "zeros")["generations"][0]
    assert stats["bytes_stored"] < 64 << 10
    tz.assert_running()
