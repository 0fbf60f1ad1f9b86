"""All or nothing with real daemons (issue 4, must-show 2).

A daemon is told (CPCOORD_FAULT_PAUSE, cpcoord/faults.py) to stop dead at a named point
of generation 2, the test waits until it is there and sends SIGKILL:
- an agent during freeze, during capture (its member frozen), during upload;
- the coordinator during upload and during commit (packs stored; manifest stored,
  catalog not flipped), then it is restarted on the same port.
In every case: no partial generation is visible (generation 2 is aborted or absent, and
cannot be exported), every member runs again within the lease, the next checkpoint
commits and exports exactly (including pages changed before the failed generation,
which the surviving agents kept as pending), verify passes, and gc reclaims the
leftovers: afterwards the store's index holds exactly the chunks the kept manifests
reference, and no manifest is orphaned.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from coordinator.store import Kind
from coordinator.store.catalog import State
from cpcoord.image import load_image, region_bytes
from testbed.cluster import Cluster
from testbed.daemons import REPO, daemon_env, wait_for
from testbed.driver import Target, task_states

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LEASE_MS = 3000


class Scene:
    """Two nodes, one member each, generation 1 committed, both memories changed since."""

    def __init__(self, c: Cluster, ta: Target, tb: Target, tmp: Path) -> None:
        self.c, self.ta, self.tb, self.tmp = c, ta, tb, tmp
        for name, t, node in (("ma", ta, "node-a"), ("mb", tb, "node-b")):
            m = t.mapping("data")
            c.cli(
                "attach",
                "--job",
                "job",
                "--member",
                name,
                "--pid",
                str(t.pid),
                "--node",
                node,
                "--range",
                f"{m.addr:#x}-{m.end:#x}",
            )
        assert c.cli_json("checkpoint", "--job", "job")["state"] == "committed"
        self.committed = [1]  # visible generations, newest first
        ta.cmd("write", name="data", page=0, count=64, counter=2)
        tb.cmd("write", name="data", page=8, count=16, counter=2)

    def start_checkpoint(self) -> subprocess.Popen[str]:
        argv = [
            sys.executable,
            "-m",
            "cpcoord",
            "checkpoint",
            "--job",
            "job",
            "--json",
            "--lease-ms",
            str(LEASE_MS),
            "--coordinator",
            self.c.address,
        ]
        return subprocess.Popen(
            argv,
            cwd=REPO,
            env=daemon_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_running(self, timeout: float) -> float:
        """Seconds until no thread of either member is stopped."""
        t0 = time.monotonic()

        def running() -> bool:
            return not any(
                s in "tT" for t in (self.ta, self.tb) for s in task_states(t.pid).values()
            )

        wait_for(running, timeout, "every member running")
        return time.monotonic() - t0

    def wait_ready(self) -> None:
        wait_for(lambda: self.c.members_running("job"), 60, "members attached and running")

    def warm_up(self) -> None:
        """One committed generation on the restarted daemon (agents arm their trackers
        on a member's first capture), then fresh changes for the faulted one."""
        assert self.c.cli_json("checkpoint", "--job", "job")["state"] == "committed"
        self.committed.insert(0, self.committed[0] + 1)
        self.ta.cmd("write", name="data", page=0, count=64, counter=4)
        self.tb.cmd("write", name="data", page=20, count=16, counter=4)

    def no_partial_generation(self) -> None:
        bad = self.committed[0] + 1
        gens = self.c.cli_json("generations", "--job", "job", "--all")["generations"]
        by = {g["generation"]: g for g in gens}
        assert all(by[n]["state"] == "committed" for n in self.committed)
        assert bad not in by or by[bad]["state"] == "aborted", by.get(bad)
        visible = self.c.cli_json("generations", "--job", "job")["generations"]
        assert [g["generation"] for g in visible] == self.committed
        r = self.c.cli(
            "export",
            "--job",
            "job",
            "--generation",
            str(bad),
            "--out",
            str(self.tmp / "never"),
            check=False,
        )
        assert r.returncode in (66, 67), r.stderr  # NoSuchGeneration / not committed
        assert not (self.tmp / "never" / "image.json").exists()

    def next_generation_exact(self) -> dict:
        # Make every page uploaded for generation 2 garbage: new content everywhere.
        self.ta.cmd("write", name="data", page=0, count=64, counter=3)
        self.tb.cmd("write", name="data", page=40, count=4, counter=3)
        r = self.c.cli_json("checkpoint", "--job", "job")
        assert r["state"] == "committed", r
        out = self.tmp / f"export-{r['generation']}"
        self.c.cli("export", "--job", "job", "--out", str(out))
        im = load_image(out)
        for name, t in (("ma", self.ta), ("mb", self.tb)):
            (reg,) = im.member(name).regions
            got = np.asarray(region_bytes(im, name, reg.name))
            assert np.array_equal(got, t.read("data")), f"member {name} differs"
        return r

    def verify_and_gc(self) -> dict:
        assert self.c.cli_json("verify")["ok"]
        gc = self.c.cli_json("gc")
        assert self.c.cli_json("verify")["ok"]
        self.c.coordinator.stop()  # type: ignore[union-attr]
        with self.c.open_repository() as repo:
            live: set[bytes] = set()
            names = set()
            for g in repo.catalog.generations():
                assert g.state is not State.PREPARING
                if g.state is State.COMMITTED:
                    names.add(g.manifest)
                    ids = repo.load_manifest(g.manifest or "").chunk_ids()
                    live |= {ids[i].tobytes() for i in range(ids.size)}
            on_disk = {o.name for o in repo.backend.list(Kind.MANIFESTS)}
            assert on_disk == names, f"orphan manifests: {on_disk - names}"
            indexed = set()
            for ns in repo.index.namespaces.values():
                ids, _ = ns.all()
                indexed |= {ids[i].tobytes() for i in range(ids.size)}
            assert indexed == live, f"{len(indexed - live)} dead chunks left in the index"
        return gc


@pytest.fixture
def scene(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> Scene:
    c = cluster_factory(nodes=("node-a", "node-b"))
    return Scene(c, target_factory(maps=["data:64"]), target_factory(maps=["data:64"]), tmp_path)


def _agent_killed(scene: Scene, point: str, warm_up: bool = True) -> None:
    c = scene.c
    c.restart_agent("node-a", pause=[f"{point}@2" if warm_up else point])
    scene.wait_ready()
    if warm_up:
        scene.warm_up()
    proc = scene.start_checkpoint()
    c.wait_fault(point)
    if point != "agent.upload":
        assert any(s in "tT" for s in task_states(scene.ta.pid).values()), "member not frozen"
    c.agents["node-a"].kill()
    took = scene.wait_running(LEASE_MS / 1000 + 2)
    assert took < LEASE_MS / 1000, f"members ran again only after {took:.1f}s"
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 52, (out, err)  # GenerationAborted
    assert json.loads(out)["reason"] == "agent_lost"
    scene.no_partial_generation()
    c.start_agent("node-a")
    scene.wait_ready()
    scene.next_generation_exact()
    gc = scene.verify_and_gc()
    if point == "agent.upload":
        assert gc["chunks_dropped"] > 0


@pytest.mark.parametrize("point", ["agent.freeze", "agent.capture", "agent.upload"])
def test_agent_killed(scene: Scene, point: str) -> None:
    """The agent dies in the middle of a generation after its trackers are armed."""
    _agent_killed(scene, point)


def test_agent_killed_during_the_capture_that_arms_its_tracker(scene: Scene) -> None:
    """The first capture of a member arms its tracker inside the frozen window (uffd-wp:
    syscalls injected over ptrace). An agent dying right then must not take the member
    down with it (this once killed it: a pending SIGTRAP; fixed in nodeagent/inject.py)."""
    _agent_killed(scene, "agent.capture", warm_up=False)


@pytest.mark.parametrize(
    "point", ["coordinator.upload", "coordinator.commit.packs", "coordinator.commit.manifest"]
)
def test_coordinator_killed(scene: Scene, point: str) -> None:
    c = scene.c
    assert c.coordinator is not None
    c.coordinator.stop()
    c.start_coordinator(pause=[point])
    c.wait_agents(["node-a", "node-b"])
    scene.wait_ready()
    proc = scene.start_checkpoint()
    c.wait_fault(point)
    c.coordinator.kill()
    assert scene.wait_running(LEASE_MS / 1000) < LEASE_MS / 1000
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 70, (out, err)  # CoordinatorUnavailable: the stream broke
    c.start_coordinator()
    c.wait_agents(["node-a", "node-b"], timeout=60)
    scene.wait_ready()
    scene.no_partial_generation()
    r = scene.next_generation_exact()
    assert not r["full"], "agents survived: the next generation is incremental"
    gc = scene.verify_and_gc()
    if point != "coordinator.upload":  # mid-upload, the chunks were in an unsealed pack:
        assert gc["chunks_dropped"] > 0  # they died with the process, nothing to reclaim
    if point == "coordinator.commit.manifest":
        assert gc["orphan_manifests"] == 1
