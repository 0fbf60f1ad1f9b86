"""Fault hooks: named points where a daemon can be told to stop dead, for tests.

Tests that kill a daemon "during upload" or "during commit" need the kill to land at a
known moment. Both daemons call `fault_point(NAME)` at the points listed in
docs/protocol.md ("Fault hooks"). Nothing happens unless the environment asks for it:

    CPCOORD_FAULT_PAUSE=agent.upload,coordinator.commit.manifest
    CPCOORD_FAULT_DIR=/tmp/faults        (default: the current directory)

When a listed point is reached the first time (or the K-th time, for `NAME@K`), the
daemon writes `$CPCOORD_FAULT_DIR/NAME.reached` (atomically: the test polls for it), logs
it, and blocks that thread forever; the test then sends SIGKILL. Other threads keep
running (heartbeats go on), so the process is exactly "in the middle of" that phase. A
point pauses at most once per process: other passes go through.

`CPCOORD_FAULT_HOLD=NAME[@K]` (same syntax) blocks only until the test creates
`$CPCOORD_FAULT_DIR/NAME.release`, then goes on: a phase made to last as long as the
test needs, e.g. a commit that resumes after its leader lost its lease.

Failure points are the other kind: code that can fail part-way (restore's writes) asks
`fail_point(NAME)` and fails as the kernel could, when

    CPCOORD_FAULT_FAIL=agent.restore.write@3

names it: on the K-th pass only (the first without `@K`), it logs and returns True.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from cpcoord.log import log_event

log = logging.getLogger("cpcoord.faults")
ENV_PAUSE = "CPCOORD_FAULT_PAUSE"
ENV_HOLD = "CPCOORD_FAULT_HOLD"
ENV_FAIL = "CPCOORD_FAULT_FAIL"
ENV_DIR = "CPCOORD_FAULT_DIR"

_passes: dict[str, int] = {}
_lock = threading.Lock()


def armed(env: str = ENV_PAUSE) -> dict[str, int]:
    """Point names the environment asks to pause at (or fail at, with ENV_FAIL), with the
    pass to act on (1..)."""
    out = {}
    for item in os.environ.get(env, "").split(","):
        name, _, nth = item.strip().partition("@")
        if name:
            out[name] = int(nth) if nth.isdigit() and int(nth) > 0 else 1
    return out


def marker(name: str, directory: str | Path | None = None) -> Path:
    """The file a paused point creates (tests wait for it)."""
    base = Path(directory if directory is not None else os.environ.get(ENV_DIR, "."))
    return base / f"{name}.reached"


def release_file(name: str, directory: str | Path | None = None) -> Path:
    """The file that lets a held point go on (CPCOORD_FAULT_HOLD)."""
    return marker(name, directory).with_name(f"{name}.release")


def fault_point(name: str) -> None:
    """Pause here forever (or hold until released) if the environment names this point
    (on its chosen pass)."""
    pause, hold = armed().get(name), armed(ENV_HOLD).get(name)
    if pause is None and hold is None:
        return
    with _lock:
        _passes[name] = n = _passes.get(name, 0) + 1
    if n not in (pause, hold):
        return
    path = marker(name)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)
    if n == pause:
        log_event(log, logging.WARNING, "fault point reached: pausing", point=name, pid=os.getpid())
        threading.Event().wait()  # until SIGKILL
    log_event(log, logging.WARNING, "fault point reached: holding", point=name, pid=os.getpid())
    release = release_file(name)
    while not release.exists():
        threading.Event().wait(0.05)
    log_event(log, logging.WARNING, "fault point released", point=name, pid=os.getpid())


def fail_point(name: str) -> bool:
    """True on the pass of this point that CPCOORD_FAULT_FAIL names (once per process):
    the caller then fails there as if the kernel had refused."""
    nth = armed(ENV_FAIL).get(name)
    if nth is None:
        return False
    key = f"fail:{name}"
    with _lock:
        _passes[key] = _passes.get(key, 0) + 1
        if _passes[key] != nth:
            return False
    log_event(log, logging.WARNING, "fault point reached: failing", point=name, pid=os.getpid())
    return True
