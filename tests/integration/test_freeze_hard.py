"""Processes that are hard to freeze, through the real agent and coordinator, the capture
CLI and the freeze itself (tests/helpers/c/freeze_target.c checks its own memory):

- a member blocked in vfork() (its child sleeps longer than the freeze may take): the
  checkpoint aborts, and the member is never left stopped: it runs again as soon as its
  child exits (within the lease + 1 s), and if it is killed meanwhile its parent reaps
  it at once (the agent must not keep it as a traced zombie);
- threads exiting in a tight loop while we freeze: never a (false) permission denied,
  and never a thread left stopped;
- a process whose leader called pthread_exit: live, attached, checkpointed and captured
  exactly, and it runs on;
- a process another tracer holds: a clear PermissionDenied, and it is left as it was.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from cpcoord.errors import PermissionDenied
from cpcoord.image import load_image, region_bytes
from nodeagent.proc.freeze import frozen
from nodeagent.proc.procfs import ProcessIdentity
from testbed.cluster import Cluster, attach_args
from testbed.daemons import REPO, daemon_env, wait_for
from tests.conftest import require
from tests.helpers.freeze_c import FreezeTarget, build_freeze_target, states, stopped

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LEASE_MS = 3000
CHILD_MS = 8000  # longer than two of the agent's freezes take (min(5 s, lease))
KILLED_CHILD_MS = 30000  # killed long before its child exits
CLI_CHILD_MS = 10000  # longer than the CLI's start and 5 s freeze timeout


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_freeze_target(tmp_path_factory.mktemp("c"))


@pytest.fixture
def make(exe: Path) -> Iterator[Callable[..., FreezeTarget]]:
    made: list[FreezeTarget] = []

    def start(mode: str, pages: int, *args: int) -> FreezeTarget:
        t = FreezeTarget(exe, mode, pages, *args)
        made.append(t)
        return t

    yield start
    for t in made:
        t.close()


def attach(c: Cluster, t: FreezeTarget, member: str = "m", job: str = "job") -> None:
    c.cli(*attach_args(job, member, t.pid, "node-a", [(t.addr, t.end)]))


def checkpoint(c: Cluster, job: str = "job") -> dict:
    r = c.cli("checkpoint", "--job", job, "--json", "--lease-ms", str(LEASE_MS), check=False)
    return json.loads(r.stdout)


def exited(pid: int) -> bool:
    """The process finished (a zombie its parent has not reaped yet, or gone)."""
    return all(s in "ZX" for s in states(pid).values())


def assert_runs(t: FreezeTarget, for_s: float = 1.0) -> None:
    """No thread stopped, and it keeps doing work, for a while."""
    deadline = time.monotonic() + for_s
    while time.monotonic() < deadline:
        assert not stopped(t.pid), states(t.pid)
        time.sleep(0.02)
    t.ping()
    t.check()


def exported(c: Cluster, tmp: Path, generation: int, member: str = "m") -> np.ndarray:
    out = tmp / f"export-{generation}"
    c.cli("export", "--job", "job", "--generation", str(generation), "--out", str(out))
    im = load_image(out)
    (reg,) = im.member(member).regions
    return np.asarray(region_bytes(im, member, reg.name))


def test_member_blocked_in_vfork_runs_again_when_its_child_exits(
    cluster_factory: Callable[..., Cluster], make: Callable[..., FreezeTarget], tmp_path: Path
) -> None:
    c = cluster_factory(nodes=("node-a",))
    t = make("vfork", 16, CHILD_MS)
    child = t.child()
    attach(c, t)
    r = checkpoint(c)
    assert (r["state"], r["reason"]) == ("aborted", "freeze_timeout"), r
    # Again, while the agent may still hold it from the first attempt: the same abort,
    # not a "permission denied" from its own hold.
    r = checkpoint(c)
    assert (r["state"], r["reason"]) == ("aborted", "freeze_timeout"), r
    assert not exited(child), "the child exited too soon for this test"
    wait_for(lambda: exited(child), CHILD_MS / 1000 + 20, "the vfork child's exit")
    t0 = time.monotonic()
    t.expect("back", LEASE_MS / 1000 + 1)  # vfork returned: the parent ran
    took = time.monotonic() - t0
    assert took < LEASE_MS / 1000 + 1, took
    assert_runs(t)
    # Nothing of the failed freeze is left: the next checkpoint commits exactly.
    r = checkpoint(c)
    assert r["state"] == "committed", r
    assert np.array_equal(exported(c, tmp_path, r["generation"]), t.expected())
    assert_runs(t, 0.2)
    t.quit()


def test_member_killed_while_blocked_in_vfork_is_reaped(
    cluster_factory: Callable[..., Cluster], make: Callable[..., FreezeTarget]
) -> None:
    c = cluster_factory(nodes=("node-a",))
    t = make("vfork", 16, KILLED_CHILD_MS)
    t.child()
    attach(c, t)
    r = checkpoint(c)
    assert (r["state"], r["reason"]) == ("aborted", "freeze_timeout"), r
    # The abort came at half the lease; the agent's own freeze gives up at the lease
    # (min(5 s, lease)), and lets go of a process that never stopped. Well past that:
    time.sleep(LEASE_MS / 1000 + 2.5)
    assert states(t.pid)[t.pid] == "D", states(t.pid)  # still in vfork
    t.proc.kill()
    # The agent traced it: its exit goes to the agent first, which must hand it back.
    assert t.wait(LEASE_MS / 1000 + 1) == -9


def test_capture_cli_of_a_process_blocked_in_vfork(
    make: Callable[..., FreezeTarget], tmp_path: Path
) -> None:
    """`cpcoord capture` gives up after its freeze timeout and leaves nothing held."""
    t = make("vfork", 16, CLI_CHILD_MS)
    child = t.child()
    argv = [sys.executable, "-m", "cpcoord", "capture", "--pid", str(t.pid)]
    r = subprocess.run(
        [*argv, "--out", str(tmp_path / "img"), "--tracker", "none"],
        cwd=REPO,
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 14, r.stderr  # FreezeFailed
    assert "did not stop" in r.stderr and "vfork" in r.stderr, r.stderr
    wait_for(lambda: exited(child), CLI_CHILD_MS / 1000 + 20, "the vfork child's exit")
    t.expect("back", 1)
    assert_runs(t)
    t.quit()


def test_threads_exiting_while_we_freeze(make: Callable[..., FreezeTarget]) -> None:
    """Threads are created and exit in a tight loop while we freeze the process over and
    over: a thread that exits under the freeze is simply gone, never a permission denied
    (PTRACE_SEIZE answers EPERM for an exiting thread), and none is left stopped."""
    t = make("churn", 4, 8)
    ident = ProcessIdentity.of(t.pid)
    n0 = t.ping()
    for _ in range(1000):
        with frozen(ident, timeout=10) as fp:
            assert fp.tids and fp.pid == t.pid
    assert not stopped(t.pid), states(t.pid)
    assert t.ping() > n0
    t.check()
    t.quit()  # the target checks every thread it created finished


def test_threads_exiting_while_the_agent_checkpoints(
    cluster_factory: Callable[..., Cluster], make: Callable[..., FreezeTarget], tmp_path: Path
) -> None:
    c = cluster_factory(nodes=("node-a",))
    t = make("churn", 16, 8)
    attach(c, t)
    for seed in range(2, 10):
        t.send(f"s {seed}")
        t.expect("ok")
        r = checkpoint(c)
        assert r["state"] == "committed", r
        assert np.array_equal(exported(c, tmp_path, r["generation"]), t.expected(seed))
        assert not stopped(t.pid), states(t.pid)
    t.quit()


def test_process_whose_leader_exited_is_checkpointed(
    cluster_factory: Callable[..., Cluster], make: Callable[..., FreezeTarget], tmp_path: Path
) -> None:
    """The main thread called pthread_exit: the leader is a zombie, /proc/PID/maps is
    empty and PID's memory unreachable, yet the process runs and is checkpointed."""
    c = cluster_factory(nodes=("node-a",))
    t = make("leader-exit", 16)
    wait_for(lambda: states(t.pid).get(t.pid) == "Z", 10, "the leader's exit")
    attach(c, t)
    for seed in (2, 3):
        t.send(f"s {seed}")
        t.expect("ok")
        r = checkpoint(c)
        assert r["state"] == "committed", r
        assert np.array_equal(exported(c, tmp_path, r["generation"]), t.expected(seed))
        assert_runs(t, 0.2)
    # And a local capture, default regions (every writable mapping) included.
    argv = [sys.executable, "-m", "cpcoord", "capture", "--pid", str(t.pid), "--json"]
    for extra in (["--range", f"{t.addr:#x}-{t.end:#x}"], []):
        out = tmp_path / f"img{len(extra)}"
        r2 = subprocess.run(
            [*argv, "--out", str(out), "--tracker", "none", *extra],
            cwd=REPO,
            env=daemon_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r2.returncode == 0, r2.stderr
        im = load_image(out)
        (member,) = im.members
        regs = [g for g in member.regions if g.start <= t.addr and t.end <= g.end]
        assert len(regs) == 1, [(hex(g.start), hex(g.end)) for g in member.regions]
        got = np.asarray(region_bytes(im, member.name, regs[0].name))
        first = (t.addr - regs[0].start) // 4096
        assert np.array_equal(got[first : first + 16], t.expected(3))
    assert_runs(t, 0.2)
    t.quit()


def test_process_traced_by_another_tracer_is_refused_untouched(
    cluster_factory: Callable[..., Cluster], make: Callable[..., FreezeTarget]
) -> None:
    """strace (or gdb) holds it: PermissionDenied names the tracer, nothing is seized."""
    require(shutil.which("strace") is not None, "strace")
    c = cluster_factory(nodes=("node-a",))
    t = make("spin", 4)
    attach(c, t)
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=none", "-p", str(t.pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _tracer(t.pid) == tracer.pid, 10, "strace attached")
        r = checkpoint(c)
        assert r["state"] == "aborted", r
        assert f"already traced by pid {tracer.pid}" in json.dumps(r), r
        refused = pytest.raises(PermissionDenied, match=f"already traced by pid {tracer.pid}")
        with refused, frozen(ProcessIdentity.of(t.pid)):
            pass
        assert _tracer(t.pid) == tracer.pid  # still strace's
        assert_runs(t, 0.2)
    finally:
        tracer.terminate()
        tracer.wait(10)
    wait_for(lambda: _tracer(t.pid) == 0, 10, "strace detached")
    assert checkpoint(c)["state"] == "committed"
    t.quit()


def _tracer(pid: int, tid: int | None = None) -> int:
    with open(f"/proc/{pid}/task/{tid or pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def test_a_thread_traced_elsewhere_releases_the_threads_seized_before(
    make: Callable[..., FreezeTarget],
) -> None:
    """Another tracer holds one thread (not the leader): the freeze is refused on that
    thread and lets go of the ones it had seized already."""
    require(shutil.which("strace") is not None, "strace")
    t = make("spin", 4)
    tid = max(states(t.pid))  # a spinner (it prints "ready" once they run)
    assert tid != t.pid
    tracer = subprocess.Popen(
        ["strace", "-qq", "-e", "trace=none", "-p", str(tid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _tracer(t.pid, tid) == tracer.pid, 10, "strace attached")
        refused = pytest.raises(PermissionDenied, match=f"already traced by pid {tracer.pid}")
        with refused, frozen(ProcessIdentity.of(t.pid)):
            pass
        assert all(_tracer(t.pid, x) == 0 for x in states(t.pid) if x != tid)
        assert_runs(t, 0.2)
    finally:
        tracer.terminate()
        tracer.wait(10)
    t.quit()
