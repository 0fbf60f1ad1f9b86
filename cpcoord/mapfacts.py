"""Mapping facts: what a region's memory was at the cut, as restore in place checks it.

A `MapFact` is one line of /proc/PID/maps clipped to a region: the bytes `[start, end)`,
their permissions (`rw-p`), and their backing (device + inode + file offset of `start`;
inode 0 is private anonymous memory). The agent records the facts of every region at
each cut (nodeagent/capture/copyout.py), they travel in the upload header and live in the
manifest (`ManifestRegion.mappings`, manifest.proto), and a restore Freeze brings them
back to the agent's fit check (nodeagent/restore/apply.py), which refuses a region whose
memory is now mapped with other permissions or another backing (`differs`).

Shared by the agent and the coordinator (which only validates and stores them).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from cpcoord.gen.v1 import manifest_pb2
from cpcoord.ranges import PAGE_SIZE

MAX_PATH = 256  # characters of the path kept (it only serves messages)
_PERMS = re.compile(r"[r-][w-][x-][sp]")
_OWNER = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")  # a member name
_DEV = re.compile(r"[0-9a-f]{1,8}:[0-9a-f]{1,8}")


@dataclass(frozen=True)
class MapFact:
    start: int
    end: int
    perms: str  # "rw-p"
    dev: str  # "fd:01"; "00:00" for anonymous memory
    inode: int  # 0: private anonymous (heap, stack, MAP_ANONYMOUS|MAP_PRIVATE)
    offset: int  # backing offset of `start`
    path: str = ""  # for messages only: never compared
    # A tree group's shared object stored by this sibling member, not in this region
    # (docs/decisions.md, "Process trees"); empty: stored here. Never compared.
    owner: str = ""
    # A file mapping of a member's whole layout (not of a region's facts): the file's
    # size and mtime at the cut, what a restore re-maps it from (0/0: unknown, never).
    file_size: int = 0
    file_mtime_ns: int = 0

    @property
    def anonymous(self) -> bool:
        return self.inode == 0

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    def clipped(self, start: int, end: int) -> MapFact:
        """The part over `[start, end)` (which must overlap it)."""
        a, b = max(self.start, start), min(self.end, end)
        return replace(self, start=a, end=b, offset=self.offset + (a - self.start))

    def backing(self) -> str:
        """The backing in words, for refusals."""
        if self.anonymous:
            return f"anonymous memory{f' {self.path}' if self.path else ''}"
        name = self.path or "(unnamed)"
        return f"{name} (dev {self.dev} inode {self.inode} offset 0x{self.offset:x})"

    def problem(self) -> str:
        """Why this cannot be a mapping fact (empty: fine)."""
        if not 0 <= self.start < self.end < 1 << 64:
            return f"range 0x{self.start:x}-0x{self.end:x} is empty or out of range"
        if self.start % PAGE_SIZE or self.end % PAGE_SIZE:
            return f"range 0x{self.start:x}-0x{self.end:x} is not page-aligned"
        if not _PERMS.fullmatch(self.perms):
            return f"bad permissions {self.perms!r}"
        if not _DEV.fullmatch(self.dev):
            return f"bad device {self.dev!r}"
        if not 0 <= self.inode < 1 << 64 or not 0 <= self.offset < 1 << 64:
            return "inode or offset out of range"
        if not 0 <= self.file_size < 1 << 64:
            return "file size out of range"
        if len(self.path) > MAX_PATH:
            return f"path longer than {MAX_PATH} characters"
        if self.owner and not _OWNER.fullmatch(self.owner):
            return f"bad owner {self.owner!r}"
        return ""

    def to_proto(self) -> manifest_pb2.RegionMapping:
        return manifest_pb2.RegionMapping(
            start=self.start,
            end=self.end,
            perms=self.perms,
            dev=self.dev,
            inode=self.inode,
            offset=self.offset,
            path=self.path,
            owner=self.owner,
            file_size=self.file_size,
            file_mtime_ns=self.file_mtime_ns,
        )

    @classmethod
    def from_proto(cls, m: manifest_pb2.RegionMapping) -> MapFact:
        return cls(
            m.start, m.end, m.perms, m.dev, m.inode, m.offset, m.path,
            owner=m.owner, file_size=m.file_size, file_mtime_ns=m.file_mtime_ns,
        )  # fmt: skip


class MapsLine(Protocol):
    """What facts_for needs of a /proc/PID/maps line (nodeagent.proc.procfs.Mapping)."""

    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def perms(self) -> str: ...
    @property
    def offset(self) -> int: ...
    @property
    def dev(self) -> str: ...
    @property
    def inode(self) -> int: ...
    @property
    def path(self) -> str: ...


def clip_path(path: str) -> str:
    return path if len(path) <= MAX_PATH else path[: MAX_PATH - 3] + "..."


def fact_of(m: MapsLine, start: int, end: int) -> MapFact:
    """Mapping `m` clipped to `[start, end)` (which must overlap it)."""
    a, b = max(m.start, start), min(m.end, end)
    return MapFact(a, b, m.perms, m.dev, m.inode, m.offset + (a - m.start), clip_path(m.path))


def facts_for(
    maps: Sequence[MapsLine], bounds: Sequence[tuple[int, int]]
) -> list[tuple[MapFact, ...]]:
    """Per `[start, end)` of `bounds`, the mappings of `maps` (sorted, disjoint, as
    /proc/PID/maps lists them) over it, clipped; a binary search per range, so many
    regions over many mappings cost O((regions + overlaps) log mappings)."""
    starts = [m.start for m in maps]
    out = []
    for lo, hi in bounds:
        i = max(bisect.bisect_right(starts, lo) - 1, 0)
        got = []
        while i < len(maps) and maps[i].start < hi:
            if maps[i].end > lo:
                got.append(fact_of(maps[i], lo, hi))
            i += 1
        out.append(tuple(got))
    return out


def check_facts(facts: Sequence[MapFact], start: int, end: int) -> str:
    """Why `facts` cannot describe the region `[start, end)` (empty: fine): each valid,
    inside the region, sorted and disjoint. (Gaps are allowed: unmapped at the cut.)"""
    prev = start
    for f in facts:
        why = f.problem()
        if why:
            return why
        if f.start < prev or f.end > end:
            return f"mapping 0x{f.start:x}-0x{f.end:x} is outside the region or out of order"
        prev = f.end
    return ""


def check_layout_facts(facts: Sequence[MapFact]) -> str:
    """Why `facts` cannot be a member's whole layout at the cut (empty: fine): each
    valid, sorted and disjoint."""
    prev = 0
    for f in facts:
        if why := f.problem():
            return why
        if f.start < prev:
            return f"mapping 0x{f.start:x}-0x{f.end:x} overlaps another or is out of order"
        prev = f.end
    return ""


def to_protos(facts: Iterable[MapFact]) -> list[manifest_pb2.RegionMapping]:
    return [f.to_proto() for f in facts]


def from_protos(msgs: Iterable[manifest_pb2.RegionMapping]) -> tuple[MapFact, ...]:
    return tuple(MapFact.from_proto(m) for m in msgs)


def differs(cut: MapFact, now: MapFact) -> str:
    """What differs between the cut's fact and the mapping now over the same bytes (both
    clipped to them); empty when nothing that matters does."""
    out = []
    if now.perms[:3] != cut.perms[:3]:
        out.append(f"permissions {cut.perms[:3]} -> {now.perms[:3]}")
    if now.shared != cut.shared:
        out.append("private -> shared" if now.shared else "shared -> private")
    if now.anonymous != cut.anonymous or (now.dev, now.inode) != (cut.dev, cut.inode):
        out.append(f"{cut.backing()} -> {now.backing()}")
    elif not cut.anonymous and now.offset != cut.offset:
        out.append(f"file offset 0x{cut.offset:x} -> 0x{now.offset:x}")
    return ", ".join(out)
