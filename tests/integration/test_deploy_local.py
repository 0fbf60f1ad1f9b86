"""deploy/local/run.py: a coordinator and N agents in network namespaces on one machine.

Run with two agents: every agent connects over its veth link (the script reads the
coordinator's /metrics and says `agents connected: 2/2`), and when it stops, by itself
after --duration or on Ctrl-C, no namespace and no process of it is left.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.daemons import REPO, wait_for
from tests.conftest import require

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SCRIPT = REPO / "deploy" / "local" / "run.py"


def _need() -> None:
    require(os.geteuid() == 0, "root (network namespaces)")
    require(shutil.which("ip") is not None, "iproute2 (`ip`)")


def leftovers(pid: int, tmp: Path) -> tuple[list[str], list[int]]:
    """Namespaces named after the script's pid, and processes that mention our tmp dir."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    mine = [line.split()[0] for line in ns.splitlines() if line.startswith(f"cpcl{pid}-")]
    procs = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(tmp) in cmd:
            procs.append(int(p.name))
    return mine, procs


def start(tmp: Path, *extra: str) -> subprocess.Popen[str]:
    argv = [sys.executable, str(SCRIPT), "--agents", "2", "--store", str(tmp / "store"),
            "--logs", str(tmp / "logs"), *extra]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_agents_connect_and_everything_goes_away(tmp_path: Path) -> None:
    _need()
    p = start(tmp_path, "--duration", "3")
    try:
        out, err = p.communicate(timeout=120)
    finally:
        _stop(p, tmp_path)
    assert p.returncode == 0, (out, err, _logs(tmp_path))
    assert "agents connected: 2/2" in out, (out, err)
    ns = re.search(r"in netns (cpcl\d+-c)", out)
    assert ns, out
    assert "namespaces removed" in out
    assert leftovers(p.pid, tmp_path) == ([], [])
    # The agents really were in their own namespaces and dialled across the bridge.
    for i in (1, 2):
        log = (tmp_path / "logs" / f"agent-node-{i}.log").read_text()
        assert "10.77.0.1:7420" in log


def test_ctrl_c_cleans_up(tmp_path: Path) -> None:
    _need()
    p = start(tmp_path)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.strip() == "agents connected: 2/2", (line, _logs(tmp_path))
        mine, procs = leftovers(p.pid, tmp_path)
        assert len(mine) == 3 and p.pid in procs  # the coordinator's and two nodes'
        for ns in mine:  # a daemon in each
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            assert pids.stdout.split(), f"nothing runs in {ns}"
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
    finally:
        _stop(p, tmp_path)
    assert p.returncode == 0
    wait_for(lambda: leftovers(p.pid, tmp_path) == ([], []), 10, "no namespace or process left")


def _stop(p: subprocess.Popen[str], tmp: Path) -> None:
    """Whatever happened: Ctrl-C, then SIGKILL (its daemons get SIGTERM by
    PR_SET_PDEATHSIG), then remove namespaces it left."""
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    mine, _ = leftovers(p.pid, tmp)
    for ns in mine:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _logs(tmp: Path) -> str:
    d = tmp / "logs"
    if not d.exists():
        return ""
    return "\n".join(f"== {f.name}\n{f.read_text()[-2000:]}" for f in sorted(d.glob("*.log")))
