"""Pre-copy through the real coordinator and agents (separate processes, loopback).

Members with writer threads that never pause are checkpointed: the first generation and
a `--full` one are pre-copied by their agent at the Freeze (the JSON says so per member,
the agent's metrics count it), an incremental one follows; every export shows one
instant of each member (a page torn between its live copy and a later write fails
check_writer). A still member is exported exactly as it was at the cut; `--no-precopy`
copies everything frozen and says nothing of pre-copy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from nodeagent.trackers import registry
from testbed import patterns
from testbed.cluster import Cluster
from testbed.driver import Target
from tests.conftest import require
from tests.helpers.e2e import attach, export, exported

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _check_one_instant(got: np.ndarray, t: Target, per: int) -> None:
    words = got.view(np.uint64).reshape(-1, patterns.WORDS)
    mid = t.mapping("data").id
    for w in range(words.shape[0] // per):
        patterns.check_writer(words[w * per : (w + 1) * per], mid, w * per, per)


def test_precopied_generations_export_one_instant(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    avail = registry.availability("uffd-wp")
    require(avail.available, f"uffd-wp: {avail.reason}")
    c = cluster_factory(nodes=("node-a", "node-b"))
    ta = target_factory(maps=["data:4096"], writers=["data:4"])  # 16 MiB, always written
    tb = target_factory(maps=["data:512:anon:random:7"])  # still between checkpoints
    attach(c, "pc", "a", ta, "node-a")
    attach(c, "pc", "b", tb, "node-b")
    want_b: dict[int, np.ndarray] = {}
    runs = []
    for extra in ([], [], ["--full"], ["--full", "--no-precopy"]):
        r = c.cli_json("checkpoint", "--job", "pc", *extra)
        assert r["state"] == "committed", r
        want_b[r["generation"]] = tb.read("data")
        runs.append(r)
        tb.cmd("write", name="data", page=len(runs) * 7, count=3, counter=len(runs))
    first, incr, full, plain = runs
    for r in (first, full):  # pre-copied: both members, with their passes
        assert sorted(r["precopy"]) == ["a", "b"], r["precopy"]
        for pc in r["precopy"].values():
            assert pc["rounds"] >= 1 and len(pc["bytes"]) == pc["rounds"]
        assert r["precopy"]["a"]["bytes"][0] >= 4096 * 4096
        # The still member: nothing written since its live pass, nothing copied frozen.
        assert r["precopy"]["b"]["frozen_pages"] == 0, r["precopy"]["b"]
    assert not incr["full"] and incr["precopy"] == {}
    assert plain["full"] and plain["precopy"] == {}
    for n in range(1, 5):
        out = tmp_path / f"pc-{n}"
        export(c, "pc", n, out)
        got, _ = exported(out, "a")
        _check_one_instant(got, ta, 1024)
        got_b, listed = exported(out, "b")
        assert np.array_equal(got_b, want_b[n]), f"generation {n}: member b differs"
        assert listed.size == 512
    ta.assert_running()
    tb.assert_running()
    assert c.cli_json("verify")["ok"]
