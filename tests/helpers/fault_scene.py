"""The scene of the all-or-nothing tests with real daemons (test_e2e_faults.py,
test_ha_failover.py): two nodes, one member each, generation 1 committed, both memories
changed since; and the checks every fault case ends with.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from coordinator.store import Kind
from coordinator.store.catalog import State
from cpcoord.image import load_image, region_bytes
from testbed.cluster import Cluster
from testbed.daemons import REPO, daemon_env, wait_for
from testbed.driver import Target, task_states

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
