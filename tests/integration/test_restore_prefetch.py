"""Restore in place with the prefetch and partial writes, end to end: a real coordinator
and agent, real target processes with explicit regions.

A rollback downloads before the freeze only the pages it will write (those that differ
between the generation and the member's tracker base, and those written since), writes
only those, and leaves the tracker armed: memory equals the generation byte for byte
(compared with `cpcoord export`), the next checkpoint is incremental and exact, a
rollback to a generation older than the base is exact, and a member whose tracker
cannot tell (hash) still restores exactly, writing every page.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cpcoord import faults
from nodeagent.daemon.restore_live import LIVE_MIN_PAGES
from testbed.cluster import Cluster, attach_args
from testbed.driver import Target
from tests.helpers.e2e import export, exported

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PAGES = 256


def _attach(c: Cluster, t: Target, tracker: str = "") -> None:
    m = t.mapping("data")
    args = attach_args("job", "m", t.pid, "node-a", [(m.addr, m.end)])
    c.cli(*args, *(["--tracker", tracker] if tracker else []))


def _restore(c: Cluster, gen: int) -> dict[str, Any]:
    r = c.cli_json("restore", "--job", "job", "--generation", str(gen))
    assert r["state"] == "restored", r
    (m,) = r["members"]
    return dict(m)


def _equals_export(c: Cluster, t: Target, gen: int, out: Path) -> None:
    export(c, "job", gen, out)
    data, _ = exported(out, "m")
    got = t.read("data")
    assert np.array_equal(got, data), f"memory differs from generation {gen}"


def _checkpoint(c: Cluster) -> dict[str, Any]:
    r = c.cli_json("checkpoint", "--job", "job")
    assert r["state"] == "committed", r
    return dict(r)


def test_rollback_after_small_changes_writes_few_pages_and_stays_incremental(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    c = cluster_factory(nodes=("node-a",))
    t = target_factory(maps=[f"data:{PAGES}"])
    _attach(c, t)
    _checkpoint(c)
    t.cmd("write", name="data", page=0, count=PAGES, counter=3)
    g2 = _checkpoint(c)["generation"]
    t.cmd("write", name="data", page=17, count=3, counter=9)
    t.cmd("zero", name="data", page=100, count=1)
    m = _restore(c, g2)
    _equals_export(c, t, g2, tmp_path / "g2")
    t.assert_running()
    # Only what was written since the base (generation 2) comes back.
    assert 4 <= m["pages_written"] < 32, m
    assert m["bytes_prefetched"] < 32 * 4096, m
    assert m["frozen_seconds"] > 0, m
    # The next checkpoint is incremental relative to the same base, and exact.
    t.cmd("write", name="data", page=200, count=2, counter=11)
    g3 = _checkpoint(c)
    assert not g3["full"] and g3["pages_captured"] < 32, g3
    _equals_export(c, t, g3["generation"], tmp_path / "g3")


def test_rollback_to_an_older_generation_than_the_base_is_exact(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    c = cluster_factory(nodes=("node-a",))
    t = target_factory(maps=[f"data:{PAGES}"])
    _attach(c, t)
    t.cmd("write", name="data", page=0, count=PAGES, counter=1)
    g1 = _checkpoint(c)["generation"]
    t.cmd("write", name="data", page=0, count=40, counter=2)
    t.cmd("dontneed", name="data", page=240, count=8)  # absent at the base
    _checkpoint(c)
    t.cmd("write", name="data", page=30, count=20, counter=3)
    g3 = _checkpoint(c)["generation"]  # the base: newest committed
    t.cmd("write", name="data", page=5, count=2, counter=4)
    m = _restore(c, g1)
    _equals_export(c, t, g1, tmp_path / "g1")
    # differs(1, 3) = pages 0..49 and 240..247; written since: 5, 6
    assert 50 <= m["pages_written"] < 80, m
    g4 = _checkpoint(c)
    assert not g4["full"], g4
    _equals_export(c, t, g4["generation"], tmp_path / "g4")
    _restore(c, g3)
    _equals_export(c, t, g3, tmp_path / "g3")
    t.assert_running()


def test_hash_tracker_member_restores_exactly_writing_every_page(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    c = cluster_factory(nodes=("node-a",))
    t = target_factory(maps=["data:64"])
    _attach(c, t, tracker="hash")
    t.cmd("write", name="data", page=0, count=64, counter=5)
    g1 = _checkpoint(c)["generation"]
    _checkpoint(c)
    t.cmd("write", name="data", page=3, count=2, counter=6)
    m = _restore(c, g1)
    _equals_export(c, t, g1, tmp_path / "g1")
    assert m["pages_written"] == 64 and m["bytes_prefetched"] == 64 * 4096, m
    g3 = _checkpoint(c)
    assert g3["full"], g3  # its tracker's view was reset: full, and exact
    _equals_export(c, t, g3["generation"], tmp_path / "g3")


def test_a_large_rollback_aborted_after_its_live_backup_keeps_the_next_incremental_exact(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    """A large rollback collects the tracker before its live backup
    (nodeagent/daemon/restore_live.py): what it had seen since the base must still reach
    the next incremental capture when the rollback then never happens (here: held past
    its freeze deadline, so it is aborted)."""
    c = cluster_factory(nodes=("node-a",))
    c.agent_env["node-a"] = {"CPCOORD_FAULT_HOLD": "agent.restore.live"}
    c.restart_agent("node-a")
    c.wait_agents(["node-a"])
    n = 2 * LIVE_MIN_PAGES
    t = target_factory(maps=[f"data:{n}"])
    _attach(c, t)
    g1 = _checkpoint(c)["generation"]
    t.cmd("write", name="data", page=0, count=n, counter=3)  # the tracker sees them all
    got: list[int] = []

    def restore() -> None:
        r = c.cli("restore", "--job", "job", "--generation", str(g1), "--lease-ms", "1000",
                  check=False)  # fmt: skip
        got.append(r.returncode)

    th = threading.Thread(target=restore)
    th.start()
    try:
        c.wait_fault("agent.restore.live")
        time.sleep(1.5)  # past the restore's freeze deadline (half its lease)
    finally:
        faults.release_file("agent.restore.live", c.faults).touch()
        th.join(120)
    assert got and got[0] != 0, "the held rollback was not aborted"
    t.assert_running()
    assert "restore live backup taken" in (c.root / "agent-node-a.log").read_text()
    g2 = _checkpoint(c)
    assert not g2["full"] and g2["pages_captured"] >= n, g2
    _equals_export(c, t, g2["generation"], tmp_path / "g2")


def _memory_reads(c: Cluster) -> list[str]:
    return [
        line
        for line in c.agents["node-a"].log.read_text(errors="replace").splitlines()
        if "chunks read from memory" in line
    ]


def test_a_rollback_to_the_generation_just_taken_reads_its_chunks_from_memory(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    """Right after a checkpoint the member's staging holds the chunks its upload sent:
    the rollback takes them from there (the agent logs how many), and the memory equals
    the generation. A second rollback, after the first one's backup wrote over the start
    of staging, takes those chunks from the store again and is exact too."""
    c = cluster_factory(nodes=("node-a",))
    t = target_factory(maps=[f"data:{PAGES}"])
    _attach(c, t)
    t.cmd("write", name="data", page=0, count=PAGES, counter=1)
    g1 = _checkpoint(c)["generation"]
    t.cmd("write", name="data", page=0, count=PAGES, counter=2)
    m = _restore(c, g1)
    _equals_export(c, t, g1, tmp_path / "a")
    assert m["pages_written"] == PAGES, m
    first = _memory_reads(c)
    assert len(first) == 1 and f"chunks={PAGES // 16} " in first[0], first
    t.cmd("write", name="data", page=0, count=PAGES, counter=3)
    _restore(c, g1)
    _equals_export(c, t, g1, tmp_path / "b")
    t.assert_running()
