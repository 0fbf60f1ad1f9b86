"""Process trees on the agent: a root member and its descendants as one group.

Owns (docs/decisions.md, "Process trees"):
- finding a root's descendants (`descendants`: the parent links of /proc/*/stat) and
  holding each new one as member `<group>.<pid>` of the root's job and group, with every
  mapping by default and the root's tracker preference (`rescan`, at attach and at each
  Freeze; the coordinator learns of them from a TreeMembers event and records them);
- refusing a Freeze that would freeze part of a group (`split`);
- before a group's capture, choosing the one member that stores each shared object
  (nodeagent/proc/owners.py; `own`, `release`). A member that becomes an object's owner
  needs nothing special: every capture delivers every page of a shared mapping
  (docs/decisions.md, "Shared mappings are changed at every capture").
A descendant that exits is reported MemberGone like any member; the coordinator drops
it (coordinator/members_ops.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from cpcoord.errors import CpcoordError
from cpcoord.gen.v1 import agent_pb2
from nodeagent.daemon.membership import HeldMember
from nodeagent.daemon.worker_state import WorkerState
from nodeagent.proc import owners
from nodeagent.proc.mapscache import read_maps_shared
from nodeagent.proc.procfs import ProcessIdentity

log = logging.getLogger(__name__)


def descendants(root: int) -> list[int]:
    """Every live descendant of `root` (children of its threads too), parents first."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                rest = f.read().rpartition(b")")[2].split()
        except OSError:
            continue  # gone meanwhile
        if len(rest) > 2 and rest[0] not in (b"Z", b"X"):
            children.setdefault(int(rest[1]), []).append(int(name))
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop(0)
        kids = sorted(children.get(pid, []))
        out.extend(kids)
        todo.extend(kids)
    return out


def same_descendant(old: HeldMember, new: HeldMember) -> bool:
    """A re-attach (after a reconnect) of a descendant the root's rescan holds already:
    the same process in the same group, whatever tracker preference the record names."""
    return (
        bool(new.group)
        and new.group != new.name
        and (old.ident, old.group, old.regions)
        == (
            new.ident,
            new.group,
            new.regions,
        )
    )


def member_name(group: str, pid: int) -> str:
    return f"{group}.{pid}"


def rescan(st: WorkerState, job: str, epoch: int) -> list[HeldMember]:
    """Hold the new descendants of every tree root of `job` as members of its group and
    report them (TreeMembers). Returns those added."""
    added: list[HeldMember] = []
    held = st.members.of_job(job)
    for root in [m for m in held if m.group and m.group == m.name and m.alive]:
        have = {m.ident.pid for m in held if m.group == root.group and m.alive}
        joined: list[HeldMember] = []
        for pid in descendants(root.ident.pid):
            if pid in have or st.members.by_pid(pid) is not None:
                continue  # held already (in this group, or attached on its own)
            try:
                ident = ProcessIdentity.of(pid)
            except CpcoordError:
                continue  # exited meanwhile
            name = member_name(root.group, pid)
            old = st.members.get(job, name)
            if old is not None:  # an exited one of the same pid, not yet dropped
                st.members.remove(job, name)
            m = HeldMember(job, name, ident, None, root.tracker_pref, group=root.group)
            st.members.add(m)
            st.watch.add(m.key, m.ident)
            joined.append(m)
        if joined:
            log.info(
                "tree members found",
                extra={"fields": {"job": job, "group": root.group, "members": len(joined)}},
            )
            msg = agent_pb2.TreeMembers(
                job=job,
                group=root.group,
                joined=[m.member_proto() for m in joined],
                tracker=root.tracker_pref if root.tracker_pref != "auto" else "",
            )
            st.emit(agent_pb2.AgentMessage(tree_members=msg), epoch)
            added.extend(joined)
    return added


def split(st: WorkerState, job: str, targets: Sequence[HeldMember]) -> dict[str, list[str]]:
    """Groups of which `targets` holds some members but not every live one: group ->
    the missing names. A Freeze of part of a group is refused (it would let a running
    sibling change their shared memory under the cut or the rollback)."""
    names = {m.name for m in targets}
    out: dict[str, list[str]] = {}
    for g in {m.group for m in targets if m.group}:
        missing = [
            m.name
            for m in st.members.of_job(job)
            if m.group == g and m.alive and m.name not in names
        ]
        if missing:
            out[g] = sorted(missing)
    return out


def own(members: Sequence[HeldMember]) -> None:
    """Before capturing `members` (frozen, of one Capture): set which shared objects each
    member of a group leaves to its owner (nodeagent/proc/owners.py)."""
    groups: dict[str, list[HeldMember]] = {}
    for m in members:
        if m.group:
            groups.setdefault(m.group, []).append(m)
    for group, ms in groups.items():
        entries = []
        for m in ms:
            try:
                maps = read_maps_shared(m.ident.pid)
            except CpcoordError:
                maps = []  # exited: its capture finds out
            keys = frozenset(k for k in map(owners.key_of, maps) if k is not None)
            entries.append(owners.GroupMaps(m.name, m.ident.pid, m.name == group, keys))
        table = owners.assign(entries)
        for m in ms:
            owners.set_elsewhere(m.ident.pid, table.get(m.name, {}))


def release(members: Sequence[HeldMember]) -> None:
    """After the capture: the ownership table is for one capture only."""
    for m in members:
        owners.clear(m.ident.pid)
