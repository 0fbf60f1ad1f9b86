"""Shared objects a member leaves to a sibling of its tree group, for one capture.

Owns: which mappings name a shared object (`object_key`: device + inode of the backing,
as /proc/PID/maps shows them, plus the path, since a SysV segment shows its id as inode
and that id may equal a shmem inode on the same device), choosing one owner per object
among the members of a group (`assign`), and the per-process table the capture consults
(`elsewhere`): nodeagent/proc/shared.py takes no page of a mapping whose object another
member owns, and nodeagent/capture/copyout.py records that member as the mapping's
`owner` in the region's mapping facts (docs/decisions.md, "Process trees").

The table is set by the ptrace thread just before a group's capture and cleared right
after (nodeagent/daemon/tree.py); nothing else writes it.
"""

from __future__ import annotations

from collections.abc import Mapping as MappingT
from collections.abc import Sequence
from dataclasses import dataclass

from nodeagent.proc.procfs import Mapping

ObjectKey = tuple[str, int, str]  # (dev, inode, path)
_NOT_OBJECTS = ("/proc/", "/sys/")

_elsewhere: dict[int, dict[ObjectKey, str]] = {}  # pid -> object -> owning member


def object_key(dev: str, inode: int, path: str, shared: bool) -> ObjectKey | None:
    """The object behind a shared mapping, or None when it is none we share out (private
    memory, anonymous without an inode, device memory, /proc and /sys files)."""
    if not shared or inode == 0 or path.startswith(_NOT_OBJECTS):
        return None
    if path.startswith("/dev/") and not path.startswith("/dev/zero"):
        return None  # a device: each process's mapping is read through its page tables
    return (dev, inode, path)


def key_of(m: Mapping) -> ObjectKey | None:
    return object_key(m.dev, m.inode, m.path, m.shared and m.readable)


@dataclass(frozen=True)
class GroupMaps:
    """One member of a group for `assign`: its name, pid, whether it is the root, and the
    objects it maps now."""

    name: str
    pid: int
    root: bool
    objects: frozenset[ObjectKey]


def assign(members: Sequence[GroupMaps]) -> dict[str, dict[ObjectKey, str]]:
    """Per member name, the objects it maps whose owner is another member (object ->
    owner). The owner of an object is the first member mapping it in the order root
    first, then by pid: stable from one generation to the next while the owner maps it."""
    order = sorted(members, key=lambda g: (not g.root, g.pid, g.name))
    owner: dict[ObjectKey, str] = {}
    for g in order:
        for k in g.objects:
            owner.setdefault(k, g.name)
    return {g.name: {k: owner[k] for k in g.objects if owner[k] != g.name} for g in order}


def set_elsewhere(pid: int, table: MappingT[ObjectKey, str]) -> None:
    if table:
        _elsewhere[pid] = dict(table)
    else:
        _elsewhere.pop(pid, None)


def clear(pid: int) -> None:
    _elsewhere.pop(pid, None)


def elsewhere(pid: int) -> dict[ObjectKey, str]:
    """Objects of process `pid` owned by a sibling (object -> owner); empty: none."""
    return _elsewhere.get(pid, {})


def owner_of(pid: int, m: Mapping) -> str:
    """The sibling that stores mapping `m`'s object for process `pid`; "" for none."""
    table = _elsewhere.get(pid)
    if not table:
        return ""
    k = key_of(m)
    return table.get(k, "") if k is not None else ""
