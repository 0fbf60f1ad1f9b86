"""The direct data path's fault on SeaweedFS S3, whatever CPCOORD_TEST_STORE says: an
agent killed in the middle of a multipart pack put (its parts stored, CompleteMultipart-
Upload not sent: the `store.put` fault point of storecore/s3.py) leaves no pack visible
under its node's prefix, the generation aborts, and after a restart the next generation
commits on the direct path and exports exactly. (The same fault on a directory store:
tests/integration/test_dataplane.py.)
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from storecore.location import StoreLocation
from testbed.cluster import Cluster
from testbed.driver import Target
from testbed.seaweed import Seaweed
from tests.helpers.e2e import attach, export, exported

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# 3072 pages of random bytes: one 12 MiB pack (packs seal at 16 MiB), above the 8 MiB
# multipart threshold, so the put goes up in parts and can be caught between them.
PAGES = 3072


def _node_keys(sw: Seaweed, url: str, node: str) -> tuple[list[str], list[str]]:
    """(listed object keys, keys of unfinished multipart uploads) under the node's pack
    prefix, straight from the bucket."""
    loc = StoreLocation.parse(url)
    prefix = f"{loc.prefix}/packs/nodes/{node}/"
    s3 = sw.client()
    listed = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    uploads = s3.list_multipart_uploads(Bucket=loc.bucket, Prefix=prefix).get("Uploads", [])
    return listed, [u["Key"] for u in uploads]


def test_agent_killed_mid_multipart_put_leaves_no_pack_and_the_next_generation_is_exact(
    cluster_factory: Callable[..., Cluster],
    target_factory: Callable[..., Target],
    seaweed: Seaweed,
    tmp_path: Path,
) -> None:
    url = seaweed.url()
    env = {**seaweed.env(), "CPCOORD_STATE_DIR": str(tmp_path / "state")}
    c = cluster_factory(nodes=("node-a",), store_url=url, extra_env=env)
    t = target_factory(maps=[f"data:{PAGES}:anon:random:41"])
    c.agents["node-a"].kill()
    c.start_agent("node-a", pause=["store.put"])
    c.wait_agents(["node-a"])
    attach(c, "dp", "a", t, "node-a")
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(c.cli, "checkpoint", "--job", "dp", "--json", check=False)
        c.wait_fault("store.put", timeout=60)
        listed, unfinished = _node_keys(seaweed, url, "node-a")
        c.agents["node-a"].kill()
        r = call.result(timeout=120)
    # The kill landed mid-put: the pack's parts are in the bucket as an unfinished upload,
    # and no listing shows it (nor any other pack of the node: this was its only one).
    assert len(unfinished) == 1, unfinished
    assert listed == [], listed
    assert _node_keys(seaweed, url, "node-a")[0] == []
    assert r.returncode != 0 and '"committed"' not in r.stdout, (r.returncode, r.stdout)
    gens = c.cli_json("generations", "--job", "dp", "--all")["generations"]
    assert [g["state"] for g in gens if g["generation"] == 1] in ([], ["aborted"]), gens
    assert c.cli_json("generations", "--job", "dp")["generations"] == []

    c.start_agent("node-a")
    c.wait_agents(["node-a"])
    r2 = c.cli_json("checkpoint", "--job", "dp")
    assert r2["state"] == "committed" and r2["data_paths"] == {"a": "direct"}, r2
    want = t.read("data")
    out = tmp_path / "export"
    export(c, "dp", r2["generation"], out)
    got, offsets = exported(out, "a")
    assert len(offsets) == PAGES, len(offsets)  # every page, random bytes
    assert np.array_equal(got[offsets], want[offsets])
    # The pack is named by its content: the restarted agent put the same key again, whole;
    # the killed upload stays unfinished, invisible, until gc discards it (after
    # NODE_TEMP_GRACE: the coordinator cannot tell it from a put in flight).
    assert _node_keys(seaweed, url, "node-a") == (unfinished, unfinished)
