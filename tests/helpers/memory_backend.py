"""A LocalBackend for tests: real capture and restore, generations kept in memory.

It does on one node, without a coordinator, what the agent does behind the local API:
members register regions; a checkpoint captures them (nodeagent.capture.process, the page-rounded
ranges) and keeps copies of the pages as a numbered generation of the job; a restore
writes a generation's regions into the caller with nodeagent.restore.apply.restore_into at the
addresses it registered now. Also a template for the agent's implementation.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from cpcoord.errors import (
    DuplicateMember,
    NoSuchGeneration,
    RegionNotRegistered,
    UnknownMember,
)
from cpcoord.ranges import AddressRange
from nodeagent.capture.process import capture
from nodeagent.localapi.rules import (
    LocalRegion,
    LocalRestoreResult,
    Membership,
    Registration,
    RestoreRequest,
)
from nodeagent.proc.procfs import ProcessIdentity
from nodeagent.restore.apply import RegionContents, restore_into


@dataclass
class _Member:
    process: ProcessIdentity
    uid: int
    regions: dict[str, LocalRegion] = field(default_factory=dict)


@dataclass
class MemoryBackend:
    members: dict[tuple[str, str], _Member] = field(default_factory=dict)
    # job -> generation -> member -> region name -> contents
    generations: dict[str, dict[int, dict[str, dict[str, RegionContents]]]] = field(
        default_factory=dict
    )
    calls: list[tuple[str, int]] = field(default_factory=list)  # (op, pid) as called
    lock: threading.RLock = field(default_factory=threading.RLock)

    def membership(self, process: ProcessIdentity) -> Membership | None:
        with self.lock:
            for (job, name), m in self.members.items():
                if m.process == process:
                    return Membership(job, name, m.uid)
        return None

    def job_owners(self, job: str) -> Mapping[str, int]:
        with self.lock:
            return {name: m.uid for (j, name), m in self.members.items() if j == job}

    def register(self, r: Registration) -> Membership:
        process, uid, job, member = r.process, r.uid, r.job, r.member
        with self.lock:
            self.calls.append(("register", process.pid))
            m = self.members.get((job, member))
            if m is not None and m.process != process and m.process.alive():
                raise DuplicateMember(job, member)
            if m is None or m.process != process:
                m = _Member(process, uid)  # new, or a restarted process taking over
                self.members[(job, member)] = m
            for g in r.regions:
                m.regions[g.name] = g
            return Membership(job, member, uid)

    def unregister(self, process: ProcessIdentity, names: Sequence[str]) -> None:
        with self.lock:
            m = self._member_of(process)
            for n in names:
                if n not in m.regions:
                    raise RegionNotRegistered(process.pid, n)
                del m.regions[n]

    def _member_of(self, process: ProcessIdentity) -> _Member:
        for m in self.members.values():
            if m.process == process:
                return m
        raise UnknownMember("?", str(process.pid), "")

    def _capture(self, m: _Member) -> dict[str, RegionContents]:
        regions = sorted(m.regions.values(), key=lambda r: r.start)
        cap = capture(m.process, [AddressRange(r.start, r.end) for r in regions])
        by_start = {c.start: c for c in cap.regions}
        return {
            r.name: replace(RegionContents.from_captured(by_start[r.start]), name=r.name)
            for r in regions
        }

    def _commit(self, job: str, contents: dict[str, dict[str, RegionContents]]) -> int:
        gens = self.generations.setdefault(job, {})
        latest = max(gens, default=0)
        merged = {**gens.get(latest, {}), **contents}  # members not captured: as before
        gens[latest + 1] = merged
        return latest + 1

    def checkpoint_member(self, process: ProcessIdentity, membership: Membership) -> int:
        with self.lock:
            self.calls.append(("checkpoint_member", process.pid))
            m = self.members[(membership.job, membership.member)]
            return self._commit(membership.job, {membership.member: self._capture(m)})

    def checkpoint_job(self, job: str) -> int:
        with self.lock:
            self.calls.append(("checkpoint_job", 0))
            got = {
                name: self._capture(m)
                for (j, name), m in self.members.items()
                if j == job and m.process.alive()
            }
            return self._commit(job, got)

    def restore(self, r: RestoreRequest) -> LocalRestoreResult:
        process, job, member = r.process, r.membership.job, r.membership.member
        with self.lock:
            self.calls.append(("restore", process.pid))
            gens = self.generations.get(job, {})
            gen = r.generation or max(gens, default=0)
            if gen not in gens or member not in gens[gen]:
                raise NoSuchGeneration(gen, job)
            m = self.members[(job, member)]
            wanted = list(r.names) if r.names else sorted(m.regions)
            for n in wanted:
                if n not in m.regions:
                    raise RegionNotRegistered(process.pid, n)
            now = {n: (m.regions[n].addr, m.regions[n].size) for n in wanted}
            restore_into(process, now, gens[gen][member], member=member)
            return LocalRestoreResult(job, member, gen, tuple((n, now[n][1]) for n in wanted))
