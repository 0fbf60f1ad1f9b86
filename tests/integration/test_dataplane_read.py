"""The direct read path of a restore with real daemons: an agent on the direct data path
asks the coordinator only where the chunks lie (ids and locations) and reads the packs
from the store itself; memory equals the generation byte for byte and the coordinator
sends no chunk byte (its cpcoord_data_path_read_bytes metric). A chunk damaged in the
store is found before the freeze: the restore fails, the process was never stopped and
its memory is untouched. An agent on `--data-path coordinator` restores through the
coordinator as before. On a directory store by default, on SeaweedFS S3 with
CPCOORD_TEST_STORE=s3.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from storecore.backend import Kind
from testbed.cluster import Cluster
from testbed.driver import Target
from testbed.scrape import free_port, read_bytes_by_path
from testbed.stores import store_backend
from tests.helpers.e2e import attach, export, exported

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PAGES = 2048  # 8 MiB


def _cluster(make: Callable[..., Cluster], **kw: object) -> tuple[Cluster, int]:
    port = free_port()
    return make(nodes=("node-a",), coordinator_args=("--metrics-port", str(port)), **kw), port


def _checkpoint_then_scribble(c: Cluster, t: Target) -> int:
    attach(c, "rd", "m", t, "node-a")
    r = c.cli_json("checkpoint", "--job", "rd")
    assert r["state"] == "committed", r
    # Every page changes: the restore must bring all of them back.
    t.cmd("write", name="data", page=0, count=PAGES, counter=5)
    return int(r["generation"])


def _equals_export(c: Cluster, t: Target, gen: int, out: Path) -> None:
    export(c, "rd", gen, out)
    want, _ = exported(out, "m")
    assert np.array_equal(t.read("data"), want), f"memory differs from generation {gen}"


def test_direct_restore_reads_the_store_itself_and_is_exact(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    c, port = _cluster(cluster_factory)
    t = target_factory(maps=[f"data:{PAGES}:anon:random:41"])
    gen = _checkpoint_then_scribble(c, t)
    before = read_bytes_by_path(port)
    r = c.cli_json("restore", "--job", "rd", "--generation", str(gen))
    assert r["state"] == "restored", r
    assert [m["read_path"] for m in r["members"]] == ["direct"], r
    t.assert_running()
    after = read_bytes_by_path(port)
    moved = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("direct", "coordinator")}
    # The agent read every chunk from the store (random pages: stored raw) ...
    assert moved["direct"] >= PAGES * 4096, moved
    # ... and the coordinator sent none of them.
    assert moved["coordinator"] == 0, moved
    log = c.agents["node-a"].tail(400)
    assert "direct read failed" not in log, log
    _equals_export(c, t, gen, tmp_path / "g")


def test_a_damaged_chunk_fails_the_restore_before_the_freeze(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target]
) -> None:
    c, _ = _cluster(cluster_factory)
    t = target_factory(maps=[f"data:{PAGES}:anon:random:42"])
    gen = _checkpoint_then_scribble(c, t)
    backend = store_backend(c.store, c.store_url, c.extra_env)
    try:
        (pack,) = [o.name for o in backend.list(Kind.PACKS) if o.name.startswith("nodes/")]
        data = bytearray(backend.get(Kind.PACKS, pack))
        data[len(data) // 2] ^= 0x40  # one byte in the middle of the blobs (random: raw)
        backend.put(Kind.PACKS, pack, bytes(data))
    finally:
        backend.close()
    before = t.read("data")
    r = c.cli("restore", "--job", "rd", "--generation", str(gen), check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "restore_failed" in out and "does not match" in out, out
    t.assert_running()
    assert np.array_equal(t.read("data"), before), "a failed restore wrote into the process"
    log = c.agents["node-a"].tail(400)
    # Found by the agent's own read, then by the coordinator's: both before any freeze.
    assert "direct read failed" in log and "restore prefetch failed" in log, log
    assert log.count("msg=frozen") == 1, log  # the checkpoint's freeze, never the restore's


def test_a_failed_direct_read_restores_through_the_coordinator(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    c, port = _cluster(cluster_factory)
    c.restart_agent("node-a", fail=["agent.restore.direct_read"])
    c.wait_agents(["node-a"])
    t = target_factory(maps=[f"data:{PAGES}:anon:random:44"])
    gen = _checkpoint_then_scribble(c, t)
    r = c.cli_json("restore", "--job", "rd", "--generation", str(gen))
    assert r["state"] == "restored", r
    assert [m["read_path"] for m in r["members"]] == ["coordinator"], r
    log = c.agents["node-a"].tail(400)
    assert "direct read failed: reading through the coordinator" in log, log
    assert "fault point agent.restore.direct_read" in log, log
    moved = read_bytes_by_path(port)
    assert moved.get("coordinator", 0) >= PAGES * 4096, moved
    _equals_export(c, t, gen, tmp_path / "g")


def test_coordinator_data_path_agent_restores_through_the_coordinator(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    c, port = _cluster(cluster_factory, agent_args={"node-a": ("--data-path", "coordinator")})
    t = target_factory(maps=[f"data:{PAGES}:anon:random:43"])
    gen = _checkpoint_then_scribble(c, t)
    r = c.cli_json("restore", "--job", "rd", "--generation", str(gen))
    assert r["state"] == "restored", r
    assert [m["read_path"] for m in r["members"]] == ["coordinator"], r
    moved = read_bytes_by_path(port)
    assert moved.get("coordinator", 0) >= PAGES * 4096 and not moved.get("direct"), moved
    _equals_export(c, t, gen, tmp_path / "g")
