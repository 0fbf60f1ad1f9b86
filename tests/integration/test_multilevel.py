"""Multi-level checkpoints with real daemons (docs/multilevel.md): agents with `--cache`
commit at level `local` (packs durable in their node caches, none in the store yet),
drain to the store in the background, and the coordinator raises the level to `store`
after checking the drained packs; exports are exact; a coordinator killed mid-drain
resumes it after a restart; a cache too small degrades to direct writes. On a directory
store by default, on SeaweedFS S3 with CPCOORD_TEST_STORE=s3.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from testbed.cluster import Cluster
from testbed.driver import Target
from tests.helpers.e2e import attach_random, export, exported

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NODES = ("node-a", "node-b")


def _cached_cluster(
    factory: Callable[..., Cluster], tmp: Path, rate: str = "0", size: str = "0",
    cache_root: Path | None = None,
) -> tuple[Cluster, dict[str, Path]]:  # fmt: skip
    caches = {n: (cache_root or tmp) / f"cache-{n}" for n in NODES}
    args = {
        n: ("--cache", str(caches[n]), "--drain-rate", rate, "--cache-size", size) for n in NODES
    }
    return factory(nodes=NODES, agent_args=args), caches


def _store_node_packs(c: Cluster) -> list[str]:
    return [n for n, _ in c.store_objects() if n.startswith("packs/") and "nodes/" in n]


def _cache_packs(cache: Path) -> list[Path]:
    return [p for p in (cache / "packs").rglob("*") if p.is_file() and ".tmp" not in p.name]


def _generation(c: Cluster, job: str, n: int) -> dict[str, Any]:
    gens = c.cli_json("generations", "--job", job)["generations"]
    (g,) = [g for g in gens if g["generation"] == n]
    return g


def _wait_level(c: Cluster, job: str, n: int, level: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while (got := _generation(c, job, n)["level"]) != level:
        assert time.monotonic() < end, f"generation {n} stayed {got}"
        time.sleep(0.3)


def _check_export(c: Cluster, tmp: Path, job: str, n: int, want: dict[str, np.ndarray]) -> None:
    out = tmp / f"export-{job}-{n}-{time.monotonic_ns()}"
    export(c, job, n, out)
    for name, data in want.items():
        got, offsets = exported(out, name)
        assert np.array_equal(got[offsets], data[offsets]), f"generation {n}, member {name}"


def _restart_coordinator(c: Cluster, pause: Sequence[str] = ()) -> None:
    """A coordinator of its own (held at the `pause` fault points), the agents back."""
    assert c.coordinator is not None
    c.coordinator.kill()
    c.start_coordinator(pause=pause)
    c.wait_agents(NODES)


def _wait_members(c: Cluster, job: str = "ml") -> None:
    end = time.monotonic() + 60
    while not c.members_running(job):
        assert time.monotonic() < end, "members not re-attached"
        time.sleep(0.3)


def _memory(targets: dict[str, Target]) -> dict[str, np.ndarray]:
    return {n: t.read("data") for n, t in targets.items()}


def _targets(c: Cluster, factory: Callable[..., Target], pages: int) -> dict[str, Target]:
    return attach_random(c, factory, "ml", NODES, pages, seed=41)


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="cpcoord-ml-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_wait_local_commits_in_the_caches_then_drains_to_store_exactly(
    cluster_factory: Callable[..., Cluster],
    target_factory: Callable[..., Target],
    tmp_path: Path,
    shm_dir: Path,
    where: str,
) -> None:
    """On tmpfs the packs borrow the members' staging and are written over the cache's
    spare files (storecore/writer.py, nodeagent/cache/spares.py); on disk they are
    copied into arenas. Both commit, drain and export exactly."""
    # 1 MiB per member at 64 KiB/s: the drain takes ~15 s, so `local` is observable.
    root = shm_dir if where == "tmpfs" else None
    c, caches = _cached_cluster(cluster_factory, tmp_path, rate="64K", cache_root=root)
    targets = _targets(c, target_factory, 256)
    if where == "tmpfs":
        c.wait_prepared(NODES)  # spares made before the checkpoint, which writes over them
        assert all(list((caches[n] / "spare").iterdir()) for n in NODES)
    r1 = c.cli_json("checkpoint", "--job", "ml", "--wait", "local")
    assert r1["state"] == "committed" and r1["level"] == "local", r1
    want1 = _memory(targets)
    assert _generation(c, "ml", 1)["level"] == "local"
    for node in NODES:  # durable in each node's cache ...
        assert _cache_packs(caches[node]), node
    # Before the drain the store lacks those chunks: verify does not count them as lost,
    # and an export reads them from the caching agents, exactly.
    v = c.cli_json("verify")
    assert v["ok"], v
    _check_export(c, tmp_path, "ml", 1, want1)
    gc = c.cli_json("gc")  # sweeps nothing a local generation needs (drained later)
    assert _generation(c, "ml", 1)["level"] == "local", gc
    _wait_level(c, "ml", 1, "store")  # ... and in the store after the drain
    names = _store_node_packs(c)
    for node in NODES:
        assert any(f"nodes/{node}/" in n for n in names), names
    _check_export(c, tmp_path, "ml", 1, want1)
    # The default waits for the store: an incremental generation returns at `store`.
    targets["m0"].cmd("write", name="data", page=3, count=5, counter=21)
    targets["m1"].cmd("write", name="data", page=100, count=2, counter=22)
    r2 = c.cli_json("checkpoint", "--job", "ml")
    assert r2["state"] == "committed" and r2["level"] == "store" and r2["parent"] == 1, r2
    want2 = _memory(targets)
    _check_export(c, tmp_path, "ml", 2, want2)
    _check_export(c, tmp_path, "ml", 1, want1)
    v = c.cli_json("verify")
    assert v["ok"], v
    metrics_ok = c.cli_json("generations", "--job", "ml")["generations"]
    assert [g["level"] for g in metrics_ok] == ["store", "store"], metrics_ok


def test_coordinator_killed_mid_drain_resumes_and_verify_is_clean(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    """The coordinator dies holding a Drained report: the packs are in the store but not
    taken. After the restart (which re-indexes them as unknown packs) the agent is told
    again what it owes, drains it again and the level reaches `store`."""
    c, _ = _cached_cluster(cluster_factory, tmp_path)
    _restart_coordinator(c, pause=["coordinator.drain"])
    targets = _targets(c, target_factory, 512)
    r = c.cli_json("checkpoint", "--job", "ml", "--wait", "local")
    assert r["state"] == "committed" and r["level"] == "local", r
    want = _memory(targets)
    c.wait_fault("coordinator.drain")
    assert _store_node_packs(c)  # drained into the store, not taken
    assert _generation(c, "ml", 1)["level"] == "local"
    _restart_coordinator(c)
    _wait_level(c, "ml", 1, "store")
    v = c.cli_json("verify")
    assert v["ok"], v
    _check_export(c, tmp_path, "ml", 1, want)
    # The next checkpoint works as before.
    r2 = c.cli_json("checkpoint", "--job", "ml")
    assert r2["state"] == "committed" and r2["level"] == "store", r2


def test_a_cache_too_small_writes_the_store_directly_never_fails(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    c, caches = _cached_cluster(cluster_factory, tmp_path, size="64K")
    targets = _targets(c, target_factory, 256)
    r = c.cli_json("checkpoint", "--job", "ml", "--wait", "local")
    assert r["state"] == "committed" and r["level"] == "store", r  # nothing fit: all direct
    for node in NODES:
        assert not _cache_packs(caches[node]), node
        assert "node cache full: writing the store directly" in c.agents[node].tail(400)
    _check_export(c, tmp_path, "ml", 1, _memory(targets))


def test_api_client_waits_per_level_and_watch_sees_the_rise(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    """cpcoord.api.Client: `wait=LOCAL` returns at `local`; the default waits for the
    store, with a COMMITTED_LOCAL step first; Watch publishes GENERATION_LEVEL."""
    import threading

    from cpcoord.api import Client
    from cpcoord.api.values import Level, ProgressKind, WatchEvent, WatchKind

    c, _ = _cached_cluster(cluster_factory, tmp_path, rate="256K")
    _targets(c, target_factory, 256)
    with Client(c.address, insecure=True, timeout=120) as api:
        seen: list[WatchEvent] = []
        w = api.watch(["ml"])
        reader = threading.Thread(target=lambda: seen.extend(w), daemon=True)
        reader.start()
        g1 = api.checkpoint("ml", wait=Level.LOCAL)
        assert g1.level is Level.LOCAL, g1
        steps: list[ProgressKind] = []
        g2 = api.checkpoint("ml", on_event=lambda ev: steps.append(ev.kind))
        assert g2.level is Level.STORE, g2
        assert ProgressKind.COMMITTED_LOCAL in steps and steps[-1] is ProgressKind.COMMITTED
        end = time.monotonic() + 60
        while {1, 2} - {e.generation for e in seen if e.kind is WatchKind.GENERATION_LEVEL}:
            assert time.monotonic() < end, [e.kind for e in seen]
            time.sleep(0.2)
        rises = [e for e in seen if e.kind is WatchKind.GENERATION_LEVEL]
        assert all(e.info is not None and e.info.level is Level.STORE for e in rises), rises
        w.close()


def test_restore_by_default_takes_the_newest_generation_even_at_level_local(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    """Generation 2 is still `local` (the coordinator holds its drain reports: the third
    Drained, after generation 1's two), its caches' agents connected: `restore` without
    --generation rolls the members back to it, read from the node caches, exactly."""
    c, _ = _cached_cluster(cluster_factory, tmp_path)
    _restart_coordinator(c, pause=["coordinator.drain@3"])
    targets = _targets(c, target_factory, 128)
    r1 = c.cli_json("checkpoint", "--job", "ml")  # waits for the store
    assert r1["level"] == "store", r1
    for i, t in enumerate(targets.values()):
        t.cmd("write", name="data", page=0, count=64, counter=90 + i)
    r2 = c.cli_json("checkpoint", "--job", "ml", "--wait", "local")
    assert r2["level"] == "local" and r2["generation"] == 2, r2
    want2 = _memory(targets)
    c.wait_fault("coordinator.drain")
    g2 = _generation(c, "ml", 2)
    assert g2["level"] == "local" and g2["lost"] == "" and g2["cache_nodes"], g2
    for i, t in enumerate(targets.values()):
        t.cmd("write", name="data", page=10, count=20, counter=40 + i)
    r = c.cli("restore", "--job", "ml", "--json")
    assert '"generation": 2' in r.stdout and "restoring generation" not in r.stderr, r
    for name, t in targets.items():
        assert np.array_equal(t.read("data"), want2[name]), name


def test_a_lost_generation_is_listed_watched_and_skipped_by_restore(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    """node-b's agent drains nothing of generation 2 (1 byte/s); then it dies and its
    cache is deleted. Generation 2 is lost: `generations` (text and JSON) and Watch say
    so and why; `restore` without --generation skips it, says which it took and why, and
    restores generation 1 exactly; asking for generation 2 by number is refused."""
    import threading

    from cpcoord.api import Client
    from cpcoord.api.values import WatchEvent, WatchKind

    c, caches = _cached_cluster(cluster_factory, tmp_path)
    targets = _targets(c, target_factory, 64)
    r1 = c.cli_json("checkpoint", "--job", "ml")  # waits for the store
    assert r1["level"] == "store", r1
    want1 = _memory(targets)

    def restart_b(*extra: str) -> None:
        c.agents["node-b"].kill()
        args = ("--cache", str(caches["node-b"]), *extra)
        c.start_agent("node-b", args=args)
        c.wait_agents(NODES)
        _wait_members(c)

    restart_b("--drain-rate", "1")
    for i, t in enumerate(targets.values()):
        t.cmd("write", name="data", page=0, count=64, counter=30 + i)
    r2 = c.cli_json("checkpoint", "--job", "ml", "--wait", "local")
    assert r2["level"] == "local" and r2["generation"] == 2, r2
    with Client(c.address, insecure=True, timeout=60) as api:
        seen: list[WatchEvent] = []
        w = api.watch(["ml"])
        threading.Thread(target=lambda: seen.extend(w), daemon=True).start()
        time.sleep(0.5)  # the watch is registered
        c.agents["node-b"].kill()
        shutil.rmtree(caches["node-b"])
        restart_b()
        end = time.monotonic() + 30
        while not [e for e in seen if e.kind is WatchKind.GENERATION_LOST]:
            assert time.monotonic() < end, [e.kind for e in seen]
            time.sleep(0.2)
        w.close()
    (ev,) = [e for e in seen if e.kind is WatchKind.GENERATION_LOST]
    assert ev.generation == 2 and ev.info is not None and "node-b" in ev.info.lost, ev
    g2 = _generation(c, "ml", 2)
    assert "node cache of node-b" in g2["lost"] and not g2["cache_nodes"], g2
    text = c.cli("generations", "--job", "ml").stdout
    (line,) = [x for x in text.splitlines() if x.split()[0] == "2"]
    assert " lost " in line and "node-b" in line, text
    r = c.cli("restore", "--job", "ml", "--json")
    assert "generation 2 of ml is lost" in r.stderr, r.stderr
    assert "restoring generation 1 (store)" in r.stderr, r.stderr
    assert '"generation": 1' in r.stdout, r.stdout
    for name, t in targets.items():
        assert np.array_equal(t.read("data"), want1[name]), name
    by_number = c.cli("restore", "--job", "ml", "--generation", "2", check=False)
    assert by_number.returncode != 0 and "lost" in by_number.stderr, by_number.stderr
    out = tmp_path / "lost-export"
    export_2 = c.cli("export", "--job", "ml", "--generation", "2", "--out", str(out), check=False)
    assert export_2.returncode != 0 and "it is lost" in export_2.stderr, export_2.stderr
    _check_export(c, tmp_path, "ml", 1, want1)


def test_a_lost_cache_loses_only_its_local_generations_and_checkpoints_go_on(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    """node-b's agent dies and its cache is deleted before generation 1 drained (the
    coordinator holds the drain reports). The agent comes back with a new, empty cache:
    generation 1 is lost (never `store`), nothing of the old cache counts as present,
    and the next checkpoint commits, reaches the store and exports exactly."""
    c, caches = _cached_cluster(cluster_factory, tmp_path)
    _restart_coordinator(c, pause=["coordinator.drain"])
    targets = _targets(c, target_factory, 256)
    r1 = c.cli_json("checkpoint", "--job", "ml", "--wait", "local")
    assert r1["level"] == "local", r1
    c.wait_fault("coordinator.drain")
    c.agents["node-b"].kill()
    shutil.rmtree(caches["node-b"])
    c.coordinator.kill()  # release the held drain: a coordinator of its own from here
    c.start_coordinator()
    c.start_agent("node-b")
    c.wait_agents(NODES)
    _wait_members(c)
    assert "generation lost with a node cache" in c.coordinator.tail(400)
    r2 = c.cli_json("checkpoint", "--job", "ml")  # waits for the store
    assert r2["state"] == "committed" and r2["level"] == "store", r2
    want = _memory(targets)
    _check_export(c, tmp_path, "ml", r2["generation"], want)
    assert _generation(c, "ml", 1)["level"] == "local"
    v = c.cli_json("verify")
    assert v["ok"], v


def test_a_local_generation_exports_and_restores_in_place_exactly_before_its_drain(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    """At 1 byte/s the drain never puts a pack: generation 1 is only in the two node
    caches. Its export is exact on both read paths (the chunks come from the caching
    agents through the coordinator, checked there and here); restoring it in place reads
    each member's chunks from its own node's cache (the agent's direct read, every chunk
    checked against its id), byte for byte; nothing reaches the store meanwhile."""
    c, _ = _cached_cluster(cluster_factory, tmp_path, rate="1")
    targets = _targets(c, target_factory, 128)
    r1 = c.cli_json("checkpoint", "--job", "ml", "--wait", "local")
    assert r1["level"] == "local", r1
    want = _memory(targets)
    _check_export(c, tmp_path, "ml", 1, want)  # auto: store chunks direct, cached relayed
    out = tmp_path / "export-coordinator"
    c.cli("export", "--job", "ml", "--generation", "1", "--data-path", "coordinator",
          "--out", str(out))  # fmt: skip
    for name, data in want.items():
        got, offsets = exported(out, name)
        assert np.array_equal(got[offsets], data[offsets]), name
    for i, t in enumerate(targets.values()):
        t.cmd("write", name="data", page=0, count=128, counter=70 + i)
    r = c.cli_json("restore", "--job", "ml", "--generation", "1")
    assert r["state"] == "restored", r
    assert [m["read_path"] for m in r["members"]] == ["direct", "direct"], r
    for name, t in targets.items():
        t.assert_running()
        assert np.array_equal(t.read("data"), want[name]), name
    assert not _store_node_packs(c)  # read from the caches: nothing drained
    assert _generation(c, "ml", 1)["level"] == "local"
    for node in NODES:
        log = c.agents[node].tail(400)
        assert "direct read failed" not in log and "cached chunks not sent" not in log, node


def test_an_export_of_a_local_generation_whose_caching_agent_is_gone_says_so(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    """node-b's agent is stopped before generation 1 drained: its chunks cannot be read
    from anywhere now. The export fails before writing a member (CacheUnreachable, 156,
    naming node-b), never with damage; generation 1 stays local."""
    c, _ = _cached_cluster(cluster_factory, tmp_path, rate="1")
    _targets(c, target_factory, 64)
    r1 = c.cli_json("checkpoint", "--job", "ml", "--wait", "local")
    assert r1["level"] == "local", r1
    c.agents["node-b"].kill()
    end = time.monotonic() + 30
    while c.agents_json().get("node-b", True):
        assert time.monotonic() < end, "node-b still connected"
        time.sleep(0.2)
    out = tmp_path / "gone"
    r = c.cli("export", "--job", "ml", "--generation", "1", "--out", str(out), check=False)
    assert r.returncode == 156 and "node-b" in r.stderr, r.stderr
    assert _generation(c, "ml", 1)["level"] == "local"


def _local_on_b(
    c: Cluster, caches: dict[str, Path], factory: Callable[..., Target]
) -> dict[str, Target]:
    """Generation 1 in the store; generation 2 at level local, node-b's agent draining
    at 1 byte/s (its packs of 2 stay in its cache only)."""
    targets = _targets(c, factory, 64)
    assert c.cli_json("checkpoint", "--job", "ml")["level"] == "store"
    c.agents["node-b"].kill()
    c.start_agent("node-b", args=("--cache", str(caches["node-b"]), "--drain-rate", "1"))
    c.wait_agents(NODES)
    for i, t in enumerate(targets.values()):
        t.cmd("write", name="data", page=0, count=64, counter=50 + i)
    r2 = c.cli_json("checkpoint", "--job", "ml", "--wait", "local")
    assert r2["level"] == "local" and r2["generation"] == 2, r2
    return targets


def test_forget_node_loses_its_local_generations_and_checkpoints_go_on(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    """An operator's `cpcoord forget NODE`: refused while the node's agent is connected
    (nothing lost); once it is gone, generation 2 (level local, node-b's packs never
    drained) is lost, said in the command's output and by `generations`; the node's
    member is named as still attached. When node-b's agent comes back with the very same
    cache the forgotten packs stay forgotten: the next checkpoint commits, reaches the
    store and exports exactly, and verify is clean."""
    c, caches = _cached_cluster(cluster_factory, tmp_path)
    targets = _local_on_b(c, caches, target_factory)
    refused = c.cli("forget", "node-b", check=False)
    assert refused.returncode == 55 and "connected agent" in refused.stderr, refused
    assert not _generation(c, "ml", 2)["lost"]
    c.agents["node-b"].kill()
    out = c.cli_json("forget", "node-b")
    assert out["node"] == "node-b" and out["packs"] > 0, out
    assert [g["generation"] for g in out["lost"]] == [2], out
    assert "forgotten" in out["lost"][0]["lost"], out
    assert out["members"] == ["ml/m1"], out
    g2 = _generation(c, "ml", 2)
    assert "forgotten" in g2["lost"] and not g2["cache_nodes"], g2
    from cpcoord.api import Client, ForgottenNode

    with Client(c.address, insecure=True, timeout=60) as api:  # the same through the API
        again = api.forget_node("node-b")  # nothing left to lose, nothing changes
    assert again == ForgottenNode("node-b", (), 0, ("ml/m1",)), again
    c.start_agent("node-b", args=("--cache", str(caches["node-b"])))
    c.wait_agents(NODES)
    _wait_members(c)
    r3 = c.cli_json("checkpoint", "--job", "ml")  # waits for the store
    assert r3["state"] == "committed" and r3["level"] == "store", r3
    want = _memory(targets)
    _check_export(c, tmp_path, "ml", r3["generation"], want)
    assert _generation(c, "ml", 2)["lost"], "a forgotten generation stays lost"
    v = c.cli_json("verify")
    assert v["ok"], v


def test_a_local_generation_deleted_before_its_drain_is_never_drained(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    """Generation 2 at level local (node-b drains at 1 byte/s) is deleted: its cached
    packs leave the ledger with it. node-b's agent, back at full drain rate, is no longer
    told to drain them (they never reach the store) and nothing it reports is refused;
    the next checkpoint re-sends what it needs, reaches the store, exports exactly, and
    verify is clean."""
    c, caches = _cached_cluster(cluster_factory, tmp_path)
    targets = _local_on_b(c, caches, target_factory)
    c.agents["node-b"].kill()  # its drain of generation 2 never finishes
    stored = {n.rsplit("/", 1)[-1] for n in _store_node_packs(c)}
    held = {p.name for p in _cache_packs(caches["node-b"])} - stored
    assert held, "generation 2's packs are in node-b's cache only"
    c.cli("generations", "--job", "ml", "--delete", "2")
    c.start_agent("node-b", args=("--cache", str(caches["node-b"])))
    c.wait_agents(NODES)
    _wait_members(c)
    for i, t in enumerate(targets.values()):  # else generation 3 makes the same packs
        t.cmd("write", name="data", page=0, count=64, counter=90 + i)
    r3 = c.cli_json("checkpoint", "--job", "ml")  # waits for the store (drain oldest first)
    assert r3["state"] == "committed" and r3["level"] == "store", r3
    drained = held & {n.rsplit("/", 1)[-1] for n in _store_node_packs(c)}
    assert not drained, "packs of a deleted generation were drained into the store"
    assert c.coordinator is not None
    assert "drained packs refused" not in c.coordinator.tail(400)
    want = _memory(targets)
    _check_export(c, tmp_path, "ml", r3["generation"], want)
    v = c.cli_json("verify")
    assert v["ok"], v
