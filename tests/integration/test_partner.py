"""Partner copies with real daemons (docs/multilevel.md, "Partner copies"): three agents
with `--cache` and `--partner-listen` on loopback, paired round the ring by the
coordinator (node-a -> node-b -> node-c -> node-a). `checkpoint --wait partner` returns
once every cached pack has a checked copy on another node; the drain is held (1 byte/s)
so nothing is in the store. Then node-b is lost with its cache, and its member is
restored into a new process on node-c from node-c's partner copy, byte for byte.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from testbed.cluster import Cluster
from testbed.driver import Target
from tests.helpers.e2e import attach, attach_random, export, exported

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NODES = ("node-a", "node-b", "node-c")
PARTNER_OF = {"node-a": "node-b", "node-b": "node-c", "node-c": "node-a"}


def _cluster(
    factory: Callable[..., Cluster], tmp: Path, rate: str = "1"
) -> tuple[Cluster, dict[str, Path]]:
    caches = {n: tmp / f"cache-{n}" for n in NODES}
    args = {
        n: ("--cache", str(caches[n]), "--drain-rate", rate, "--partner-listen", "127.0.0.1:0")
        for n in NODES
    }
    return factory(nodes=NODES, agent_args=args), caches


def _generation(c: Cluster, job: str, n: int) -> dict[str, Any]:
    gens = c.cli_json("generations", "--job", job)["generations"]
    (g,) = [g for g in gens if g["generation"] == n]
    return g


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and ".tmp" not in p.name)


def _own_packs(cache: Path) -> list[str]:
    return sorted(p.name for p in _files(cache / "packs"))


def _partner_packs(cache: Path, sender: str) -> list[str]:
    return sorted(p.name for p in _files(cache / "partner" / sender))


def _targets(c: Cluster, factory: Callable[..., Target], pages: int) -> dict[str, Target]:
    return attach_random(c, factory, "pj", NODES, pages, seed=51)


def test_wait_partner_returns_once_every_pack_has_a_checked_copy_on_the_next_node(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    c, caches = _cluster(cluster_factory, tmp_path)
    targets = _targets(c, target_factory, 128)
    r = c.cli_json("checkpoint", "--job", "pj", "--wait", "partner")
    assert r["state"] == "committed" and r["level"] == "partner", r
    assert _generation(c, "pj", 1)["level"] == "partner"
    for node, partner in PARTNER_OF.items():  # each node's packs, copied to its partner
        own = _own_packs(caches[node])
        assert own and _partner_packs(caches[partner], node) == own, (node, partner)
        others = [n for n in NODES if n not in (node, partner)]
        assert all(not _partner_packs(caches[o], node) for o in others), node
    want = {n: t.read("data") for n, t in targets.items()}
    out = tmp_path / "export-1"
    export(c, "pj", 1, out)
    for name, data in want.items():
        got, offsets = exported(out, name)
        assert np.array_equal(got[offsets], data[offsets]), name
    for node in NODES:
        assert "partner copies held" in c.agents[node].tail(400), node
    # Nothing changed: generation 2 caches nothing new and depends only on packs that
    # have copies already, so it is `partner` as it commits.
    r2 = c.cli_json("checkpoint", "--job", "pj", "--wait", "local")
    assert r2["generation"] == 2 and r2["level"] == "partner", r2


def _wait_gone(c: Cluster, node: str) -> None:
    end = time.monotonic() + 30
    while c.agents_json().get(node, True):
        assert time.monotonic() < end, f"{node} still connected"
        time.sleep(0.2)


def test_a_lost_node_is_restored_elsewhere_from_the_partner_copy_and_checkpoints_go_on(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    """Generation 1 at `partner`, nothing in the store (drain at 1 byte/s). node-b's agent
    is killed and its cache deleted: m1 (node-b's member) is restored into a new process
    on node-c, whose partner directory holds node-b's packs, byte for byte; an export of
    generation 1 reads node-b's chunks from node-c, exactly. Then m1 is the new process on
    node-c, and the next checkpoint reaches `partner` on the ring without node-b."""
    c, caches = _cluster(cluster_factory, tmp_path)
    targets = _targets(c, target_factory, 128)
    r = c.cli_json("checkpoint", "--job", "pj", "--wait", "partner")
    assert r["level"] == "partner", r
    want1 = {n: t.read("data") for n, t in targets.items()}
    assert _partner_packs(caches["node-c"], "node-b")
    c.agents["node-b"].kill()
    shutil.rmtree(caches["node-b"])
    _wait_gone(c, "node-b")
    assert _generation(c, "pj", 1)["level"] == "partner"
    assert not [n for n, _ in c.store_objects() if "nodes/" in n]  # nothing drained
    m = targets["m1"].mapping("data")
    region = f"range-{m.addr:x}-{m.end:x}"
    tn = target_factory(maps=["other:8", "data:128"])
    n = tn.mapping("data")
    c.cli(
        "restore", "--job", "pj", "--generation", "1", "--member", "m1", "--into", str(tn.pid),
        "--node", "node-c", "--region", f"{region}={n.addr:#x}-{n.end:#x}",
    )  # fmt: skip
    assert np.array_equal(tn.read("data"), want1["m1"]), "not the partner copy's bytes"
    assert np.array_equal(tn.read("other"), tn.expected("other", 0, 8)), "a neighbour changed"
    tn.assert_running()
    g1 = _generation(c, "pj", 1)  # read from the copies now: node-b is not needed
    assert g1["cache_nodes"] == ["node-a", "node-c"] and not g1["lost"], g1
    out = tmp_path / "export-after-loss"
    r = c.cli("export", "--job", "pj", "--out", str(out))  # the newest readable: 1
    assert "skip" not in r.stderr and "lost" not in r.stderr, r.stderr
    for name, data in want1.items():
        got, offsets = exported(out, name)
        assert np.array_equal(got[offsets], data[offsets]), name
    # Checkpoints go on without node-b: m1 is now the new process on node-c.
    c.cli("detach", "--job", "pj", "--member", "m1")
    attach(c, "pj", "m1", tn, "node-c")
    tn.cmd("write", name="data", page=0, count=16, counter=77)
    r2 = c.cli_json("checkpoint", "--job", "pj", "--wait", "partner")
    assert r2["state"] == "committed" and r2["level"] == "partner", r2
    want2 = {n: t.read("data") for n, t in {**targets, "m1": tn}.items()}
    out2 = tmp_path / "export-2"
    export(c, "pj", r2["generation"], out2)
    for name, data in want2.items():
        got, offsets = exported(out2, name)
        assert np.array_equal(got[offsets], data[offsets]), name


def test_api_waits_for_partner_watch_sees_both_rises_and_drained_copies_go(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    """cpcoord.api.Client `wait=PARTNER` returns at `partner` (or above); Watch publishes
    GENERATION_LEVEL at `partner` and at `store`; once drained, the holders are told and
    delete their copies (they count against their caches)."""
    import threading

    from cpcoord.api import Client
    from cpcoord.api.values import Level, WatchEvent, WatchKind

    c, caches = _cluster(cluster_factory, tmp_path, rate="256K")
    _targets(c, target_factory, 256)
    with Client(c.address, insecure=True, timeout=120) as api:
        seen: list[WatchEvent] = []
        w = api.watch(["pj"])
        threading.Thread(target=lambda: seen.extend(w), daemon=True).start()
        time.sleep(0.5)  # the watch is registered
        g1 = api.checkpoint("pj", wait=Level.PARTNER)
        assert g1.level in (Level.PARTNER, Level.STORE), g1
        end = time.monotonic() + 90
        while True:
            rises = [e.info.level for e in seen if e.kind is WatchKind.GENERATION_LEVEL and e.info]
            if Level.STORE in rises:
                break
            assert time.monotonic() < end, rises
            time.sleep(0.2)
        w.close()
    assert rises[0] is Level.PARTNER, rises
    end = time.monotonic() + 30
    while any(_partner_packs(caches[n], s) for n in NODES for s in NODES):
        assert time.monotonic() < end, "partner copies of drained packs were kept"
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["new_cache", "forget"])
def test_the_holder_drains_in_place_of_an_owner_back_with_another_cache(
    cluster_factory: Callable[..., Cluster],
    target_factory: Callable[..., Target],
    tmp_path: Path,
    how: str,
) -> None:
    """node-b drains nothing (1 byte/s); the others drain at once. Generation 1 reaches
    `partner`, not `store`. node-b's agent dies and comes back with a new, empty cache
    (or never comes back, and an operator runs `cpcoord forget node-b`): generation 1 is
    not lost (node-c holds node-b's packs), node-c drains them in node-b's place, the
    generation reaches `store`, verify is clean and the export exact."""
    caches = {n: tmp_path / f"cache-{n}" for n in NODES}
    args = {
        n: ("--cache", str(caches[n]), "--drain-rate", "1" if n == "node-b" else "0",
            "--partner-listen", "127.0.0.1:0")
        for n in NODES
    }  # fmt: skip
    c = cluster_factory(nodes=NODES, agent_args=args)
    targets = _targets(c, target_factory, 128)
    r = c.cli_json("checkpoint", "--job", "pj", "--wait", "partner")
    assert r["level"] == "partner", r
    want = {n: t.read("data") for n, t in targets.items()}
    c.agents["node-b"].kill()
    shutil.rmtree(caches["node-b"])
    _wait_gone(c, "node-b")
    if how == "forget":
        out = c.cli_json("forget", "node-b")
        assert out["lost"] == [] and out["members"] == ["pj/m1"], out
    else:
        c.start_agent("node-b", args=("--cache", str(caches["node-b"]), "--partner-listen",
                                      "127.0.0.1:0"))  # fmt: skip
        c.wait_agents(NODES)
    end = time.monotonic() + 60
    while (g := _generation(c, "pj", 1))["level"] != "store":
        assert not g["lost"], g
        assert time.monotonic() < end, g
        time.sleep(0.3)
    assert "generation lost with a node cache" not in c.coordinator.tail(400)
    v = c.cli_json("verify")
    assert v["ok"], v
    out = tmp_path / "export-drained"
    export(c, "pj", 1, out)
    for name, data in want.items():
        got, offsets = exported(out, name)
        assert np.array_equal(got[offsets], data[offsets]), name


def test_a_holder_is_told_to_take_over_a_drain_only_when_an_owner_lost_something(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    """Nothing drains (1 byte/s). node-b comes back with a new cache: node-c, holder of
    its copies, is told once to drain them (TakeOverDrain, logged "drain taken over").
    node-a then reconnects with the cache it had, and an operator forgets a node that
    never held anything: nothing was lost either time, so nobody is told again."""
    c, caches = _cluster(cluster_factory, tmp_path)
    _targets(c, target_factory, 64)
    r = c.cli_json("checkpoint", "--job", "pj", "--wait", "partner")
    assert r["level"] == "partner", r

    def restart(node: str, drop_cache: bool) -> None:
        c.agents[node].kill()
        if drop_cache:
            shutil.rmtree(caches[node])
        _wait_gone(c, node)
        c.start_agent(node, args=("--cache", str(caches[node]), "--drain-rate", "1",
                                  "--partner-listen", "127.0.0.1:0"))  # fmt: skip
        c.wait_agents(NODES)

    def told() -> list[str]:
        lines = c.coordinator.tail(100000).splitlines()
        return [ln for ln in lines if "drain taken over" in ln]

    restart("node-b", drop_cache=True)
    assert len(told()) == 1 and "node-c" in told()[0], told()
    restart("node-a", drop_cache=False)
    out = c.cli_json("forget", "node-z")
    assert out["lost"] == [] and out["packs"] == 0, out
    assert len(told()) == 1, told()
    assert _generation(c, "pj", 1)["level"] == "partner"
