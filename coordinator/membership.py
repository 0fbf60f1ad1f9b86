"""Jobs and members as the coordinator records them: who is in a job, on which node, as
which process, with which regions, and how far its tracker is.

A member lives in the catalog (`members` table, its JSON `info` column, owned here), so
membership survives a coordinator restart. The pid is only a binding, checked against
the process start time. A member whose process exited stays recorded as gone (reported,
never silently dropped) until someone detaches it.

`committed` is the last committed generation that holds the member: its agent's tracker
counts changes since that generation's cut. When it is not the job's latest committed
generation (a first capture, a member added later, the latest generation deleted), the
next capture of that member must be full; the engine asks for that.

Thread-safety: callers hold the engine lock.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from coordinator.store.catalog import Catalog
from cpcoord.errors import (
    DuplicateMember,
    InvalidArgument,
    RangeBeyondAddressSpace,
    RangesOverlap,
    UnknownMember,
)
from cpcoord.ranges import PAGE_SIZE, check_name, user_space_end

MAX_REGIONS = 4096


@dataclass(frozen=True)
class RegionDef:
    """A named half-open address range of a member."""

    name: str
    start: int
    end: int


@dataclass(frozen=True)
class MemberRec:
    job: str
    name: str
    node: str
    pid: int
    start_time: int = 0  # clock ticks since boot (field 22 of /proc/PID/stat)
    regions: tuple[RegionDef, ...] = ()  # empty: every writable private mapping
    tracker: str = ""  # requested, then as armed by the agent
    attached_ms: int = 0
    committed: int = 0  # last committed generation holding it (tracker base); 0 none
    gone: bool = False  # its process exited
    detail: str = ""  # how it exited
    group: str = ""  # tree group (its root member's name; coordinator/tree_members.py)

    def to_info(self) -> str:
        d = asdict(self)
        del d["job"], d["name"]
        d["regions"] = [[r.name, r.start, r.end] for r in self.regions]
        return json.dumps(d, sort_keys=True)

    @staticmethod
    def from_info(job: str, name: str, info: str) -> MemberRec:
        d: dict[str, Any] = json.loads(info or "{}")
        regions = tuple(RegionDef(str(n), int(s), int(e)) for n, s, e in d.pop("regions", []))
        known = {k: v for k, v in d.items() if k in MemberRec.__dataclass_fields__}
        known.setdefault("node", "")
        known.setdefault("pid", 0)
        return MemberRec(job=job, name=name, regions=regions, **known)


def check_regions(items: Sequence[tuple[str, int, int]]) -> tuple[RegionDef, ...]:
    """Validate explicit regions: page-aligned, non-empty, inside the user address space,
    non-overlapping, names unique (empty names become r0, r1, ... by address order)."""
    if len(items) > MAX_REGIONS:
        raise InvalidArgument(f"{len(items)} regions: at most {MAX_REGIONS} per member")
    out = []
    for i, (name, start, end) in enumerate(items):
        rng = f"0x{start:x}-0x{end:x}"
        if start % PAGE_SIZE or end % PAGE_SIZE:
            raise InvalidArgument(f"region {name or i}: {rng} is not page-aligned")
        if end <= start:
            raise InvalidArgument(f"region {name or i}: {rng} is empty or inverted")
        if end > user_space_end():
            raise RangeBeyondAddressSpace(rng, f"0x{user_space_end():x}")
        out.append(RegionDef(name, start, end))
    out.sort(key=lambda r: r.start)
    for a, b in itertools.pairwise(out):
        if b.start < a.end:
            raise RangesOverlap(f"0x{a.start:x}-0x{a.end:x}", f"0x{b.start:x}-0x{b.end:x}")
    named = [r if r.name else replace(r, name=f"r{i}") for i, r in enumerate(out)]
    for r in named:
        check_name(r.name)
    names = [r.name for r in named]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"duplicate region name in {sorted(names)}")
    return tuple(named)


class Membership:
    """Members by job, cached in memory, written through to the catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._jobs: dict[str, dict[str, MemberRec]] = {}
        for job in catalog.jobs():
            self._jobs[job] = {
                m.name: MemberRec.from_info(job, m.name, m.info) for m in catalog.members(job)
            }

    def jobs(self) -> list[str]:
        return sorted(self._jobs)

    def has_job(self, job: str) -> bool:
        return job in self._jobs

    def of_job(self, job: str) -> list[MemberRec]:
        return [self._jobs[job][n] for n in sorted(self._jobs.get(job, {}))]

    def on_node(self, node: str) -> list[MemberRec]:
        return [m for job in self.jobs() for m in self.of_job(job) if m.node == node]

    def get(self, job: str, name: str) -> MemberRec | None:
        return self._jobs.get(job, {}).get(name)

    def require(self, job: str, name: str) -> MemberRec:
        rec = self.get(job, name)
        if rec is None:
            raise UnknownMember(job, name, "")
        return rec

    def check_new(self, job: str, name: str) -> None:
        check_name(job)
        check_name(name)
        if self.get(job, name) is not None:
            raise DuplicateMember(job, name)

    def add(self, rec: MemberRec) -> MemberRec:
        self.check_new(rec.job, rec.name)
        rec = replace(rec, attached_ms=rec.attached_ms or int(time.time() * 1000))
        if not self._catalog.add_member(rec.job, rec.name, rec.to_info()):
            raise DuplicateMember(rec.job, rec.name)
        self._jobs.setdefault(rec.job, {})[rec.name] = rec
        return rec

    def update(self, rec: MemberRec) -> MemberRec:
        if self.get(rec.job, rec.name) is None:
            raise UnknownMember(rec.job, rec.name, "")
        self._catalog.set_member_info(rec.job, rec.name, rec.to_info())
        self._jobs[rec.job][rec.name] = rec
        return rec

    def update_all(self, recs: Iterable[MemberRec]) -> None:
        """Update many members in one catalog transaction (one fsync, not one each: a
        commit of a 2,000-member job records every member's new base)."""
        todo = list(recs)
        for r in todo:
            if self.get(r.job, r.name) is None:
                raise UnknownMember(r.job, r.name, "")
        self._catalog.set_member_infos([(r.job, r.name, r.to_info()) for r in todo])
        for r in todo:
            self._jobs[r.job][r.name] = r

    def remove(self, job: str, name: str) -> MemberRec:
        rec = self.require(job, name)
        self._catalog.remove_member(job, name)
        del self._jobs[job][name]
        return rec

    def ensure_job(self, job: str) -> None:
        self._jobs.setdefault(job, {})
