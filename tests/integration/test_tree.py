"""Process trees through the real coordinator and agent (`cpcoord attach --tree`).

A C program (tests/helpers/c/tree_target.c) forks a child that shares memory with it:
shared anonymous memory, a SysV segment or a memfd; each process also has a private
region, and both write their private region and their half of the shared object on
command. Attached with `--tree` (the parent as member `t`, the child as `t.<pid>`):
- a checkpoint freezes both and stores the shared object once: the child's region over
  it lists no page and its manifest names the parent as the object's owner;
- after both processes wrote everything, `cpcoord restore` rolls the tree back in place:
  each process finds its private region and the whole shared object at the cut, and they
  keep running (their own check, then more work); the restore wrote the shared object
  once (the child's member wrote none of it);
- a child forked after a checkpoint is a member after the next one and captured from
  then on, and frozen with the tree at that next one already; an exited child is dropped
  and checkpoints go on;
- a restore of part of the group is refused (the group is frozen whole or not at all).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.store import manifest_io
from coordinator.store.manifest import Manifest, MemberMap, RegionMap
from testbed.cluster import Cluster, attach_args
from testbed.daemons import REPO, daemon_env
from tests.helpers.restore_c import C_DIR, CProcess, build_c
from tests.helpers.traceless import userfaultfds

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TREE_TARGET = C_DIR / "tree_target.c"
PAGES = 32
PAGE = 4096


class TreeTarget(CProcess):
    def __init__(self, exe: Path, kind: str) -> None:
        super().__init__([str(exe), kind, str(PAGES)])
        self.shared = int(self.first[1], 16)
        self.priv = int(self.first[2], 16)
        self.kids = [int(self.first[3])]

    def send(self, text: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()
        return self.line()

    def close(self) -> None:
        for k in self.kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(k, signal.SIGKILL)
        super().close()


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(TREE_TARGET, tmp_path_factory.mktemp("c"))


@pytest.fixture
def cluster(cluster_factory: Callable[..., Cluster]) -> Cluster:
    return cluster_factory(nodes=("node-a",))


@pytest.fixture
def spawn(exe: Path) -> Iterator[Callable[[str], TreeTarget]]:
    made: list[TreeTarget] = []

    def make(kind: str) -> TreeTarget:
        t = TreeTarget(exe, kind)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def _checkpoint(c: Cluster, job: str) -> int:
    r = c.cli_json("checkpoint", "--job", job)
    assert r["state"] == "committed", r
    return int(r["generation"])


def _members(c: Cluster, job: str) -> dict[str, int]:
    (j,) = c.cli_json("jobs", "--job", job)["jobs"]
    return {m["name"]: int(m["pid"]) for m in j["members"]}


def _manifest(c: Cluster, job: str, gen: int) -> Manifest:
    for name, data in c.store_objects():
        if name.startswith("manifests/"):
            m = manifest_io.decode(data, name)
            if m.job == job and m.generation == gen:
                return m
    raise AssertionError(f"no manifest of {job} generation {gen}")


def _region_at(m: MemberMap, addr: int) -> RegionMap:
    for r in m.regions:
        if r.start <= addr < r.end:
            return r
    raise AssertionError(f"{m.name}: no region holds {addr:#x}")


def _pages_in(r: RegionMap, start: int, end: int) -> int:
    pages = r.pages.expand()[0].astype(int) + (r.start // PAGE)
    return int(((pages >= start // PAGE) & (pages < end // PAGE)).sum())


@pytest.mark.parametrize("kind", ["anon", "sysv", "memfd"])
def test_tree_rolled_back_in_place_shared_memory_once(
    cluster: Cluster, spawn: Callable[[str], TreeTarget], kind: str
) -> None:
    t = spawn(kind)
    child = f"t.{t.kids[0]}"
    cluster.cli(*attach_args("j", "t", t.pid, "node-a"), "--tree")
    assert _members(cluster, "j") == {"t": t.pid, child: t.kids[0]}
    (j,) = cluster.cli_json("jobs", "--job", "j")["jobs"]
    assert {m["name"]: m["group"] for m in j["members"]} == {"t": "t", child: "t"}

    assert t.send("check") == "ok 1"
    g1 = _checkpoint(cluster, "j")
    man = _manifest(cluster, "j", g1)
    span = (t.shared, t.shared + PAGES * PAGE)
    # Stored once: by the root; the child's region over it lists no page and names it.
    parent_r = _region_at(man.member("t"), t.shared)
    child_r = _region_at(man.member(child), t.shared)
    assert _pages_in(parent_r, *span) == PAGES
    assert _pages_in(child_r, *span) == 0
    owners = {f.owner for f in child_r.mappings if f.start < span[1] and f.end > span[0]}
    assert owners == {"t"}, child_r.mappings
    assert all(not f.owner for f in parent_r.mappings)
    # Each process's private region is its own (the child's is not the parent's).
    assert _pages_in(_region_at(man.member(child), t.priv), t.priv, t.priv + PAGES * PAGE)

    # Both processes write everything, then the tree is rolled back in place.
    assert t.send("write 2") == "ok"
    assert t.send("check") == "ok 2"
    r = cluster.cli_json("restore", "--job", "j", "--generation", str(g1))
    assert r["state"] == "restored", r
    written = {m["member"]: m["pages"] for m in r["members"]}
    assert set(written) == {"t", child}, r
    # Written once: the child's member writes only pages of its own manifest, none of
    # them in the shared object; the root's wrote the object (every page of it changed).
    child_pages = sum(rr.pages.page_count for rr in man.member(child).regions)
    assert 0 < written[child] <= child_pages, (written, child_pages)
    assert written["t"] >= PAGES, written
    assert t.send("check") == "ok 1", "not back at the cut"
    # They keep running, with the shared object and private memory working.
    assert t.send("write 3") == "ok"
    assert t.send("check") == "ok 3"
    assert t.proc.poll() is None
    g2 = _checkpoint(cluster, "j")
    assert g2 > g1
    assert t.send("quit") == "bye"
    assert t.proc.wait(30) == 0


def test_new_child_joins_at_next_checkpoint_and_exited_child_is_dropped(
    cluster: Cluster, spawn: Callable[[str], TreeTarget]
) -> None:
    t = spawn("anon")
    first = f"t.{t.kids[0]}"
    cluster.cli(*attach_args("j", "t", t.pid, "node-a"), "--tree")
    g1 = _checkpoint(cluster, "j")
    assert {m.name for m in _manifest(cluster, "j", g1).members} == {"t", first}

    # A restore of part of the group is refused with the reason; nothing is harmed.
    r = cluster.cli_json(
        "restore", "--job", "j", "--generation", str(g1), "--member", "t", check=False
    )
    assert r["state"] == "aborted" and "frozen in part" in r["detail"], r
    assert t.send("check") == "ok 1"

    got = t.send("fork").split()
    assert got[0] == "child", got
    kid = int(got[1])
    t.kids.append(kid)
    second = f"t.{kid}"
    # Found at the next checkpoint's Freeze: a member from then on, captured at the one
    # after it, its share of the shared object left to the root.
    _checkpoint(cluster, "j")
    assert _members(cluster, "j") == {"t": t.pid, first: t.kids[0], second: kid}
    g3 = _checkpoint(cluster, "j")
    man = _manifest(cluster, "j", g3)
    assert {m.name for m in man.members} == {"t", first, second}
    r = _region_at(man.member(second), t.shared)
    assert _pages_in(r, t.shared, t.shared + PAGES * PAGE) == 0
    assert {f.owner for f in r.mappings} == {"t"}

    # A child that exits is dropped; the tree goes on being checkpointed.
    os.kill(kid, signal.SIGKILL)
    t.kids.remove(kid)
    end = time.monotonic() + 30
    while second in _members(cluster, "j") and time.monotonic() < end:
        time.sleep(0.1)
    assert set(_members(cluster, "j")) == {"t", first}
    g5 = _checkpoint(cluster, "j")
    assert {m.name for m in _manifest(cluster, "j", g5).members} == {"t", first}


def test_tree_survives_an_agent_restart(
    cluster: Cluster, spawn: Callable[[str], TreeTarget]
) -> None:
    """A restarted agent holds nothing: the coordinator re-attaches the root (whose
    rescan finds the child again) and the child in its group; the tree checkpoints and
    rolls back as before, the shared object still stored once."""
    t = spawn("memfd")
    child = f"t.{t.kids[0]}"
    cluster.cli(*attach_args("j", "t", t.pid, "node-a"), "--tree")
    _checkpoint(cluster, "j")
    cluster.restart_agent("node-a")
    end = time.monotonic() + 30
    while time.monotonic() < end and not cluster.members_running("j"):
        time.sleep(0.1)
    assert cluster.members_running("j")
    assert _members(cluster, "j") == {"t": t.pid, child: t.kids[0]}
    g2 = _checkpoint(cluster, "j")
    man = _manifest(cluster, "j", g2)
    r = _region_at(man.member(child), t.shared)
    assert _pages_in(r, t.shared, t.shared + PAGES * PAGE) == 0
    assert t.send("write 4") == "ok"
    r2 = cluster.cli_json("restore", "--job", "j", "--generation", str(g2))
    assert r2["state"] == "restored", r2
    assert t.send("check") == "ok 1"


def test_owner_moves_when_the_root_unmaps(
    cluster: Cluster, spawn: Callable[[str], TreeTarget]
) -> None:
    """The root unmaps the shared object after a generation: at the next one the child
    owns it and stores all of it (a full capture), and a rollback to that generation
    through the child brings the object back."""
    t = spawn("sysv")
    child = f"t.{t.kids[0]}"
    cluster.cli(*attach_args("j", "t", t.pid, "node-a"), "--tree")
    g1 = _checkpoint(cluster, "j")
    assert (
        _pages_in(
            _region_at(_manifest(cluster, "j", g1).member(child), t.shared),
            t.shared,
            t.shared + PAGES * PAGE,
        )
        == 0
    )
    assert t.send("unmap") == "ok"
    assert t.send("write 2") == "ok"
    g2 = _checkpoint(cluster, "j")
    man = _manifest(cluster, "j", g2)
    r = _region_at(man.member(child), t.shared)
    assert _pages_in(r, t.shared, t.shared + PAGES * PAGE) == PAGES
    assert all(not f.owner for f in r.mappings)
    assert all(not (reg.start <= t.shared < reg.end) for reg in man.member("t").regions)
    assert t.send("write 3") == "ok"
    assert t.send("check") == "ok 3"
    r2 = cluster.cli_json("restore", "--job", "j", "--generation", str(g2))
    assert r2["state"] == "restored", r2
    assert t.send("check") == "ok 2"


def test_detaching_the_root_detaches_the_tree(
    cluster: Cluster, spawn: Callable[[str], TreeTarget]
) -> None:
    """`cpcoord detach` of a root takes its group with it: no member is left in the job,
    no process of the tree holds the tracker's userfaultfd, and both keep working."""
    t = spawn("anon")
    child = f"t.{t.kids[0]}"
    cluster.cli(*attach_args("j", "t", t.pid, "node-a"), "--tree")
    _checkpoint(cluster, "j")
    _checkpoint(cluster, "j")  # incremental: the uffd-wp tracker is armed in both
    assert set(_members(cluster, "j")) == {"t", child}
    armed = [p for p in (t.pid, t.kids[0]) if userfaultfds(p)]
    cluster.cli("detach", "--job", "j", "--member", "t")
    jobs = cluster.cli_json("jobs", "--job", "j")["jobs"]
    assert all(not j["members"] for j in jobs), jobs
    for pid in armed:
        assert userfaultfds(pid) == [], f"pid {pid} still holds the tracker's uffd"
    assert t.send("write 5") == "ok"
    assert t.send("check") == "ok 5"


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("State:"))


def test_a_child_found_at_a_freeze_is_frozen_with_its_tree(
    cluster: Cluster, spawn: Callable[[str], TreeTarget]
) -> None:
    """A child forked since the last generation is not in the next one, but it shares
    memory with the tree: it is frozen with the group (so nothing of the group writes
    while the group is copied) and thawed with it, and it is a member from then on."""
    t = spawn("anon")
    first = f"t.{t.kids[0]}"
    cluster.cli(*attach_args("j", "t", t.pid, "node-a"), "--tree")
    _checkpoint(cluster, "j")
    # The agent will pause once every member of the next Freeze is frozen.
    cluster.restart_agent("node-a", pause=["agent.freeze"])
    cluster.wait_agents(["node-a"])
    end = time.monotonic() + 30
    while time.monotonic() < end and not cluster.members_running("j"):
        time.sleep(0.1)
    got = t.send("fork").split()  # after the re-attach: found at the Freeze's rescan
    assert got[0] == "child", got
    kid = int(got[1])
    t.kids.append(kid)
    argv = [sys.executable, "-m", "cpcoord", "checkpoint", "--job", "j", "--json",
            "--coordinator", cluster.address]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=REPO, env=daemon_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        cluster.wait_fault("agent.freeze")
        states = {p: _state(p) for p in (t.pid, t.kids[0], kid)}
        assert all(s.startswith("t") for s in states.values()), states
    finally:
        cluster.agents["node-a"].kill()  # its tracees are let go
        proc.communicate(timeout=60)
    cluster.start_agent("node-a")
    cluster.wait_agents(["node-a"])
    end = time.monotonic() + 30
    while time.monotonic() < end and not cluster.members_running("j"):
        time.sleep(0.1)
    assert _members(cluster, "j") == {"t": t.pid, first: t.kids[0], f"t.{kid}": kid}
    assert t.send("write 3") == "ok"
    assert t.send("check") == "ok 3"
    g = _checkpoint(cluster, "j")
    assert {m.name for m in _manifest(cluster, "j", g).members} == {"t", first, f"t.{kid}"}
