"""The local API against a coordinator that enforces auth (tokens): the agent's own
`agent` token may not attach or checkpoint through the client API, so without
`--local-api-token-file` a process gets a clear Forbidden and nothing is recorded; with
an admin token there, the same requests work (docs/local-api.md, "In the agent")."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cpcoord.tls import token_digest
from testbed.daemons import REPO, Daemon, daemon_env, wait_for

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "cpcoord"]

PROC = r"""
import json
import numpy as np
from cpcoord import client
from cpcoord.errors import CpcoordError
a = client.zeros(4096, dtype=np.uint8)
a[:] = 5
try:
    client.register("a", a)
    print(json.dumps(["ok", client.checkpoint()]))
except CpcoordError as e:
    print(json.dumps([type(e).__name__, e.exit_code, str(e)]))
"""


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[Path, str, dict[str, Path]]]:
    """A coordinator with --tokens; yields (socket dir, address, token files)."""
    toks = {role: secrets.token_hex(16) for role in ("admin", "agent")}
    files = {}
    for role, tok in toks.items():
        files[role] = tmp_path / f"{role}.token"
        files[role].write_text(tok)
    (tmp_path / "tokens").write_text(
        "".join(f"{r} sha256:{token_digest(t)}\n" for r, t in toks.items())
    )
    port = tmp_path / "port"
    argv = [sys.executable, "-m", "cpcoord", "--log-level", "info", "coordinator"]
    argv += ["--listen", "127.0.0.1:0", "--store", str(tmp_path / "store")]
    argv += ["--port-file", str(port), "--insecure", "--tokens", str(tmp_path / "tokens")]
    d = Daemon("coordinator", argv, tmp_path / "coordinator.log", daemon_env())
    d.start()
    sockdir = Path(tempfile.mkdtemp(prefix="cpcoord-sock-", dir="/tmp"))
    try:
        wait_for(lambda: port.exists() or not d.alive(), 60, "coordinator port file")
        assert d.alive(), d.tail()
        yield sockdir, f"127.0.0.1:{int(port.read_text())}", files
    finally:
        d.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


def agent(tmp: Path, addr: str, sock: Path, agent_token: Path, *extra: str) -> Daemon:
    argv = [sys.executable, "-m", "cpcoord", "--log-level", "info", "agent"]
    argv += ["--coordinator", addr, "--node", "n1", "--insecure"]
    argv += ["--token-file", str(agent_token), "--socket", str(sock), *extra]
    d = Daemon("agent", argv, tmp / f"agent-{sock.stem}.log", daemon_env())
    d.start()
    wait_for(lambda: sock.exists() or not d.alive(), 60, "agent socket")
    assert d.alive(), d.tail()
    return d


def attempt(sock: Path, job: str) -> list[object]:
    env = daemon_env({"CPCOORD_AGENT_SOCKET": str(sock), "CPCOORD_JOB": job, "CPCOORD_MEMBER": "m"})
    out = subprocess.run(
        [sys.executable, "-c", PROC], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def jobs(addr: str, admin: Path) -> str:
    r = subprocess.run(
        [*CLI, "jobs", "--coordinator", addr, "--insecure", "--token-file", str(admin), "--json"],
        cwd=REPO,
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_local_api_needs_its_own_admin_token(
    secured: tuple[Path, str, dict[str, Path]], tmp_path: Path
) -> None:
    sockdir, addr, tok = secured
    a = agent(tmp_path, addr, sockdir / "a.sock", tok["agent"])
    try:
        got = attempt(sockdir / "a.sock", "nojob")
        assert got[0] == "Forbidden" and got[1] == 114, got
        assert "nojob" not in jobs(addr, tok["admin"])  # nothing recorded
    finally:
        a.stop()
    b = agent(
        tmp_path,
        addr,
        sockdir / "c.sock",
        tok["agent"],
        "--local-api-token-file",
        str(tok["admin"]),
    )
    try:
        assert attempt(sockdir / "c.sock", "okjob") == ["ok", 1]
        assert '"okjob"' in jobs(addr, tok["admin"])
    finally:
        b.stop()
