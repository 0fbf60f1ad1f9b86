"""`cpcoord demo` on a fresh temp store: exits 0, shows its table, leaves no process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from testbed.daemons import default_signals

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _tagged(tag: str) -> list[int]:
    """Pids of live processes whose environment carries the demo's tag."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if f"CPCOORD_DEMO_ID={tag}".encode() in env.split(b"\0"):
            out.append(int(d.name))
    return out


def _run(tag: str, **kw: object) -> subprocess.Popen[str]:
    env = dict(os.environ, CPCOORD_DEMO_ID=tag)
    return subprocess.Popen(
        [sys.executable, "-m", "cpcoord", "demo"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=default_signals,  # Ctrl-C must reach it even from a background job
        **kw,  # type: ignore[call-overload]
    )


def test_demo_runs_and_leaves_nothing_behind() -> None:
    tag = uuid.uuid4().hex
    p = _run(tag)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    for needle in ("generation 1 (full) committed", "rolled back to generation 1", "frozen ms"):
        assert needle in out, out
    assert _tagged(tag) == []


def test_demo_interrupted_cleans_up() -> None:
    tag = uuid.uuid4().hex
    p = _run(tag)
    assert p.stdout is not None
    deadline = time.monotonic() + 120
    for line in p.stdout:  # wait until members run, then Ctrl-C
        if "members rank-0 and rank-1" in line or time.monotonic() > deadline:
            break
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=60)
    assert p.returncode != 0
    deadline = time.monotonic() + 10
    while _tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _tagged(tag) == []
