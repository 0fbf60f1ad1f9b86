"""End to end with real daemons: a real coordinator and three
real agents as separate processes on loopback, members on several agents, full then
incremental generations, and `cpcoord export` of every generation equal, byte for byte,
to what each member's memory held at that generation's cut.

The members' memory changes only on command from the test (testbed/target.py),
so the content read between two checkpoints is the content at the cut. A second test
runs writer threads that never pause and checks each export shows one instant.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from testbed import patterns
from testbed.cluster import Cluster
from testbed.driver import Target
from tests.helpers.e2e import attach, export, exported

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_full_then_incremental_generations_export_exactly(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    c = cluster_factory(nodes=("node-a", "node-b", "node-c"))
    targets = {
        "a1": (target_factory(maps=["data:96"]), "node-a"),
        "a2": (target_factory(maps=["data:48"]), "node-a"),
        "b": (target_factory(maps=["data:64"]), "node-b"),
        "c": (target_factory(maps=["data:32:anon:random:5"]), "node-c"),
    }
    for name, (t, node) in targets.items():
        attach(c, "train", name, t, node)

    expected: dict[int, dict[str, np.ndarray]] = {}
    results = []

    def checkpoint(*extra: str) -> dict:
        r = c.cli_json("checkpoint", "--job", "train", *extra)
        assert r["state"] == "committed", r
        n = r["generation"]
        expected[n] = {name: t.read("data") for name, (t, _) in targets.items()}
        results.append(r)
        return r

    # 1: full
    r1 = checkpoint()
    assert r1["generation"] == 1 and r1["parent"] is None and r1["members"] == 4
    assert r1["pages_captured"] == 96 + 48 + 64 + 32
    # 2: a few pages written on a1, some zeroed on b (they stay present, as ZERO), c as is
    ta1, tb = targets["a1"][0], targets["b"][0]
    ta1.cmd("write", name="data", page=5, count=3, counter=11)
    ta1.cmd("write", name="data", page=90, count=6, counter=12)
    tb.cmd("zero", name="data", page=10, count=20)
    r2 = checkpoint()
    assert r2["parent"] == 1 and not r2["full"]
    assert r2["pages_captured"] < 96, "an incremental generation captures the changes only"
    # 3: pages of a2 vanish (MADV_DONTNEED), c changes
    ta2, tc = targets["a2"][0], targets["c"][0]
    ta2.cmd("dontneed", name="data", page=40, count=8)
    tc.cmd("write", name="data", page=0, count=1, counter=3)
    checkpoint()
    # 4: full on demand, after more writes
    ta1.cmd("write", name="data", page=0, count=96, counter=13)
    r4 = checkpoint("--full")
    # a2's vanished pages may be back: reading the expected bytes faulted them in.
    assert r4["full"] and r4["pages_captured"] in (96 + 40 + 64 + 32, 96 + 48 + 64 + 32)
    # 5: incremental after the full one
    tb.cmd("write", name="data", page=63, count=1, counter=14)
    checkpoint()

    gens = c.cli_json("generations", "--job", "train")["generations"]
    assert [g["generation"] for g in gens] == [5, 4, 3, 2, 1]
    assert all(g["state"] == "committed" for g in gens)
    for n in range(1, 6):
        out = tmp_path / f"export-{n}"
        export(c, "train", n, out)
        for name, want in expected[n].items():
            got, listed = exported(out, name)
            assert np.array_equal(got, want), f"generation {n} member {name} differs"
            if name == "a2" and n <= 3:
                # Reading the expected bytes afterwards faults the pages in again, so
                # only generation 3 is sure to have seen them absent.
                gone = set(range(40, 48)) if n == 3 else set()
                assert not gone & set(listed.tolist()), "vanished pages stay in the manifest"
                assert len(listed) == 48 - len(gone)
    for t, _ in targets.values():
        t.assert_running()
    assert c.cli_json("verify")["ok"]


def test_running_writers_export_one_instant(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    """Writer threads never pause; each generation must still show one instant of each
    member (a torn or mixed copy fails check_writer), incremental ones included."""
    c = cluster_factory(nodes=("node-a", "node-b"))
    ta = target_factory(maps=["data:256"], writers=["data:4"])
    tb = target_factory(maps=["data:128"], writers=["data:2"])
    attach(c, "live", "a", ta, "node-a")
    attach(c, "live", "b", tb, "node-b")
    for i in range(3):
        r = c.cli_json("checkpoint", "--job", "live", *(["--full"] if i == 0 else []))
        assert r["state"] == "committed"
    for n in range(1, 4):
        out = tmp_path / f"live-{n}"
        export(c, "live", n, out)
        for name, t, per in (("a", ta, 64), ("b", tb, 64)):
            got, _ = exported(out, name)
            words = got.view(np.uint64).reshape(-1, patterns.WORDS)
            mid = t.mapping("data").id
            for w in range(words.shape[0] // per):
                patterns.check_writer(words[w * per : (w + 1) * per], mid, w * per, per)
    ta.assert_running()
    tb.assert_running()
