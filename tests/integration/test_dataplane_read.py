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

import json
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


def _checkpoint(c: Cluster, t: Target) -> int:
    """Attach `t` as member m of job rd on node-a and checkpoint it; the generation."""
    attach(c, "rd", "m", t, "node-a")
    r = c.cli_json("checkpoint", "--job", "rd")
    assert r["state"] == "committed", r
    return int(r["generation"])


def _checkpoint_then_scribble(c: Cluster, t: Target) -> int:
    gen = _checkpoint(c, t)
    # Every page changes: the restore must bring all of them back.
    t.cmd("write", name="data", page=0, count=PAGES, counter=5)
    return gen


def _moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Read bytes per path between two scrapes."""
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("direct", "coordinator")}


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
    moved = _moved(before, after)
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
        # A later checkpoint rewrites the agent's staging, which held the generation's
        # chunks (docs/restore.md): the restore must read them from the store.
        assert c.cli_json("checkpoint", "--job", "rd")["state"] == "committed"
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
    assert log.count("msg=frozen") == 2, log  # the checkpoints' freezes, never the restore's


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


# -- export ---------------------------------------------------------------------------------


def _export_json(c: Cluster, gen: int, out: Path, *extra: str) -> dict[str, object]:
    r = c.cli_json("export", "--job", "rd", "--generation", str(gen), "--out", str(out), *extra)
    assert isinstance(r, dict), r
    return r


def test_export_reads_the_store_itself_and_is_exact(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    c, port = _cluster(cluster_factory)
    t = target_factory(maps=[f"data:{PAGES}:anon:random:45"])
    gen = _checkpoint(c, t)
    want = t.read("data")
    before = read_bytes_by_path(port)
    r = _export_json(c, gen, tmp_path / "d", "--data-path", "direct")
    assert r["read_path"] == {"direct": 1, "coordinator": 0}, r
    assert int(r["bytes_read_direct"]) >= PAGES * 4096, r  # type: ignore[call-overload]
    after = read_bytes_by_path(port)
    moved = _moved(before, after)
    # The coordinator only located the chunks; it sent none of them.
    assert moved["direct"] >= PAGES * 4096 and moved["coordinator"] == 0, moved
    got, _ = exported(tmp_path / "d", "m")
    assert np.array_equal(got, want)
    # The same bytes through the coordinator (and now it is the one that sent them).
    r = _export_json(c, gen, tmp_path / "c", "--data-path", "coordinator")
    assert r["read_path"] == {"direct": 0, "coordinator": 1}, r
    got, _ = exported(tmp_path / "c", "m")
    assert np.array_equal(got, want)
    assert read_bytes_by_path(port).get("coordinator", 0) - after.get("coordinator", 0) >= (
        PAGES * 4096
    )


def test_export_falls_back_to_the_coordinator_when_its_own_read_fails(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    c, _ = _cluster(cluster_factory)
    t = target_factory(maps=[f"data:{PAGES}:anon:random:46"])
    gen = _checkpoint(c, t)
    want = t.read("data")
    c.extra_env["CPCOORD_FAULT_FAIL"] = "agent.restore.direct_read"
    try:
        args = ("export", "--job", "rd", "--generation", str(gen), "--json")
        r = c.cli(*args, "--out", str(tmp_path / "a"))
        assert json.loads(r.stdout)["read_path"] == {"direct": 0, "coordinator": 1}, r.stdout
        assert "member m: direct read failed, reading through the coordinator" in r.stderr
        got, _ = exported(tmp_path / "a", "m")
        assert np.array_equal(got, want)
        # --data-path direct fails instead, with the reason, and leaves no image behind.
        r = c.cli(*args, "--out", str(tmp_path / "b"), "--data-path", "direct", check=False)
        assert r.returncode != 0 and "fault point agent.restore.direct_read" in r.stderr, r
        assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
    finally:
        del c.extra_env["CPCOORD_FAULT_FAIL"]


def test_export_reads_through_a_coordinator_that_offers_no_direct_path(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    c = cluster_factory(nodes=("node-a",), coordinator_args=("--no-direct-data-path",))
    t = target_factory(maps=[f"data:{PAGES}:anon:random:47"])
    gen = _checkpoint(c, t)
    args = ("export", "--job", "rd", "--generation", str(gen), "--json")
    r = c.cli(*args, "--out", str(tmp_path / "a"))
    out = json.loads(r.stdout)
    assert out["read_path"] == {"direct": 0, "coordinator": 1}, r.stdout
    # Why, in the JSON (and at --log-level info); not a warning: a normal case.
    assert "the direct data path cannot be used" in out["direct_unavailable"], out
    assert r.stderr == "", r.stderr
    got, _ = exported(tmp_path / "a", "m")
    assert np.array_equal(got, t.read("data"))
    r = c.cli(*args, "--out", str(tmp_path / "b"), "--data-path", "direct", check=False)
    assert r.returncode == 150 and "offers no direct data path" in r.stderr, r
    assert not (tmp_path / "b").exists()  # refused before the image directory was made
