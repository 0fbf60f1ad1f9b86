"""The coordinator with its store on a real SeaweedFS S3 server (`--store s3://...`):
full and incremental generations export byte for byte, verify passes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cpcoord.image import load_image, region_bytes
from testbed.cluster import Cluster
from testbed.driver import Target
from tests.helpers.e2e import attach

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_checkpoints_on_s3_export_exactly(
    cluster_factory: Callable[..., Cluster],
    target_factory: Callable[..., Target],
    seaweed: object,
    tmp_path: Path,
) -> None:
    env = {**seaweed.env(), "CPCOORD_STATE_DIR": str(tmp_path / "state")}  # type: ignore[attr-defined]
    c = cluster_factory(nodes=("node-a",), store_url=seaweed.url(), extra_env=env)  # type: ignore[attr-defined]
    t = target_factory(maps=["data:256:anon:random:5"])
    attach(c, "s3job", "m", t, "node-a", "data")
    want = []
    for step in range(2):
        if step:
            t.cmd("write", name="data", page=10, count=20, counter=3)
        r = c.cli_json("checkpoint", "--job", "s3job")
        assert r["state"] == "committed", r
        want.append((int(r["generation"]), t.read("data")))
    for gen, mem in want:
        out = tmp_path / f"g{gen}"
        c.cli("export", "--job", "s3job", "--generation", str(gen), "--out", str(out))
        im = load_image(out)
        (reg,) = im.member("m").regions
        assert np.array_equal(np.asarray(region_bytes(im, "m", reg.name)), mem)
    assert not c.store.exists()  # nothing went to a local directory store
    c.cli("verify")
