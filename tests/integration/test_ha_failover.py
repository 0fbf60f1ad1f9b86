"""Coordinator replicas on a real etcd: the leader dies, another takes over.

Three `cpcoord coordinator --etcd` replicas share one directory store; two real agents
(`--coordinator` every replica's address) hold one real member each; the CLI is always
given the list the test started with, the first leader first. The leader is SIGKILLed
- while idle: a new leader serves within 5 s;
- during a checkpoint (mid-upload; and after its manifest is written, before the
  catalog flip): the checkpoint fails (the stream broke), every member runs again
  within the lease, and the generation is aborted, never visible.
Then, in every case: no generation is lost or partly visible, the next checkpoint
(`cpcoord checkpoint` pointed at the old address list) commits and exports exactly,
incrementally (the agents kept their trackers), and verify and gc find the store clean.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.store import Kind
from coordinator.store.catalog import State
from testbed.driver import Target
from tests.helpers.etcd import EtcdServer
from tests.helpers.fault_scene import LEASE_MS, Scene
from tests.helpers.replicas import ReplicaCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FAILOVER_S = 5.0


class ReplicaScene(Scene):
    c: ReplicaCluster

    def verify_and_gc(self) -> dict:
        assert self.c.cli_json("verify")["ok"]
        gc = self.c.cli_json("gc")
        assert self.c.cli_json("verify")["ok"]
        self.c.stop_all()  # every replica: only then may the test open the store
        with self.c.open_repository() as repo:
            names = set()
            for g in repo.catalog.generations():
                assert g.state is not State.PREPARING
                if g.state is State.COMMITTED:
                    names.add(g.manifest)
            on_disk = {o.name for o in repo.backend.list(Kind.MANIFESTS)}
            assert on_disk == names, f"orphan manifests: {on_disk - names}"
        return gc


@pytest.fixture
def replicas(tmp_path: Path, etcd: EtcdServer) -> Iterator[Callable[..., ReplicaCluster]]:
    made: list[ReplicaCluster] = []

    def make(**kw: object) -> ReplicaCluster:
        root = tmp_path / f"ha{len(made)}"
        root.mkdir(parents=True)
        kw.setdefault("nodes", ("node-a", "node-b"))
        c = ReplicaCluster(root, etcd_url=etcd.url, **kw)  # type: ignore[arg-type]
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.close()


def _scene(c: ReplicaCluster, target_factory: Callable[..., Target], tmp: Path) -> ReplicaScene:
    c.start()
    return ReplicaScene(c, target_factory(maps=["data:64"]), target_factory(maps=["data:64"]), tmp)


def _after_failover(scene: ReplicaScene, old: int) -> None:
    """Agents back on the new leader; nothing lost; the next generation exact."""
    c = scene.c
    c.wait_agents(["node-a", "node-b"], timeout=60)
    scene.wait_ready()
    scene.no_partial_generation()
    r = scene.next_generation_exact()
    assert not r["full"], "agents survived: the next generation is incremental"
    new = c.leader()
    assert new is not None and new != old
    scene.verify_and_gc()


def test_leader_killed_while_idle(
    replicas: Callable[..., ReplicaCluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    c = replicas()
    scene = _scene(c, target_factory, tmp_path)
    old = c.leader()
    assert old == 0
    t0 = time.monotonic()
    c.kill_replica(old)
    c.wait_leader(exclude={old}, timeout=30)
    took = time.monotonic() - t0
    assert took < FAILOVER_S, f"a new leader served only after {took:.1f} s"
    # The list still names the dead leader first: the CLI goes on to the others.
    assert c.address.split(",")[0] == c.replica_address(old)
    assert c.cli_json("jobs", "--job", "job")["jobs"][0]["job"] == "job"
    _after_failover(scene, old)


@pytest.mark.parametrize("point", ["coordinator.upload", "coordinator.commit.manifest"])
def test_leader_killed_during_a_checkpoint(
    replicas: Callable[..., ReplicaCluster],
    target_factory: Callable[..., Target],
    tmp_path: Path,
    point: str,
) -> None:
    # Generation 1 (the scene's) uploads twice and commits once: pause in generation 2.
    c = replicas(first_pause=[f"{point}@{3 if point == 'coordinator.upload' else 2}"])
    scene = _scene(c, target_factory, tmp_path)
    old = c.leader()
    assert old == 0
    proc = scene.start_checkpoint()
    c.wait_fault(point)
    t0 = time.monotonic()
    c.kill_replica(old)
    assert scene.wait_running(LEASE_MS / 1000) < LEASE_MS / 1000
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 70, (out, err)  # CoordinatorUnavailable: the stream broke
    c.wait_leader(exclude={old}, timeout=30)
    took = time.monotonic() - t0
    assert took < FAILOVER_S, f"a new leader served only after {took:.1f} s"
    _after_failover(scene, old)
