"""Userfaultfds left inside processes: recorded while an agent holds them, closed when
no one wants them any more (docs/uffd-wp.md, "Leaving no trace").

Owns RUN_DIR/armed/ (RUN_DIR: nodeagent/proc/rundir.py): one record per (target process,
agent process) while that agent's uffd-wp tracker keeps a userfaultfd open inside the
target: `<pid>-<start time>.<agent pid>-<agent start time>.json` holding the fd's number
and inode. The agent writes it after every capture that armed or collected (`note`) and
removes it once the tracker was released (`done`). A normal shutdown, a detach and a
member's death release and remove; an agent killed with SIGKILL cannot, and its records
stay. The next agent started on this machine (whatever its node name) `sweep`s before
it serves anything: a record whose agent is gone names a userfaultfd nobody will ever
scan again, and it is closed (`close_leftover`: a brief freeze, one injected close(2))
if the target still runs and still holds that very file (link and inode); the record is
removed either way. Records of a live agent are never touched: agents of other clusters
on the same machine (tests run several) keep theirs.

`close_leftover` is also how `cpcoord capture` releases the userfaultfd an earlier
capture chain left in a process when the new capture does not continue with uffd-wp.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from cpcoord.errors import CpcoordError, NoSuchProcess, PidReused, ProcessExited, TrackerFailed
from nodeagent.proc.freeze import frozen
from nodeagent.proc.procfs import ProcessIdentity
from nodeagent.proc.rundir import run_dir
from nodeagent.trackers.base import Tracker

log = logging.getLogger(__name__)
UFFD_LINK = "anon_inode:[userfaultfd]"


def _dir() -> Path:
    d = run_dir() / "armed"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


_me: ProcessIdentity | None = None
# What this process last recorded per target (the thread that freezes calls note/done),
# so that a collect, which keeps the same fd, writes nothing in the frozen window.
_noted: dict[ProcessIdentity, tuple[int, int] | None] = {}


def _self() -> ProcessIdentity:
    global _me
    if _me is None or _me.pid != os.getpid():  # a fork is another agent
        _me = ProcessIdentity.of(os.getpid())
    return _me


def _name(target: ProcessIdentity, owner: ProcessIdentity) -> str:
    return f"{target.pid}-{target.start_time}.{owner.pid}-{owner.start_time}.json"


def _parse(name: str) -> tuple[ProcessIdentity, ProcessIdentity] | None:
    try:
        t, o, ext = name.split(".")
        if ext != "json":
            return None
        tp, ts = t.split("-")
        op, os_ = o.split("-")
        return ProcessIdentity(int(tp), int(ts)), ProcessIdentity(int(op), int(os_))
    except ValueError:
        return None


@contextlib.contextmanager
def _locked() -> Iterator[Path]:
    """One sweeper at a time on this machine (two agents starting together)."""
    d = _dir()
    fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield d
    finally:
        os.close(fd)


def holding(tracker: Tracker | None) -> tuple[int, int] | None:
    """(fd, inode) of the userfaultfd `tracker` keeps open inside its target, if any."""
    fn = getattr(tracker, "save_state", None)
    if tracker is None or tracker.name != "uffd-wp" or fn is None:
        return None
    meta: dict[str, Any] = fn()[0]
    if not meta.get("armed") or meta.get("registration") != "inject":
        return None
    return int(meta["fd"]), int(meta["inode"])


def note(target: ProcessIdentity, tracker: Tracker | None) -> None:
    """Record what `tracker` holds in `target` now (nothing: no record). Never raises:
    a record that cannot be written costs only the SIGKILL case."""
    held = holding(tracker)
    if _noted.get(target) == held and (held is not None or target in _noted):
        return  # a collect: the same fd as at the arm, nothing to write
    try:
        path = _dir() / _name(target, _self())
        if held is None:
            path.unlink(missing_ok=True)
            _noted[target] = None
            return
        tmp = path.with_name("." + path.name + ".tmp")
        with open(tmp, "w", opener=lambda p, f: os.open(p, f, 0o600)) as f:
            json.dump({"fd": held[0], "inode": held[1]}, f)
        os.replace(tmp, path)
        _noted[target] = held
    except OSError as e:
        log.warning(
            "armed record not written", extra={"fields": {"pid": target.pid, "error": str(e)}}
        )


def done(target: ProcessIdentity) -> None:
    """This agent holds nothing in `target` any more."""
    _noted.pop(target, None)
    with contextlib.suppress(OSError):
        (_dir() / _name(target, _self())).unlink(missing_ok=True)


def still_ours(target: ProcessIdentity, fd: int, inode: int) -> bool:
    """Whether `target` runs and its `fd` is that very userfaultfd."""
    path = f"/proc/{target.pid}/fd/{fd}"
    try:
        target.check()
        return os.readlink(path) == UFFD_LINK and os.stat(path).st_ino == inode
    except (OSError, NoSuchProcess, PidReused):
        return False


def close_leftover(target: ProcessIdentity, fd: int, inode: int, freeze_timeout: float) -> bool:
    """Close userfaultfd `fd` (of `inode`) inside `target`, which no tracker uses any
    more: freeze it, inject close(2), thaw. False when there was nothing to close (the
    process or the fd is gone, or the number is another file now). Raises what the
    freeze or the injection raise while the process still holds it."""
    from nodeagent.trackers.uffdwp import UffdWpTracker  # ptrace machinery: only here

    if not still_ours(target, fd, inode):
        return False
    t = UffdWpTracker()
    try:
        with frozen(target, freeze_timeout) as fp:
            t.load_state(target, {"armed": True, "fd": fd, "inode": inode}, {})
            t.forget(fp)
    except (NoSuchProcess, PidReused, ProcessExited):
        return False
    if still_ours(target, fd, inode):  # never silent: the caller keeps its record
        raise TrackerFailed("uffd-wp", target.pid, f"fd {fd} is still open after close")
    log.info("left-over userfaultfd closed", extra={"fields": {"pid": target.pid, "fd": fd}})
    return True


def sweep(
    freeze_timeout: float,
    keep: Collection[ProcessIdentity] | None = None,
    only: ProcessIdentity | None = None,
) -> int:
    """Close what agents that are gone left behind (module docstring); with `keep`, also
    what this process recorded for targets not in `keep` (a release that failed); with
    `only`, in that target only. How many were closed; failures are logged and their
    record kept for the next sweep."""
    closed = 0
    me = _self()
    with _locked() as d:
        for path in sorted(d.glob("*.json")):
            parsed = _parse(path.name)
            if parsed is None:
                continue
            target, owner = parsed
            if only is not None and target != only:
                continue
            mine_unwanted = owner == me and keep is not None and target not in keep
            if not mine_unwanted and owner.alive():
                continue
            try:
                with open(path) as f:
                    rec = json.load(f)
                closed += close_leftover(target, int(rec["fd"]), int(rec["inode"]), freeze_timeout)
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning(
                    "bad armed record dropped",
                    extra={"fields": {"file": path.name, "error": str(e)}},
                )
            except CpcoordError as e:
                fields = {"pid": target.pid, "error": str(e)}
                log.warning("left-over userfaultfd not closed", extra={"fields": fields})
                continue
            path.unlink(missing_ok=True)
            _noted.pop(target, None)
    return closed
