"""The local API through the real agent: a real coordinator
and a real `cpcoord agent --socket`, real processes.

- Restart: the Python example (NumPy state, cpcoord.client) and the C example (the wire
  format by hand) compute, checkpoint themselves, are SIGKILLed, start again, restore
  from the last generation and reach the result of a run that was never interrupted.
- Another user (created by the test) cannot checkpoint or restore another user's
  process, nor a process or job outside its own job, through the socket: each refusal is
  NotPermitted, and nothing changes (no generation of the other jobs, memory unchanged).
"""

from __future__ import annotations

import json
import pwd
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.localapi import (
    EXAMPLE_PY,
    PROBE,
    REFUSED_TO_OTHERS,
    fields,
    first_line,
    python_for,
    uninterrupted_numpy,
)
from tests.helpers.restore_c import C_EXAMPLE, build_c, digest
from tests.helpers.socket_cluster import NODE, SocketCluster, socket_cluster

pytestmark = pytest.mark.integration
__all__ = ["socket_cluster"]  # a fixture, used by name


def _uninterrupted_c(total: int) -> dict[str, str]:
    n = 16 * 4096 // 8 - 1
    data = np.zeros(n, dtype=np.uint64)
    idx = np.arange(n, dtype=np.uint64)
    for s in range(1, total + 1):
        data = data * np.uint64(6364136223846793005) + idx + np.uint64(s)
    want = int(np.bitwise_xor.reduce(data * np.uint64(0x9E3779B97F4A7C15)))
    return {"step": str(total), "digest": str(want)}


def _run_kill_resume(
    sc: SocketCluster, argv: list[str], job: str, member: str, first: int, total: int
) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Run `argv run FIRST` until it checkpointed, SIGKILL it, run `argv resume TOTAL`."""
    env = sc.env(job, member)
    p = subprocess.Popen(
        [*argv, "run", str(first)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        cp = fields(first_line(p, timeout=120))
        time.sleep(0.3)  # it keeps working past the checkpoint: a restart loses that
        assert sc.members(job)[member]["pid"] == p.pid
    finally:
        p.kill()
        p.wait()
    out = subprocess.run(
        [*argv, "resume", str(total)], env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr + sc.cluster.logs()
    restored, result = out.stdout.splitlines()
    return cp, fields(restored), fields(result)


# -- a restart -----------------------------------------------------------------------------


def test_python_numpy_process_restarts_through_the_agent(socket_cluster: SocketCluster) -> None:
    sc = socket_cluster
    cp, restored, result = _run_kill_resume(
        sc, [sys.executable, str(EXAMPLE_PY)], "pyjob", "py-0", 50, 80
    )
    assert cp == {"generation": "1", "step": "50"}
    assert restored == {"generation": "1", "step": "50"}
    assert result == uninterrupted_numpy(80)
    assert sc.generations("pyjob") == [1]
    # The restarted process took the member over (a new pid, on this node).
    m = sc.members("pyjob")["py-0"]
    assert m["node"] == NODE and m["regions"][0]["name"] == "state"


def test_c_process_restarts_through_the_agent(
    socket_cluster: SocketCluster, tmp_path: Path
) -> None:
    sc = socket_cluster
    exe = build_c(C_EXAMPLE, tmp_path)
    cp, restored, result = _run_kill_resume(sc, [str(exe)], "cjob", "c-0", 40, 100)
    assert cp == {"generation": "1", "step": "40"}
    assert restored == {"generation": "1", "step": "40"}
    assert result == _uninterrupted_c(100)
    assert sc.generations("cjob") == [1]


GENERATIONS = r"""
import numpy as np
from cpcoord import client
from cpcoord.errors import NotAMember, RegionMismatch, RegionNotRegistered
c = client.Client(job="self", member="me")
try:
    c.checkpoint()
    raise AssertionError("a checkpoint before register")
except NotAMember:
    pass
a = client.zeros(3000, dtype=np.uint8)  # not a whole page: the rest of it is untouched
b = client.zeros(4096 * 3, dtype=np.uint8)
c.register("a", a)
c.register("b", b)
a[:] = 1
b[:] = 2
assert c.checkpoint() == 1
a[:] = 3
b[:] = 4
assert c.checkpoint(job=True) == 2
a[:] = 9
b[:] = 9
r = c.restore("a", generation=1)
assert r.generation == 1 and r.regions == {"a": 3000}, r
assert (a == 1).all() and (b == 9).all()
r = c.restore()
assert r.generation == 2 and r.nbytes == 3000 + 4096 * 3, r
assert (a == 3).all() and (b == 4).all()
for bad, cls in (("nope", RegionNotRegistered), ("new", RegionMismatch)):
    if bad == "new":
        c.register("new", client.zeros(4096, dtype=np.uint8))
    try:
        c.restore(bad)
        raise AssertionError(bad)
    except cls as e:
        assert bad in str(e), e
c.unregister("b", "new")
print("ok", flush=True)
"""


def test_restore_picks_the_named_generation(socket_cluster: SocketCluster) -> None:
    """Two checkpoints of changing state; restore of generation 1, then of the latest;
    unregister narrows the member on the coordinator."""
    sc = socket_cluster
    out = subprocess.run(
        [sys.executable, "-c", GENERATIONS],
        env=sc.env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr + sc.cluster.logs()
    assert sc.generations("self") == [1, 2]


# -- another user ----------------------------------------------------------------------------

VICTIM = r"""
import mmap, os, sys, time
from cpcoord import client
buf = mmap.mmap(-1, 16384)
buf[:] = os.urandom(16384)
c = client.Client(job=sys.argv[1], member=sys.argv[2])
r = c.register("secret", buf)
gen = c.checkpoint() if sys.argv[3] == "1" else 0
print(f"ready addr={r.address} gen={gen}", flush=True)
time.sleep(300)
"""


def test_another_user_cannot_act_on_other_processes_or_jobs(
    socket_cluster: SocketCluster, other_user: pwd.struct_passwd
) -> None:
    sc = socket_cluster
    uid, gid = other_user.pw_uid, other_user.pw_gid
    exe, path = python_for(other_user)
    # A root process of victim-job, checkpointed once (generation 1).
    victim = subprocess.Popen(
        [sys.executable, "-c", VICTIM, "victim-job", "v0", "1"],
        env=sc.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # A process of the second user itself, in another job of its own (their-job).
    same = subprocess.Popen(
        [exe, "-c", VICTIM, "their-job", "t0", "0"],
        env={**sc.env(), "PYTHONPATH": path},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        user=uid,
        group=gid,
        extra_groups=[],
    )
    try:
        v = fields(first_line(victim, timeout=120))
        fields(first_line(same, timeout=120))
        assert v["gen"] == "1"
        span = [(int(v["addr"]), int(v["addr"]) + 16384)]
        before = digest(victim.pid, span)
        out = subprocess.run(
            [exe, "-c", PROBE, str(victim.pid), str(same.pid)],
            env={**sc.env(), "PYTHONPATH": path},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            user=uid,
            group=gid,
            extra_groups=[],
        )
        assert out.returncode == 0, out.stderr + sc.cluster.logs()
        res = json.loads(out.stdout)
        assert res["hello"] == ["ok", True]  # the caller's pid comes from the kernel
        for key in REFUSED_TO_OTHERS:
            assert res[key][0] == "NotPermitted", (key, res[key])
            assert "not permitted" in res[key][1], (key, res[key])
        # Its own process and job work, through the coordinator.
        assert res["register"] == ["ok", 8192]
        assert res["checkpoint_self"] == ["ok", 1]
        assert res["checkpoint_job"] == ["ok", 2]
        assert res["restore_self"] == ["ok", {"state": 8192}]
        assert res["restored_bytes"] == ["ok", "hello"]
        # Nothing changed for the others: no generation, no write, members where they were.
        assert sc.generations("victim-job") == [1]
        assert sc.generations("their-job") == []
        assert sc.generations("mine") == [1, 2]
        assert digest(victim.pid, span) == before
        assert sc.members("victim-job")["v0"]["pid"] == victim.pid
        assert set(sc.members("victim-job")) == {"v0"}
        assert sc.members("their-job")["t0"]["pid"] == same.pid
    finally:
        for p in (victim, same):
            p.kill()
            p.wait()


PAIR = r"""
import os, sys, time
import numpy as np
from cpcoord import client
a = client.zeros(4096, dtype=np.uint8)
a[:] = int(sys.argv[2])
client.register("a", a)
print("registered", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
print(f"gen={client.checkpoint()}", flush=True)
# Stay a running member until both have their generation: the other one's checkpoint
# covers the whole job, this process included.
while not os.path.exists(sys.argv[3]):
    time.sleep(0.01)
"""


def test_members_of_one_job_checkpoint_at_once(
    socket_cluster: SocketCluster, tmp_path: Path
) -> None:
    """Both ask at the same moment; the coordinator runs one generation at a time, so one
    waits its turn (JobBusy is retried in the agent): two generations, both committed."""
    sc = socket_cluster
    go, done = tmp_path / "go", tmp_path / "done"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PAIR, str(go), str(i + 1), str(done)],
            env=sc.env("pair", f"r{i}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        for p in procs:
            assert first_line(p, timeout=120) == "registered"
        go.touch()
        gens = sorted(fields("x " + first_line(p, timeout=300))["gen"] for p in procs)
        done.touch()
        for p in procs:
            assert p.wait(timeout=60) == 0, p.stderr.read() if p.stderr else ""
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert gens == ["1", "2"]
    assert sc.generations("pair") == [1, 2]
