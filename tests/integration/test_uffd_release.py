"""What releases a uffd-wp tracker's userfaultfd outside the agent daemon, on real
processes (tests/helpers/c/uffd_target.c): an arm that fails once the fd exists closes it
(the `auto` fallback dropped such a tracker with the fd still open in the target), and
the sweep of records (nodeagent/trackers/leftovers.py) closes the fds of agents that are
gone, never those of a live one, never a file that is no longer the recorded one.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cpcoord.errors import TrackerFailed
from nodeagent.capture.trackstate import MemberTracker
from nodeagent.proc.freeze import frozen
from nodeagent.proc.procfs import ProcessIdentity
from nodeagent.trackers import leftovers, uffdwp
from nodeagent.trackers.uffdwp import UffdWpTracker
from tests.helpers.traceless import userfaultfds
from tests.helpers.uffd_target import MemTarget

pytestmark = pytest.mark.integration


@pytest.fixture
def target(c_target: Path) -> Iterator[MemTarget]:
    t = MemTarget(c_target, 16, 8)
    yield t
    if t.proc.poll() is None:
        t.proc.kill()
        t.proc.wait()


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CPCOORD_RUN_DIR", str(tmp_path / "run"))
    return tmp_path / "run"


def _fail_protect(*args: object, **kw: object) -> None:
    raise TrackerFailed("uffd-wp", 0, "injected failure after the fd exists")


def test_an_arm_that_fails_closes_its_fd(
    target: MemTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uffdwp, "protect", _fail_protect)
    tr = UffdWpTracker()
    with frozen(target.ident) as fp, pytest.raises(TrackerFailed):
        tr.arm(fp, target.mappings())
    assert userfaultfds(target.pid) == []
    assert tr.fd is None


def test_the_auto_fallback_leaves_no_uffd_behind(
    target: MemTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uffdwp, "protect", _fail_protect)
    mt = MemberTracker("auto")
    maps = target.mappings()
    with frozen(target.ident) as fp:
        assert mt.arm(fp, maps, maps) == ""
    assert mt.name != "uffd-wp"  # the next backend took over
    assert userfaultfds(target.pid) == []
    with frozen(target.ident) as fp:
        mt.forget(fp)


def _dead() -> ProcessIdentity:
    p = subprocess.Popen(["sleep", "0.01"])
    ident = ProcessIdentity.of(p.pid)
    p.wait()
    return ident


def _armed(target: MemTarget) -> tuple[int, int]:
    """A uffd left in the target by a tracker that is dropped without forget (an agent
    killed with SIGKILL): its fd and inode."""
    tr = UffdWpTracker()
    with frozen(target.ident) as fp:
        tr.arm(fp, target.mappings())
    held = leftovers.holding(tr)
    assert held is not None
    return held


def _record(run_dir: Path, target: MemTarget, owner: ProcessIdentity, fd: int, ino: int) -> Path:
    d = run_dir / "armed"
    d.mkdir(parents=True, exist_ok=True)
    t = target.ident
    path = d / f"{t.pid}-{t.start_time}.{owner.pid}-{owner.start_time}.json"
    path.write_text(json.dumps({"fd": fd, "inode": ino}))
    return path


def test_sweep_closes_what_a_dead_agent_left(run_dir: Path, target: MemTarget) -> None:
    fd, ino = _armed(target)
    rec = _record(run_dir, target, _dead(), fd, ino)
    assert leftovers.sweep(1.0) == 1
    assert userfaultfds(target.pid) == [] and not rec.exists()
    target.write(target.pages(0)[:2])  # it still runs and answers


def test_sweep_keeps_a_live_agents_and_drops_a_stale_record(
    run_dir: Path, target: MemTarget
) -> None:
    fd, ino = _armed(target)
    live = _record(run_dir, target, ProcessIdentity.of(os.getppid()), fd, ino)
    assert leftovers.sweep(1.0) == 0
    assert userfaultfds(target.pid) == [fd] and live.exists()
    live.unlink()
    stale = _record(run_dir, target, _dead(), fd, ino + 1)  # another file by now
    assert leftovers.sweep(1.0) == 0
    assert userfaultfds(target.pid) == [fd] and not stale.exists()
    # This process's own record of a target it no longer keeps (a failed release).
    mine = _record(run_dir, target, ProcessIdentity.of(os.getpid()), fd, ino)
    assert leftovers.sweep(1.0, keep=[target.ident]) == 0 and mine.exists()
    assert leftovers.sweep(1.0, keep=[]) == 1
    assert userfaultfds(target.pid) == [] and not mine.exists()
