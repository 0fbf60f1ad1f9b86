"""`cpcoord run` against a real coordinator and agent: the command is a member while it
runs (listed by `jobs`, included in a checkpoint), its exit status passes through (0, 3,
128+N when killed by signal N, signals to `run` forwarded), and it is detached after.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.daemons import REPO, default_signals, wait_for
from tests.helpers.socket_cluster import NODE, SocketCluster, socket_cluster

pytestmark = pytest.mark.integration
__all__ = ["socket_cluster"]

# Writes its pid and environment, then waits for a file and exits with the code in it.
CHILD = r"""
import os, sys, time
d = sys.argv[1]
with open(os.path.join(d, "pid.tmp"), "w") as f:
    f.write(f"{os.getpid()} {os.environ['CPCOORD_JOB']} {os.environ['CPCOORD_MEMBER']}")
os.rename(os.path.join(d, "pid.tmp"), os.path.join(d, "pid"))
buf = bytearray(os.urandom(1 << 16))  # some memory of its own to capture
while not os.path.exists(os.path.join(d, "go")):
    time.sleep(0.05)
sys.exit(int(open(os.path.join(d, "go")).read()))
"""


def start_run(sc: SocketCluster, d: Path, job: str, member: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "cpcoord", "run", "--job", job, "--member", member]
    argv += ["--coordinator", sc.cluster.address, "--insecure", "--node", NODE]
    argv += ["--", sys.executable, "-c", CHILD, str(d)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("CPCOORD_COORDINATOR", None)
    return subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        preexec_fn=default_signals,  # the SIGINT case needs Ctrl-C not ignored
    )


def child_pid(d: Path, run: subprocess.Popen[str]) -> tuple[int, str, str]:
    def ready() -> bool:
        if run.poll() is not None:
            raise AssertionError(f"run exited {run.returncode}: {run.stderr.read()}")  # type: ignore[union-attr]
        return (d / "pid").exists()

    wait_for(ready, 60, "the command to start")
    pid, job, member = (d / "pid").read_text().split()
    return int(pid), job, member


def go(d: Path, code: str) -> None:
    """Tell the child its exit code: written aside and renamed, so it never reads an
    empty file (it polls for the name)."""
    (d / "go.tmp").write_text(code)
    os.replace(d / "go.tmp", d / "go")


def finish(run: subprocess.Popen[str]) -> int:
    try:
        run.wait(timeout=120)
    except subprocess.TimeoutExpired:
        run.kill()
        run.wait()
        raise
    return run.returncode


def test_member_while_running_checkpointed_and_exit_code_passed(
    socket_cluster: SocketCluster, tmp_path: Path
) -> None:
    sc = socket_cluster
    d = tmp_path / "a"
    d.mkdir()
    run = start_run(sc, d, "runjob", "w-0")
    try:
        pid, job, member = child_pid(d, run)
        assert (job, member) == ("runjob", "w-0")
        m = sc.members("runjob")["w-0"]
        assert m["pid"] == pid and m["node"] == NODE and m["health"] == "running"
        cp = sc.cluster.cli_json("checkpoint", "--job", "runjob")
        assert cp["state"] == "committed" and cp["members"] == 1, cp
        assert cp["pages"] > 16  # its 64 KiB buffer at least
        go(d, "3")
        assert finish(run) == 3, run.stderr.read() if run.stderr else ""
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert "w-0" not in sc.members("runjob")  # detached after the exit
    # Its generation stays.
    assert sc.generations("runjob") == [1]


def test_exit_zero_and_signals(socket_cluster: SocketCluster, tmp_path: Path) -> None:
    sc = socket_cluster
    # 0 passes through.
    d = tmp_path / "zero"
    d.mkdir()
    run = start_run(sc, d, "sigjob", "ok")
    child_pid(d, run)
    go(d, "0")
    assert finish(run) == 0
    # Killed by a signal: 128 + 9, and detached.
    d = tmp_path / "kill"
    d.mkdir()
    run = start_run(sc, d, "sigjob", "killed")
    pid, _, _ = child_pid(d, run)
    assert "killed" in sc.members("sigjob")
    os.kill(pid, signal.SIGKILL)
    assert finish(run) == 128 + signal.SIGKILL
    assert "killed" not in sc.members("sigjob")
    # SIGTERM to `run` goes to the command: 128 + 15, and detached.
    d = tmp_path / "term"
    d.mkdir()
    run = start_run(sc, d, "sigjob", "termed")
    pid, _, _ = child_pid(d, run)
    run.send_signal(signal.SIGTERM)
    assert finish(run) == 128 + signal.SIGTERM
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 30, "the command to be gone")
    assert "termed" not in sc.members("sigjob")
    # SIGINT (Ctrl-C sent to `run` alone, by kill): Python's KeyboardInterrupt, 128 + 2.
    d = tmp_path / "int"
    d.mkdir()
    run = start_run(sc, d, "sigjob", "interrupted")
    child_pid(d, run)
    run.send_signal(signal.SIGINT)
    assert finish(run) == 128 + signal.SIGINT
    assert sc.members("sigjob") == {}


def test_errors_attach_nothing(socket_cluster: SocketCluster, tmp_path: Path) -> None:
    sc = socket_cluster
    base = [sys.executable, "-m", "cpcoord", "run", "--coordinator", sc.cluster.address]
    base += ["--insecure", "--job", "errjob"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [*base, "--member", "m", "--", "no-such-command-xyz"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 84 and "no-such-command-xyz" in r.stderr
    r = subprocess.run(
        [*base, "--member", "bad name", "--", "true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "name" in r.stderr
    # A member name already taken: refused, the command never runs.
    d = tmp_path / "dup"
    d.mkdir()
    run = start_run(sc, d, "errjob", "taken")
    try:
        child_pid(d, run)
        marker = tmp_path / "ran"
        r = subprocess.run(
            [*base, "--member", "taken", "--", "touch", str(marker)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 58, r.stderr  # DuplicateMember
        assert not marker.exists()
        go(d, "0")
        assert finish(run) == 0
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert sc.members("errjob") == {}


def test_run_with_the_client_library_restarts(socket_cluster: SocketCluster) -> None:
    """The Python example under `cpcoord run`: a member from the start (whole memory),
    it registers its state (now explicit), checkpoints, is killed (137 from `run`, the
    member detached), and a second `run` resumes it from that generation."""
    from tests.helpers.localapi import EXAMPLE_PY, fields, first_line, uninterrupted_numpy

    sc = socket_cluster
    base = [sys.executable, "-m", "cpcoord", "run", "--job", "ex", "--member", "py"]
    base += ["--coordinator", sc.cluster.address, "--insecure", "--"]
    base += [sys.executable, str(EXAMPLE_PY)]
    env = sc.env()
    run = subprocess.Popen(
        [*base, "run", "30"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert fields(first_line(run, timeout=120)) == {"generation": "1", "step": "30"}
        m = sc.members("ex")["py"]
        assert [r["name"] for r in m["regions"]] == ["state"]
        os.kill(m["pid"], signal.SIGKILL)
        assert finish(run) == 137
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert sc.members("ex") == {}
    out = subprocess.run(
        [*base, "resume", "45"], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr + sc.cluster.logs()
    restored, result = out.stdout.splitlines()
    assert fields(restored) == {"generation": "1", "step": "30"}
    assert fields(result) == uninterrupted_numpy(45)
    assert sc.members("ex") == {}


REGISTER = r"""
import os, sys, time
import numpy as np
from cpcoord import client
regions = {}
for name in sys.argv[1].split(","):
    regions[name] = client.zeros(4096, dtype=np.uint8)
    client.register(name, regions[name])
print(f"registered pid={os.getpid()}", flush=True)
time.sleep(300)
"""


def test_restarted_process_under_run_starts_from_no_regions(
    socket_cluster: SocketCluster,
) -> None:
    """A member's first process under `run` registers regions a and b and is killed; the
    next process of the member (a new `run`) registers only a: it is a member with a
    alone. The agent once carried b over at the first process's address (RangeUnmapped:
    the new process has nothing mapped there), which broke every Slurm restart."""
    from tests.helpers.localapi import first_line

    sc = socket_cluster
    base = [sys.executable, "-m", "cpcoord", "run", "--job", "again", "--member", "m"]
    base += ["--coordinator", sc.cluster.address, "--insecure", "--"]
    base += [sys.executable, "-c", REGISTER]
    for names in ("a,b", "a"):
        run = subprocess.Popen(
            [*base, names],
            env=sc.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = first_line(run, timeout=120)
            assert line.startswith("registered"), line
            m = sc.members("again")["m"]
            assert sorted(r["name"] for r in m["regions"]) == names.split(","), m
            os.kill(m["pid"], signal.SIGKILL)
            assert finish(run) == 137
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
