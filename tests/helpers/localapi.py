"""Shared by the local API tests (tests/integration/test_localapi.py, test_restart_real.py,
test_cli_run.py): the Python example's path and what it computes, reading its output
lines, a second user (`other_user` fixture) and the probe such a user runs.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from testbed.daemons import REPO, public_tmpdir
from tests.conftest import require

EXAMPLE_PY = REPO / "examples" / "python" / "checkpoint_numpy.py"


def first_line(p: subprocess.Popen[str], timeout: float = 60) -> str:
    assert p.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if line:
            return line.strip()
        if p.poll() is not None:
            break
    raise AssertionError(f"no output; exit {p.poll()}: {p.stderr.read() if p.stderr else ''}")


def fields(line: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in line.split()[1:])


def uninterrupted_numpy(total: int) -> dict[str, str]:
    sys.path.insert(0, str(EXAMPLE_PY.parent))
    try:
        import checkpoint_numpy as ex
    finally:
        sys.path.remove(str(EXAMPLE_PY.parent))
    state = np.zeros(ex.N + 1, dtype=np.uint64)
    for s in range(1, total + 1):
        ex.advance(state, s)
    return {"step": str(total), "digest": str(ex.digest(state))}


@pytest.fixture
def other_user() -> Iterator[pwd.struct_passwd]:
    require(os.geteuid() == 0, "creating a second user needs root")
    require(shutil.which("useradd") is not None, "useradd is needed to create a second user")
    name = f"cpct{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)


PROBE = r"""
import json, mmap, os, sys
from cpcoord import client
from cpcoord.errors import CpcoordError
victim, same_user_pid = int(sys.argv[1]), int(sys.argv[2])
c = client.Client(job="mine", member="m0")
out = {}
def attempt(key, fn):
    try:
        out[key] = ["ok", fn()]
    except CpcoordError as e:
        out[key] = [type(e).__name__, str(e)]
buf = mmap.mmap(-1, 8192)
attempt("hello", lambda: c.request("hello", pid=victim)["pid"] == os.getpid())
attempt("checkpoint_victim", lambda: c.request("checkpoint", pid=victim))
attempt("restore_victim", lambda: c.request("restore", pid=victim))
attempt("checkpoint_same_user_pid", lambda: c.request("checkpoint", pid=same_user_pid))
attempt("restore_same_user_pid", lambda: c.request("restore", pid=same_user_pid))
attempt("job_victim", lambda: c.request("checkpoint", scope="job", job="victim-job"))
attempt("job_same_user", lambda: c.request("checkpoint", scope="job", job="their-job"))
attempt("steal_member", lambda: c.register("state", buf, job="victim-job", member="v0"))
attempt("join_job", lambda: c.register("state", buf, job="victim-job", member="sneak"))
attempt("register", lambda: c.register("state", buf).size)
buf[:5] = b"hello"
attempt("checkpoint_self", lambda: c.checkpoint())
attempt("checkpoint_job", lambda: c.checkpoint(job=True))
buf[:5] = b"XXXXX"
attempt("restore_self", lambda: c.restore("state").regions)
attempt("restored_bytes", lambda: bytes(buf[:5]).decode())
print(json.dumps(out))
"""
# What PROBE tries on processes and jobs not its own: each must be refused (NotPermitted).
REFUSED_TO_OTHERS = (
    "checkpoint_victim",
    "restore_victim",
    "checkpoint_same_user_pid",
    "restore_same_user_pid",
    "job_victim",
    "job_same_user",
    "steal_member",
    "join_job",
)


def python_for(user: pwd.struct_passwd) -> tuple[str, str]:
    """An interpreter the other user can run (ours may live in root's home) and the
    PYTHONPATH it imports cpcoord from: the checkout, or, when the other user cannot
    reach it (a clone inside a 0700 directory, as `mktemp -d` makes), a copy of the
    package in a public directory."""
    for exe in (sys.executable, "/usr/bin/python3"):
        for path in (lambda: str(REPO), lambda: str(_public_copy())):
            try:
                probe = subprocess.run(
                    [exe, "-c", "import cpcoord.client"],
                    user=user.pw_uid,
                    group=user.pw_gid,
                    extra_groups=[],
                    env={"PYTHONPATH": path()},
                    capture_output=True,
                    check=False,
                )
            except PermissionError:
                break  # this interpreter is out of reach
            if probe.returncode == 0:
                return exe, path()
    require(False, "no Python interpreter the second user can run")
    raise AssertionError("unreachable")


_COPIES: list[Path] = []


def _public_copy() -> Path:
    """The cpcoord package copied once per test process into a directory every user can
    read (removed when the process exits)."""
    if not _COPIES:
        d = public_tmpdir("cpct-py-")
        skip = shutil.ignore_patterns("__pycache__")
        shutil.copytree(REPO / "cpcoord", d / "cpcoord", ignore=skip)
        for p in [d, *d.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        atexit.register(shutil.rmtree, d, True)
        _COPIES.append(d)
    return _COPIES[0]
