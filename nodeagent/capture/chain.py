"""Local chains of image directories (`cpcoord capture [--parent DIR1] --out DIR2`).

Owns the tracker state that must outlive one command, and the rule that keeps a chain
exact across commands:

- `DIR/.tracker/<member>.json` + `.npz`: the member's MemberState after the capture that
  wrote DIR (tracker, process, maps at arm time, pages taken, pending pages, the
  backend's own state: uffd fd + inode, hash digest table, ...) and a random *token*.
- A *head record* per tracked process, `RUN_DIR/tracked/<pid>-<start time>.json`, names
  the token of the one state that may be continued: a tracker re-arms at every capture,
  so only the latest capture of a process can be a parent. Continuing an older one
  (DIR1 again after DIR2 was made from it, or a chain whose process was captured into a
  new chain since, which re-armed it) is refused with ParentStale, never silently wrong.
- Before the freeze the record is marked *busy* with the token the new state will have.
  A command that fails after its tracker re-armed writes the pages it copied back into
  the parent's state as *pending* (under a new token), so retrying from the same parent
  is exact; one that dies outright leaves the record busy, and the parent is refused
  (the tracker state is unknown: take a full capture).

RUN_DIR: nodeagent/proc/rundir.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cpcoord.errors import ImageInvalid, NoSuchProcess, ParentMismatch, ParentStale, PidReused
from cpcoord.image import Image, load_image
from cpcoord.ranges import AddressRange
from nodeagent.capture.incremental import MemberState, TrackedCapture
from nodeagent.proc.procfs import Mapping, ProcessIdentity
from nodeagent.proc.rundir import run_dir
from nodeagent.trackers import leftovers, persist, registry

STATE_DIR = ".tracker"
STATE_FORMAT = "cpcoord-tracker-state/1"


# -- state files in an image directory -----------------------------------------------


def _maps_json(maps: Sequence[Mapping]) -> list[list[Any]]:
    return [[m.start, m.end, m.perms, m.offset, m.dev, m.inode, m.path] for m in maps]


def _maps_parse(items: Any) -> tuple[Mapping, ...]:
    return tuple(
        Mapping(int(a), int(b), str(p), int(o), str(d), int(i), str(path))
        for a, b, p, o, d, i, path in items
    )


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)  # tracker state describes process memory


def save_state(image_dir: Path, member: str, state: MemberState, token: str) -> Path:
    """Write the member's state into `image_dir/.tracker/` (arrays first, then the JSON
    that names them, by rename: a reader sees the old state or the new one)."""
    d = image_dir / STATE_DIR
    d.mkdir(mode=0o700, exist_ok=True)
    npz = f"{member}.{token}.npz"
    arrays = {"taken": state.taken, "pending": state.pending}
    arrays.update({f"b_{k}": v for k, v in state.arrays.items()})
    with open(d / npz, "wb", opener=_private) as fb:
        np.savez(fb, **arrays)  # type: ignore[arg-type]
        fb.flush()
        os.fsync(fb.fileno())
    doc = {
        "format": STATE_FORMAT,
        "member": member,
        "token": token,
        "tracker": state.tracker,
        "pid": state.ident.pid,
        "start_time": state.ident.start_time,
        "need_full": state.need_full,
        "armed_maps": _maps_json(state.armed_maps),
        "backend": state.backend,
        "arrays": npz,
    }
    final = d / f"{member}.json"
    old = _json(final)
    tmp = d / f".{member}.json.tmp"
    with open(tmp, "w", opener=_private) as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    if old is not None and old.get("arrays") not in (None, npz):
        with contextlib.suppress(OSError):
            (d / str(old["arrays"])).unlink()
    return final


def _json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    return doc if isinstance(doc, dict) else {}


def load_state(image_dir: Path, member: str) -> tuple[MemberState, str]:
    """The member's saved state and its token. ParentMismatch when there is none or it
    is damaged."""
    d = image_dir / STATE_DIR
    try:
        doc = _json(d / f"{member}.json")
    except (OSError, ValueError) as e:
        raise ParentMismatch(image_dir, f"tracker state of {member} unreadable: {e}") from None
    if doc is None:
        raise ParentMismatch(
            image_dir,
            f"it holds no tracker state for member {member} (not written by `cpcoord "
            "capture`, or a flattened image)",
        )
    try:
        if doc.get("format") != STATE_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        name = str(doc["arrays"])
        if "/" in name or name.startswith("."):
            raise ValueError("bad arrays file name")
        with np.load(d / name, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        state = MemberState(
            tracker=registry.canonical(str(doc["tracker"])),
            ident=ProcessIdentity(int(doc["pid"]), int(doc["start_time"])),
            armed_maps=_maps_parse(doc["armed_maps"]),
            taken=np.asarray(arrays.pop("taken"), dtype=np.uint64),
            pending=np.asarray(arrays.pop("pending"), dtype=np.uint64),
            need_full=str(doc["need_full"]),
            backend=dict(doc["backend"]),
            arrays={k[2:]: v for k, v in arrays.items() if k.startswith("b_")},
        )
        return state, str(doc["token"])
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise ParentMismatch(image_dir, f"tracker state of {member} is damaged: {e}") from None


# -- head records --------------------------------------------------------------------


def _heads() -> Path:
    d = run_dir() / "tracked"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def _head_path(ident: ProcessIdentity) -> Path:
    return _heads() / f"{ident.pid}-{ident.start_time}.json"


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One head update at a time on this machine (short critical sections)."""
    fd = os.open(_heads() / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_head(ident: ProcessIdentity) -> dict[str, Any] | None:
    try:
        return _json(_head_path(ident))
    except (OSError, ValueError):
        return {}


def _write_head(ident: ProcessIdentity, head: dict[str, Any]) -> None:
    path = _head_path(ident)
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "w", opener=_private) as f:
        json.dump(head, f)
    os.replace(tmp, path)
    for other in path.parent.glob("*-*.json"):  # records of processes that are gone
        pid, _, st = other.stem.partition("-")
        with contextlib.suppress(ValueError, OSError):
            if not ProcessIdentity(int(pid), int(st)).alive():
                other.unlink()


def _alive(pid: int, start_time: int) -> bool:
    try:
        ProcessIdentity(pid, start_time).check()
    except (NoSuchProcess, PidReused):
        return False
    return True


# -- one capture command -------------------------------------------------------------


@dataclass
class Link:
    """The capture a command is making: its TrackedCapture and where its state goes."""

    tc: TrackedCapture
    ident: ProcessIdentity
    member: str
    out: Path
    parent: Image | None
    token: str  # the token the new state will carry
    previous: dict[str, Any] | None  # the head record before this command

    @property
    def generation(self) -> int:
        return self.parent.generation + 1 if self.parent is not None else 1


def begin(
    ident: ProcessIdentity,
    member: str,
    out: Path,
    parent_dir: Path | None,
    tracker: str | None,
    ranges: Sequence[AddressRange] | None,
) -> Link:
    """Check the parent (if any), set up the TrackedCapture and mark the process busy.
    Raises ParentMismatch / ParentStale / ImageInvalid before anything is frozen."""
    with _locked():
        head = read_head(ident)
        parent: Image | None = None
        if parent_dir is not None:
            parent, tc = _continue(ident, member, parent_dir, tracker, ranges, head)
        else:
            tc = TrackedCapture(ident, ranges, tracker or registry.AUTO)
            _adopt(tc, ident, head)
        token = secrets.token_hex(8)
        me = ProcessIdentity.of(os.getpid())
        busy = {"into": str(out), "next": token, "pid": me.pid, "start_time": me.start_time}
        _write_head(ident, {**(head or {}), "busy": busy})
    return Link(tc, ident, member, out, parent, token, head)


def _continue(
    ident: ProcessIdentity,
    member: str,
    parent_dir: Path,
    tracker: str | None,
    ranges: Sequence[AddressRange] | None,
    head: dict[str, Any] | None,
) -> tuple[Image, TrackedCapture]:
    try:
        parent = load_image(parent_dir)
    except ImageInvalid as e:
        raise ParentMismatch(parent_dir, f"not an image ({e.args[1]})") from None
    try:
        pm = parent.member(member)
    except KeyError:
        names = ", ".join(m.name for m in parent.members) or "none"
        raise ParentMismatch(parent_dir, f"it has no member {member} (members: {names})") from None
    if (pm.pid, pm.start_time) != (ident.pid, ident.start_time):
        raise ParentMismatch(
            parent_dir,
            f"it was captured from pid {pm.pid} (start time {pm.start_time}), this is pid "
            f"{ident.pid} (start time {ident.start_time})",
        )
    state, token = load_state(parent_dir, member)
    if state.ident != ident:
        raise ParentMismatch(parent_dir, f"its tracker state belongs to pid {state.ident.pid}")
    if tracker is not None and registry.canonical(tracker) not in (registry.AUTO, state.tracker):
        raise ParentMismatch(
            parent_dir,
            f"it was armed by tracker {state.tracker}, not {registry.canonical(tracker)} "
            f"(omit --tracker, or take a full capture to switch)",
        )
    _check_head(parent_dir, ident, token, head)
    return parent, TrackedCapture.resume(state, ranges)


def _check_head(
    parent_dir: Path, ident: ProcessIdentity, token: str, head: dict[str, Any] | None
) -> None:
    """Is the parent's state the one the process's tracker is at? (module docstring)"""
    if not head:
        raise ParentStale(
            parent_dir,
            f"no record of pid {ident.pid} being tracked in {run_dir()} (take a full capture)",
        )
    busy = head.get("busy")
    if busy:
        if _alive(int(busy["pid"]), int(busy["start_time"])):
            raise ParentStale(
                parent_dir, f"another capture of pid {ident.pid} is running (pid {busy['pid']})"
            )
        if busy.get("next") == token:
            return  # that capture wrote this very parent, then died before the record
        raise ParentStale(
            parent_dir,
            f"a capture of pid {ident.pid} into {busy['into']} did not finish: the tracker "
            "state is unknown (take a full capture)",
        )
    if head.get("token") != token:
        newer = head.get("dir") or "a capture that failed"
        raise ParentStale(
            parent_dir,
            f"pid {ident.pid} was captured again since (into {newer}), which re-armed its "
            "tracker: continue from the latest image, or take a full capture",
        )


def _adopt(tc: TrackedCapture, ident: ProcessIdentity, head: dict[str, Any] | None) -> None:
    """A new chain on a process an older chain tracks with uffd-wp: a new uffd-wp takes
    over the old uffd so that arming closes it (a second uffd could register nothing:
    EBUSY); any other tracker, or none, closes it now (a brief freeze), so the process
    keeps nothing of the old chain. A uffd an agent killed with SIGKILL left is closed
    too (nodeagent/trackers/leftovers.py)."""
    leftovers.sweep(tc.freeze_timeout, only=ident)
    if not head or head.get("tracker") != "uffd-wp":
        return
    backend = head.get("backend") or {}
    if tc.tracker is not None and tc.tracker.name == "uffd-wp":
        if backend:
            persist.load(tc.tracker, ident, backend, {})
        return
    if backend.get("armed") and backend.get("registration", "inject") == "inject":
        leftovers.close_leftover(
            ident, int(backend["fd"]), int(backend["inode"]), tc.freeze_timeout
        )


def finish(link: Link) -> None:
    """After the image is committed: it holds the state the process's tracker is at."""
    link.tc.commit()
    state = link.tc.export_state()
    with _locked():
        _write_head(
            link.ident,
            {
                "token": link.token,
                "dir": str(link.out.resolve()),
                "tracker": state.tracker,
                "backend": state.backend,
                "busy": None,
            },
        )


def save_new_state(link: Link) -> None:
    """Write the new state into the output directory (before its image.json): the state
    once this capture is committed."""
    save_state(link.out, link.member, link.tc.export_state(committed=True), link.token)


def fail(link: Link) -> None:
    """The command failed: keep every page a later capture needs (module docstring)."""
    tc = link.tc
    tc.abort()
    with _locked():
        if not tc.touched:
            _write_head(link.ident, {**(link.previous or {}), "busy": None})
            return
        state = tc.export_state()
        head: dict[str, Any] = {"token": None, "dir": None, "busy": None}
        head.update(tracker=state.tracker, backend=state.backend)
        if link.parent is not None:
            token = secrets.token_hex(8)
            with contextlib.suppress(OSError):
                save_state(link.parent.path, link.member, state, token)
                head.update(token=token, dir=str(link.parent.path.resolve()))
        _write_head(link.ident, head)
