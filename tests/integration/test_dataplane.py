"""The direct data path with real daemons: agents put their own packs under their node's
prefix, the coordinator only takes ids, page tables and pack reports, and every export
is exact. On a directory store by default, on SeaweedFS S3 with CPCOORD_TEST_STORE=s3
(scripts/test.sh runs both). Also: `--data-path coordinator` still commits through the
coordinator, an agent killed in the middle of a pack put leaves no partial pack visible
and the next generation is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from storecore.backend import Kind, LocalBackend
from testbed.cluster import Cluster
from testbed.driver import Target
from testbed.seaweed import Seaweed
from tests.helpers.e2e import attach, export, exported

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _pack_names(c: Cluster) -> list[str]:
    return [n for n, _ in c.store_objects() if n.startswith("packs/")]


def _check_exports(
    c: Cluster, tmp: Path, n: int, expected: dict[str, np.ndarray], job: str = "dp"
) -> None:
    out = tmp / f"export-{n}"
    export(c, job, n, out)
    for name, want in expected.items():
        got, offsets = exported(out, name)
        assert np.array_equal(got[offsets], want[offsets]), f"generation {n}, member {name}"


def test_direct_path_puts_packs_under_each_node_and_exports_exactly(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    c = cluster_factory(nodes=("node-a", "node-b"))
    targets = {
        "a": (target_factory(maps=["data:256:anon:random:7"]), "node-a"),
        "b": (target_factory(maps=["data:192:anon:random:8"]), "node-b"),
    }
    for name, (t, node) in targets.items():
        attach(c, "dp", name, t, node)
    r1 = c.cli_json("checkpoint", "--job", "dp")
    assert r1["state"] == "committed", r1
    assert r1["data_paths"] == {"a": "direct", "b": "direct"}, r1
    exp1 = {name: t.read("data") for name, (t, _) in targets.items()}
    names = _pack_names(c)
    assert any("nodes/node-a/" in n for n in names), names
    assert any("nodes/node-b/" in n for n in names), names
    # Incremental: a few pages change on each node.
    targets["a"][0].cmd("write", name="data", page=3, count=5, counter=21)
    targets["b"][0].cmd("write", name="data", page=100, count=2, counter=22)
    r2 = c.cli_json("checkpoint", "--job", "dp")
    assert r2["state"] == "committed" and r2["parent"] == 1, r2
    exp2 = {name: t.read("data") for name, (t, _) in targets.items()}
    _check_exports(c, tmp_path, 1, exp1)
    _check_exports(c, tmp_path, 2, exp2)
    v = c.cli_json("verify")
    assert v["ok"], v
    metrics = c.cli("checkpoint", "--job", "dp", "--json").stdout
    assert '"direct"' in metrics


def test_coordinator_path_still_commits_exactly(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    c = cluster_factory(nodes=("node-a",), agent_args={"node-a": ("--data-path", "coordinator")})
    t = target_factory(maps=["data:128:anon:random:9"])
    attach(c, "dp", "a", t, "node-a")
    r = c.cli_json("checkpoint", "--job", "dp")
    assert r["state"] == "committed" and r["data_paths"] == {"a": "coordinator"}, r
    want = t.read("data")
    assert not [n for n in _pack_names(c) if "nodes/" in n]
    _check_exports(c, tmp_path, 1, {"a": want})


def test_agent_killed_mid_put_leaves_no_partial_pack_and_the_next_generation_is_exact(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    c = cluster_factory(nodes=("node-a",))
    if c.on_s3:
        pytest.skip("on S3 (multipart puts): tests/integration/test_dataplane_s3.py")
    t = target_factory(maps=["data:512:anon:random:10"])
    c.agents["node-a"].kill()
    c.start_agent("node-a", pause=["store.put"])
    c.wait_agents(["node-a"])
    attach(c, "dp", "a", t, "node-a")
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(c.cli, "checkpoint", "--job", "dp", "--json", check=False)
        c.wait_fault("store.put")
        c.agents["node-a"].kill()
        r = call.result(timeout=120)
    assert r.returncode != 0 and '"committed"' not in r.stdout, r.stdout
    # The temp file of the killed put is there, but no listing shows it as a pack.
    nodes = c.store / "packs" / "nodes" / "node-a"
    assert list(nodes.glob(".tmp-*")), "the put was killed after writing its temp file"
    assert not [o.name for o in LocalBackend(c.store).list(Kind.PACKS) if ".tmp" in o.name]
    c.start_agent("node-a")
    c.wait_agents(["node-a"])
    r2 = c.cli_json("checkpoint", "--job", "dp")
    assert r2["state"] == "committed" and r2["data_paths"] == {"a": "direct"}, r2
    want = t.read("data")
    _check_exports(c, tmp_path, r2["generation"], {"a": want})


def test_auto_falls_back_to_the_coordinator_when_the_store_is_unreachable(
    cluster_factory: Callable[..., Cluster],
    target_factory: Callable[..., Target],
    tmp_path: Path,
    seaweed: Seaweed,
) -> None:
    """node-b's S3 endpoint leads nowhere: in auto mode it says why and uploads through
    the coordinator; node-a puts its own packs; the generation commits and exports
    exactly. With --data-path direct the same agent refuses to run."""
    env = {**seaweed.env(), "CPCOORD_STATE_DIR": str(tmp_path / "state")}
    nowhere = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}
    c = cluster_factory(
        nodes=("node-a", "node-b"),
        store_url=seaweed.url(),
        extra_env=env,
        agent_env={"node-b": nowhere},
    )
    targets = {
        "a": (target_factory(maps=["data:128:anon:random:11"]), "node-a"),
        "b": (target_factory(maps=["data:128:anon:random:12"]), "node-b"),
    }
    for name, (t, node) in targets.items():
        attach(c, "dp", name, t, node)
    r = c.cli_json("checkpoint", "--job", "dp")
    assert r["state"] == "committed", r
    assert r["data_paths"] == {"a": "direct", "b": "coordinator"}, r
    assert "direct data path unavailable" in c.agents["node-b"].tail(400)
    _check_exports(c, tmp_path, 1, {n: t.read("data") for n, (t, _) in targets.items()})
    c.agents["node-b"].kill()
    d = c.start_agent("node-b", args=("--data-path", "direct"))
    assert d.proc is not None
    assert d.proc.wait(timeout=60) == 150, d.tail()  # DataPathUnavailable
    assert "direct data path cannot be used on node node-b" in d.tail()


def test_identical_members_store_once_per_node_and_dedup_across_nodes_once_verified(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    """Two members with the same pages on one node: one copy (the node's uploads share
    their packs). A third on another node, attached later: it stores nothing new, since
    the coordinator reads node-a's chunks back and verifies them when node-b wants them."""
    c = cluster_factory(nodes=("node-a", "node-b"))
    pages = 1024
    size = pages * 4096
    t1 = target_factory(maps=[f"data:{pages}:anon:random:31"])
    t2 = target_factory(maps=[f"data:{pages}:anon:random:31"])
    attach(c, "dp", "a1", t1, "node-a")
    attach(c, "dp", "a2", t2, "node-a")
    r = c.cli_json("checkpoint", "--job", "dp")
    assert r["state"] == "committed" and r["data_paths"] == {"a1": "direct", "a2": "direct"}
    assert size <= r["bytes_stored_new"] < size * 1.02, r  # once, raw (random)
    t3 = target_factory(maps=[f"data:{pages}:anon:random:31"])
    attach(c, "dp", "b", t3, "node-b")
    r2 = c.cli_json("checkpoint", "--job", "dp")
    assert r2["state"] == "committed" and r2["data_paths"]["b"] == "direct", r2
    assert r2["bytes_stored_new"] < size // 100, r2  # node-a's verified chunks serve b
    want = {n: t.read("data") for n, t in (("a1", t1), ("a2", t2), ("b", t3))}
    _check_exports(c, tmp_path, r2["generation"], want)
