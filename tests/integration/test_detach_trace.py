"""Releasing a member leaves no trace in it (docs/uffd-wp.md, "Leaving no trace"): after
`cpcoord detach`, after the agent's shutdown (SIGTERM), after an agent killed with
SIGKILL is started again, and after `cpcoord capture --tracker none` on a process an
earlier capture chain armed, the target holds no userfaultfd (readlink of every fd), no
mapping keeps `uw`, every thread's SigBlk/SigIgn/SigCgt is as before, and it runs on:
its steps keep growing, and its own checks of memory, registers and signal state
(tests/helpers/c/detach_target.c) hold to its end. Real coordinator and agent daemons.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed.cluster import Cluster, attach_args
from testbed.daemons import REPO, daemon_env, wait_for
from tests.helpers.traceless import Traceless, build

pytestmark = [pytest.mark.integration, pytest.mark.slow]
JOB = "trace"


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("c"))


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own RUN_DIR (records of armed fds, chain heads): agents of other
    tests on this machine never see them, nor we theirs. Daemons inherit it."""
    d = tmp_path / "run"
    monkeypatch.setenv("CPCOORD_RUN_DIR", str(d))
    return d


@pytest.fixture
def target(exe: Path) -> Iterator[Traceless]:
    t = Traceless(exe)
    try:
        yield t
    finally:
        t.kill()


def armed(c: Cluster, t: Traceless) -> dict[int, dict[str, str]]:
    """Attach `t`, take a full and an incremental generation (arm, then collect through
    the uffd); its signal state from before."""
    before = t.signal_state()
    c.cli(*attach_args(JOB, "m", t.pid, "node-a", [t.span]))
    for full in (True, False):
        g = c.cli_json("checkpoint", "--job", JOB)
        assert g["state"] == "committed" and g["full"] == full, g
    assert len(t.uffds()) == 1 and t.uw_mappings() > 0  # the tracker is in there
    return before


def untouched(t: Traceless, before: dict[int, dict[str, str]]) -> None:
    assert t.uffds() == []
    assert t.uw_mappings() == 0
    assert t.signal_state() == before
    assert t.progresses()
    assert t.finish() > 0  # its own checks held to the end


def test_detach_closes_the_uffd(
    cluster_factory: Callable[..., Cluster], run_dir: Path, target: Traceless
) -> None:
    c = cluster_factory(nodes=("node-a",))
    before = armed(c, target)
    c.cli("detach", "--job", JOB, "--member", "m")
    untouched(target, before)
    assert not list((run_dir / "armed").glob("*.json"))  # nothing left to sweep


def test_agent_sigterm_closes_the_uffd(
    cluster_factory: Callable[..., Cluster], run_dir: Path, target: Traceless
) -> None:
    c = cluster_factory(nodes=("node-a",))
    before = armed(c, target)
    c.agents["node-a"].stop()  # SIGTERM, waits for the exit
    untouched(target, before)
    assert not list((run_dir / "armed").glob("*.json"))


def test_agent_sigkill_leftover_is_closed_by_the_next_agent(
    cluster_factory: Callable[..., Cluster], run_dir: Path, target: Traceless
) -> None:
    """A killed agent cannot clean up: its uffd stays until an agent starts on this
    machine again; that one closes it before serving, and the member (re-attached by
    the coordinator) is tracked again from a full generation, exactly."""
    c = cluster_factory(nodes=("node-a",))
    before = armed(c, target)
    c.agents["node-a"].kill()
    assert len(target.uffds()) == 1  # nothing could close it
    c.cli("detach", "--job", JOB, "--member", "m")  # nobody wants it any more
    c.start_agent("node-a")
    c.wait_agents(["node-a"])
    wait_for(lambda: target.uffds() == [], 20, "the left-over uffd closed")
    untouched(target, before)
    assert not list((run_dir / "armed").glob("*.json"))  # its record went with it


def test_agent_sigkill_then_rearm_tracks_again(
    cluster_factory: Callable[..., Cluster], run_dir: Path, target: Traceless
) -> None:
    """The member the coordinator re-attaches is armed anew (a full generation), not
    left to a dead agent's uffd that would make every mapping EBUSY for the new one."""
    c = cluster_factory(nodes=("node-a",))
    armed(c, target)
    c.agents["node-a"].kill()
    assert len(target.uffds()) == 1
    c.start_agent("node-a")
    c.wait_agents(["node-a"])
    wait_for(lambda: c.members_running(JOB), 20, "member re-attached")
    for full in (True, False):
        g = c.cli_json("checkpoint", "--job", JOB)
        assert g["state"] == "committed" and g["full"] == full, g
    assert len(target.uffds()) == 1  # the new agent's, and only it
    g = c.cli_json("checkpoint", "--job", JOB)
    # Incremental through the new uffd: the pages written since (tens a second), not
    # every page as when the dead agent's uffd kept the mapping (untracked: EBUSY).
    assert not g["full"] and g["pages_captured"] < target.npages // 2, g
    c.cli("detach", "--job", JOB, "--member", "m")
    assert target.uffds() == [] and target.progresses()
    assert target.finish() > 0


def capture(t: Traceless, out: Path, *args: str) -> dict[str, object]:
    import json

    argv = [sys.executable, "-m", "cpcoord", "capture", "--pid", str(t.pid), "--out", str(out)]
    r = subprocess.run(
        [*argv, *args, "--json"], cwd=REPO, env=daemon_env(), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    doc: dict[str, object] = json.loads(r.stdout)
    return doc


@pytest.mark.parametrize("tracker", ["none", "hash"])
def test_capture_without_uffd_releases_a_chain(
    run_dir: Path, target: Traceless, tmp_path: Path, tracker: str
) -> None:
    before = target.signal_state()
    capture(target, tmp_path / "d1", "--tracker", "uffd-wp")
    capture(target, tmp_path / "d2", "--parent", str(tmp_path / "d1"))
    assert len(target.uffds()) == 1
    doc = capture(target, tmp_path / "d3", "--tracker", tracker)
    assert doc["tracker"] == tracker
    untouched(target, before)


# A process that attaches itself through the local API (cpcoord.client), checkpoints
# (which arms uffd-wp in it), prints its userfaultfds, and on each stdin line reports them
# again: "uffds N,N" lines.
SELF_ATTACHING = r"""
import os, sys
from cpcoord.client import Client, empty
def uffds():
    fds = []
    for n in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{n}") == "anon_inode:[userfaultfd]":
                fds.append(n)
        except OSError:
            pass
    return ",".join(sorted(fds)) or "-"
a = empty(64 * 512, "float64")
a[:] = 1.5
c = Client()
c.register("a", a)
c.checkpoint()
a[:100] = 2.5
c.checkpoint()
print("uffds", uffds(), flush=True)
for line in sys.stdin:
    if line.strip() == "unregister":
        c.unregister("a")
    print("uffds", uffds(), flush=True)
"""


def ask(p: subprocess.Popen[str], line: str = "") -> str:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(line + "\n")
    p.stdin.flush()
    words = p.stdout.readline().split()
    assert words[:1] == ["uffds"], words
    return words[1]


@pytest.mark.parametrize("how", ["unregister", "agent-sigterm"])
def test_local_api_member_released(
    cluster_factory: Callable[..., Cluster], run_dir: Path, tmp_path: Path, how: str
) -> None:
    """The local API's paths: a process that unregisters its last region is detached
    (through the coordinator), and the agent serving the socket stops (SIGTERM): either
    way the process keeps no userfaultfd."""
    sock = tmp_path / "agent.sock"
    c = cluster_factory(nodes=())
    c.start_agent("node-a", args=["--socket", str(sock)])
    c.wait_agents(["node-a"])
    wait_for(sock.exists, 20, "the local API socket")
    env = daemon_env({"CPCOORD_AGENT_SOCKET": str(sock), "CPCOORD_JOB": JOB,
                      "CPCOORD_MEMBER": "self"})  # fmt: skip
    p = subprocess.Popen([sys.executable, "-c", SELF_ATTACHING], env=env, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert p.stdout is not None
        words = p.stdout.readline().split()
        assert words[:1] == ["uffds"] and words[1] != "-", words  # armed in it
        if how == "unregister":
            assert ask(p, "unregister") == "-"
        else:
            c.agents["node-a"].stop()
            assert ask(p) == "-"
    finally:
        p.kill()
        p.wait()
