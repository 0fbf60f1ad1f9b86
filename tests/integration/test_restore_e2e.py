"""Restore in place end to end: a real coordinator, two real agents, members
with explicit regions on both; `cpcoord restore` puts every byte of every region back to
the generation's, the members keep running, and their next checkpoint is incremental
and exact. A member
that does not fit any more (part of its region unmapped since) makes the restore refuse
with nothing written anywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from cpcoord.gen.v1 import coordinator_pb2, coordinator_pb2_grpc
from cpcoord.grpcopts import channel_options
from testbed.cluster import Cluster
from testbed.driver import Target
from tests.helpers.e2e import attach

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _capabilities(c: Cluster) -> dict[str, bool]:
    """Per node: whether its agent advertises restore in place and into."""
    with grpc.insecure_channel(c.address, options=channel_options()) as ch:
        stub = coordinator_pb2_grpc.CoordinatorStub(ch)
        resp = stub.ListAgents(coordinator_pb2.ListAgentsRequest(), timeout=5)
    want = {"restore-in-place", "restore-into"}
    return {a.node: want <= set(a.capabilities) for a in resp.agents}


def _digest(t: Target, pages: int | None = None) -> str:
    return hashlib.blake2b(t.read("data", 0, pages).tobytes()).hexdigest()


def test_restore_in_place_two_agents(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target]
) -> None:
    c = cluster_factory(nodes=("node-a", "node-b"))
    assert _capabilities(c) == {"node-a": True, "node-b": True}
    ta = target_factory(maps=["data:96"])
    tb = target_factory(maps=["data:64:anon:random:7"])
    attach(c, "job", "a", ta, "node-a")
    attach(c, "job", "b", tb, "node-b")
    r1 = c.cli_json("checkpoint", "--job", "job")
    assert r1["state"] == "committed", r1
    # generation 2: a few pages zeroed (stored as ZERO) and some vanish (absent)
    ta.cmd("zero", name="data", page=10, count=5)
    tb.cmd("dontneed", name="data", page=60, count=4)
    tb.cmd("write", name="data", page=0, count=2, counter=5)
    r2 = c.cli_json("checkpoint", "--job", "job")
    assert r2["state"] == "committed" and r2["generation"] == 2, r2
    want = {"a": ta.read("data"), "b": tb.read("data")}
    # mutate everything differently: written pages, zeroed pages, pages faulted in
    ta.cmd("write", name="data", page=0, count=96, counter=99)
    tb.cmd("write", name="data", page=0, count=64, counter=98)
    assert not np.array_equal(ta.read("data"), want["a"])

    c.cli("restore", "--job", "job", "--generation", "2")
    for name, t in (("a", ta), ("b", tb)):
        got = t.read("data")
        assert np.array_equal(got, want[name]), f"member {name} differs after restore"
        t.assert_running()
    # The trackers stay armed and relative to their base (generation 2, the newest): the
    # next capture is incremental (the pages written since and by the restore) and exact.
    tb.cmd("write", name="data", page=3, count=1, counter=7)
    r3 = c.cli_json("checkpoint", "--job", "job")
    assert r3["state"] == "committed" and not r3["full"], r3
    assert r3["pages_captured"] <= 96 + 64, r3
    after = {"a": ta.read("data"), "b": tb.read("data")}
    c.cli("restore", "--job", "job", "--generation", "1")
    c.cli("restore", "--job", "job", "--generation", str(r3["generation"]))
    for name, t in (("a", ta), ("b", tb)):
        assert np.array_equal(t.read("data"), after[name]), f"{name}: generation 3 not exact"
        t.assert_running()


def test_restore_refused_when_a_member_does_not_fit(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target]
) -> None:
    c = cluster_factory(nodes=("node-a", "node-b"))
    ta = target_factory(maps=["data:32"])
    tb = target_factory(maps=["data:32"])
    attach(c, "job", "a", ta, "node-a")
    attach(c, "job", "b", tb, "node-b")
    assert c.cli_json("checkpoint", "--job", "job")["state"] == "committed"
    ta.cmd("write", name="data", page=0, count=32, counter=41)
    tb.cmd("write", name="data", page=0, count=32, counter=42)
    tb.cmd("munmap", name="data", page=28, count=4)
    before = (_digest(ta), _digest(tb, 28))

    r = c.cli("restore", "--job", "job", "--generation", "1", check=False)
    assert r.returncode == 59, (r.returncode, r.stdout, r.stderr)
    out = r.stdout + r.stderr
    assert "member b" in out and "region range-" in out and "not mapped" in out, out
    assert (_digest(ta), _digest(tb, 28)) == before, "a refused restore wrote something"
    ta.assert_running()
    tb.assert_running()
    # a restore of the member that fits still works alone
    c.cli("restore", "--job", "job", "--generation", "1", "--member", "a")
    assert np.array_equal(ta.read("data"), ta.expected("data", 0, 32)), "a not restored"


def test_restore_into_a_new_process_and_whole_memory_refused(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target]
) -> None:
    c = cluster_factory(nodes=("node-a",))
    ta = target_factory(maps=["data:32:anon:random:3"])
    attach(c, "job", "a", ta, "node-a")
    assert c.cli_json("checkpoint", "--job", "job")["state"] == "committed"
    want = ta.read("data")
    m = ta.mapping("data")
    region = f"range-{m.addr:x}-{m.end:x}"
    # A restarted member: a new process whose region lives elsewhere (or anywhere).
    tn = target_factory(maps=["other:8", "data:32"])
    n = tn.mapping("data")
    c.cli(
        "restore", "--job", "job", "--member", "a", "--into", str(tn.pid),
        "--region", f"{region}={n.addr:#x}-{n.end:#x}",
    )  # fmt: skip
    assert np.array_equal(tn.read("data"), want), "RestoreInto wrote other bytes"
    assert np.array_equal(tn.read("other"), tn.expected("other", 0, 8)), "a neighbour changed"
    tn.assert_running()
    ta.assert_running()

    # A member of the whole-memory set with another thread than at the cut: refused in
    # place (its registers are in the manifest, but they fit only the same threads).
    # tests/integration/test_restore_whole_coordinator.py restores such members.
    tw = target_factory(maps=["data:16"])
    c.cli("attach", "--job", "whole", "--member", "w", "--pid", str(tw.pid), "--node", "node-a")
    assert c.cli_json("checkpoint", "--job", "whole")["state"] == "committed"
    tw.cmd("write", name="data", page=0, count=16, counter=9)
    tw.cmd("threads", count=1)
    before = _digest(tw)
    r = c.cli("restore", "--job", "whole", check=False)
    assert r.returncode == 59, (r.returncode, r.stdout, r.stderr)
    assert "threads changed" in r.stdout + r.stderr, r.stdout + r.stderr
    assert _digest(tw) == before, "a refused restore wrote something"
    tw.assert_running()
