"""The local API over its real socket, with real processes.

The server is nodeagent.localapi.server with tests/helpers/memory_backend.py behind it:
real capture and restore, generations kept in memory. Callers are real processes:
the Python example with a NumPy array and the C example speaking the wire format, killed
and started again; and processes of a second user, created by the test, that try to act
on other processes and jobs.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cpcoord import client
from cpcoord.errors import (
    AgentSocketUnavailable,
    InvalidArgument,
    LocalApiError,
    NoSuchGeneration,
)
from cpcoord.local_wire import encode, read_frame
from nodeagent.localapi.server import LocalApiServer
from testbed.daemons import public_tmpdir
from testbed.driver import REPO, Target
from tests.helpers.localapi import (
    EXAMPLE_PY,
    PROBE,
    REFUSED_TO_OTHERS,
    fields,
    first_line,
    python_for,
)
from tests.helpers.memory_backend import MemoryBackend
from tests.helpers.restore_c import C_EXAMPLE, build_c, digest

pytestmark = pytest.mark.integration


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = public_tmpdir("cpcoord-sock-")  # another user can reach the socket
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def agent(sockdir: Path) -> Iterator[tuple[LocalApiServer, MemoryBackend]]:
    backend = MemoryBackend()
    with LocalApiServer(sockdir / "agent.sock", backend) as srv:
        yield srv, backend


def env_for(sock: Path, job: str, member: str) -> dict[str, str]:
    return dict(
        os.environ,
        CPCOORD_AGENT_SOCKET=str(sock),
        CPCOORD_JOB=job,
        CPCOORD_MEMBER=member,
        PYTHONPATH=str(REPO),
    )


# -- restart ------------------------------------------------------------------


def test_python_numpy_process_restarts_from_its_checkpoint(
    agent: tuple[LocalApiServer, MemoryBackend],
) -> None:
    srv, backend = agent
    env = env_for(srv.path, "demo", "py-0")
    run = [sys.executable, str(EXAMPLE_PY)]
    p = subprocess.Popen(
        [*run, "run", "50"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        cp = fields(first_line(p))
        time.sleep(0.3)  # it keeps working past the checkpoint: that work is lost
    finally:
        p.kill()
        p.wait()
    assert cp == {"generation": "1", "step": "50"}
    out = subprocess.run(
        [*run, "resume", "80"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    restored, result = out.stdout.splitlines()
    assert fields(restored) == {"generation": "1", "step": "50"}
    # The same result as a process that was never interrupted.
    sys.path.insert(0, str(EXAMPLE_PY.parent))
    try:
        import checkpoint_numpy as ex
    finally:
        sys.path.remove(str(EXAMPLE_PY.parent))
    state = np.zeros(ex.N + 1, dtype=np.uint64)
    for s in range(1, 81):
        ex.advance(state, s)
    assert fields(result) == {"step": "80", "digest": str(ex.digest(state))}
    # Who did what: the kernel's pids of the two processes, never one from a request.
    pids = [pid for op, pid in backend.calls]
    assert pids[0] == pids[1] == p.pid and pids[2] == pids[3] != p.pid


def test_c_process_restarts_from_its_checkpoint(
    agent: tuple[LocalApiServer, MemoryBackend], tmp_path: Path
) -> None:
    srv, _ = agent
    exe = build_c(C_EXAMPLE, tmp_path)
    env = env_for(srv.path, "demo", "c-0")
    p = subprocess.Popen(
        [str(exe), "run", "40"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert fields(first_line(p)) == {"generation": "1", "step": "40"}
        time.sleep(0.2)
    finally:
        p.kill()
        p.wait()
    out = subprocess.run(
        [str(exe), "resume", "100"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    restored, result = out.stdout.splitlines()
    assert fields(restored) == {"generation": "1", "step": "40"}
    n = 16 * 4096 // 8 - 1
    data = np.zeros(n, dtype=np.uint64)
    idx = np.arange(n, dtype=np.uint64)
    for s in range(1, 101):
        data = data * np.uint64(6364136223846793005) + idx + np.uint64(s)
    want = int(np.bitwise_xor.reduce(data * np.uint64(0x9E3779B97F4A7C15)))
    assert fields(result) == {"step": "100", "digest": str(want)}


# -- another user, another job ---------------------------------------------------


def test_another_user_cannot_act_on_other_processes_or_jobs(
    agent: tuple[LocalApiServer, MemoryBackend], other_user: pwd.struct_passwd, target_factory
) -> None:
    srv, backend = agent
    victim: Target = target_factory(maps=["secret:4:anon:random:1"])
    m = victim.mapping("secret")
    root = client.Client(str(srv.path))
    # Root may register another process: the victim, a root process of victim-job.
    root.request(
        "register",
        pid=victim.pid,
        job="victim-job",
        member="v0",
        regions=[{"name": "secret", "addr": m.addr, "size": m.end - m.addr}],
    )
    assert root.request("checkpoint", pid=victim.pid)["generation"] == 1
    # A process of the second user, in another job of that same user.
    uid, gid = other_user.pw_uid, other_user.pw_gid
    same = subprocess.Popen(["sleep", "60"], user=uid, group=gid, extra_groups=[])
    try:
        root.request(
            "register",
            pid=same.pid,
            job="their-job",
            member="t0",
            regions=[{"name": "r", "addr": 0x10000000, "size": 4096}],
        )
        before = digest(victim.pid, [(m.addr, m.end)])
        exe, path = python_for(other_user)
        out = subprocess.run(
            [exe, "-c", PROBE, str(victim.pid), str(same.pid)],
            user=uid,
            group=gid,
            extra_groups=[],
            env={"PYTHONPATH": path, "CPCOORD_AGENT_SOCKET": str(srv.path)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        same.kill()
        same.wait()
        root.close()
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["hello"][0] == "ok" and res["hello"][1] is True  # pid from the kernel
    for key in REFUSED_TO_OTHERS:
        assert res[key][0] == "NotPermitted", (key, res[key])
    assert res["register"] == ["ok", 8192]
    assert res["checkpoint_self"][0] == "ok" and res["checkpoint_job"][0] == "ok"
    assert res["restore_self"] == ["ok", {"state": 8192}]
    assert res["restored_bytes"] == ["ok", "hello"]
    # The victim was never captured or written for them, and its memory is as it was.
    assert digest(victim.pid, [(m.addr, m.end)]) == before
    touched = {pid for op, pid in backend.calls if op != "register"}
    assert victim.pid in touched  # by root, once, above
    assert [c for c in backend.calls if c[1] == victim.pid] == [
        ("register", victim.pid),
        ("checkpoint_member", victim.pid),
    ]
    assert backend.job_owners("victim-job") == {"v0": 0}


# -- the socket itself ---------------------------------------------------------------------


def test_client_errors(agent: tuple[LocalApiServer, MemoryBackend], sockdir: Path) -> None:
    srv, _ = agent
    with pytest.raises(AgentSocketUnavailable, match="No such file"):
        client.Client(str(sockdir / "none.sock")).hello()
    c = client.Client(str(srv.path), job="j", member="m")
    with pytest.raises(InvalidArgument, match="page boundary"):
        # A view one byte into a page-aligned buffer: misaligned for certain (a bytearray
        # slice is a fresh allocation that malloc may happen to page-align).
        c.register("x", client.zeros(10000, dtype="uint8")[1:])
    with pytest.raises(InvalidArgument, match="writable"):
        c.register("x", b"\0" * 8192)
    with pytest.raises(InvalidArgument, match="C-contiguous"):
        c.register("x", client.zeros((64, 64))[:, ::2])
    arr = client.zeros(1000, dtype="int32")
    assert arr.ctypes.data % 4096 == 0 and not arr.any()
    assert c.register("arr", arr).size == 4000
    with pytest.raises(NoSuchGeneration):
        c.restore()
    with pytest.raises(LocalApiError, match="unknown op"):
        c.request("launch")
    assert c.hello()["member"] == "m"  # the connection survived a refused request
    c.close()


def test_framing_errors_close_only_that_connection(
    agent: tuple[LocalApiServer, MemoryBackend],
) -> None:
    srv, _ = agent
    for junk in (b"\xff\xff\xff\xff", b"\x00\x00\x00\x03abc"):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(srv.path))
        s.sendall(junk)
        reply = read_frame(s)
        assert reply is not None and reply["error"] == "LocalApiError"
        assert read_frame(s) is None  # then the agent hangs up
        s.close()
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(srv.path))
    s.sendall(encode({"op": "nope"}) + encode({"op": "hello"}))
    assert read_frame(s)["error"] == "LocalApiError"  # type: ignore[index]
    assert read_frame(s)["pid"] == os.getpid()  # type: ignore[index]
    s.close()
    # Many callers at once, each answered on its own connection.
    got: list[int] = []
    ts = [
        threading.Thread(target=lambda: got.append(client.Client(str(srv.path)).hello()["pid"]))
        for _ in range(8)
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert got == [os.getpid()] * 8


def test_socket_file_lifecycle(sockdir: Path) -> None:
    path = sockdir / "a.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: left by a dead agent
    with LocalApiServer(path, MemoryBackend()) as srv:
        assert oct(path.stat().st_mode & 0o777) == oct(0o666)
        with pytest.raises(LocalApiError, match="another running agent"):
            LocalApiServer(path, MemoryBackend()).start()
        assert client.Client(str(srv.path)).hello()["ok"]
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(LocalApiError, match="not a socket"):
        LocalApiServer(path, MemoryBackend()).start()
    assert path.read_text() == "not a socket"
