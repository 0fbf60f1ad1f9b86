"""`cpcoord diff` through a real coordinator and agent: two members checkpointed twice
with known writes between; diff lists exactly the pages written, per member."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from testbed.cluster import Cluster
from testbed.driver import Target
from tests.helpers.e2e import attach

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PAGE = 4096


def test_diff_lists_exactly_the_pages_written(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target]
) -> None:
    c = cluster_factory(nodes=("node-a", "node-b"))
    ta, tb = target_factory(maps=["data:64"]), target_factory(maps=["data:32"])
    attach(c, "dj", "wa", ta, "node-a")
    attach(c, "dj", "wb", tb, "node-b")
    r1 = c.cli_json("checkpoint", "--job", "dj")
    assert r1["state"] == "committed", r1
    ta.cmd("write", name="data", page=5, count=3, counter=21)
    ta.cmd("write", name="data", page=60, count=4, counter=22)
    tb.cmd("zero", name="data", page=0, count=2)
    r2 = c.cli_json("checkpoint", "--job", "dj")
    assert r2["state"] == "committed", r2
    n1, n2 = r1["generation"], r2["generation"]

    d = c.cli_json("diff", "--job", "dj", str(n1), str(n2))
    rows = {(r["member"], r["region"]): r for r in d["regions"]}
    assert len(rows) == 2
    (ra,) = [r for (m, _), r in rows.items() if m == "wa"]
    (rb,) = [r for (m, _), r in rows.items() if m == "wb"]
    assert ra["runs"] == [[5, 3], [60, 4]]
    assert ra["pages_changed"] == 7 and ra["bytes_changed"] == 7 * PAGE
    assert rb["runs"] == [[0, 2]] and rb["pages_changed"] == 2
    assert not (ra["added"] or ra["removed"] or rb["added"] or rb["removed"])
    assert d["pages_changed"] == 9 and d["bytes_changed"] == 9 * PAGE

    # A generation against itself: nothing; the reverse direction: the same pages.
    same = c.cli_json("diff", "--job", "dj", str(n2), str(n2))
    assert same["pages_changed"] == 0 and all(r["runs"] == [] for r in same["regions"])
    back = c.cli_json("diff", "--job", "dj", str(n2), str(n1), "--member", "wa")
    assert [r["runs"] for r in back["regions"]] == [[[5, 3], [60, 4]]]

    text = c.cli("diff", "--job", "dj", str(n1), str(n2)).stdout
    assert "5-7,60-63" in text and "9 pages changed" in text
    bad = c.cli("diff", "--job", "dj", str(n1), "99", check=False)
    assert bad.returncode != 0 and "99" in bad.stderr
