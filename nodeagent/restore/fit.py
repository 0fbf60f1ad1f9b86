"""The fit check of restore in place: does a frozen process still hold a region the
way the generation describes it? (nodeagent/restore/apply.py `check_fit` calls these.)

A region fits when every byte of it is mapped now, none of it in a shared mapping
without write permission (the kernel refuses forced writes there), and:
- when the generation records the region's mappings at the cut (`RegionLayout.mappings`,
  cpcoord/mapfacts.py): every byte lies in a mapping with the same permissions, the
  same sharing (private or shared) and the same backing as then (anonymous, or the same
  device, inode and file offset); bytes unmapped at the cut must still be unmapped.
  A mapping that grew beyond the region is fine (a heap, a stack);
- else (an older generation): a region of the default set, which was one readable and
  writable mapping of the kind its name says, must still be readable, writable and of
  that kind; an explicit region only needs to be mapped.
A misfit raises RegionMismatch naming member, region and what changed.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cpcoord.errors import ContentsInvalid, RegionMismatch
from cpcoord.mapfacts import check_facts, differs, fact_of
from cpcoord.ranges import PAGE_SIZE
from nodeagent.capture.regions import default_region_name
from nodeagent.proc.procfs import Mapping

if TYPE_CHECKING:
    from nodeagent.restore.values import MemberLayout, RegionLayout


def _kind(name: str) -> str:
    """The mapping kind a default-set region name encodes (regions.default_region_name)."""
    return name if name in ("heap", "stack") else name.rpartition("-")[0]


def check_layout(layout: MemberLayout) -> None:
    names: set[str] = set()
    prev: RegionLayout | None = None
    for r in sorted(layout.regions, key=lambda r: r.start):
        if r.start % PAGE_SIZE or r.end % PAGE_SIZE or r.end <= r.start:
            raise ContentsInvalid(layout.member, r.name, "bounds not page-aligned or empty")
        if r.length is not None and not (r.size - PAGE_SIZE < r.length <= r.size):
            raise ContentsInvalid(layout.member, r.name, f"length {r.length} for {r.size} bytes")
        if r.name in names:
            raise ContentsInvalid(layout.member, r.name, "appears twice")
        if prev is not None and r.start < prev.end:
            raise RegionMismatch(layout.member, r.name, f"overlaps region {prev.name}")
        if why := check_facts(r.mappings, r.start, r.end):
            raise ContentsInvalid(layout.member, r.name, f"mappings at the cut: {why}")
        names.add(r.name)
        prev = r


def fit_region(
    member: str,
    r: RegionLayout,
    maps: Sequence[Mapping],
    explicit: bool,
    starts: Sequence[int] | None = None,
) -> None:
    """Raise RegionMismatch unless `r` fits `maps` (module docstring). `starts`: the
    maps' start addresses, computed once per member (thousands of regions)."""
    if starts is None:
        starts = [m.start for m in maps]
    i = max(bisect.bisect_right(starts, r.start) - 1, 0)
    cursor, unmapped, first_hole = r.start, 0, -1
    now: list[Mapping] = []
    for m in maps[i:]:
        if m.start >= r.end:
            break
        if m.end <= cursor:
            continue
        now.append(m)
        if m.start > cursor:
            unmapped += m.start - cursor
            first_hole = cursor if first_hole < 0 else first_hole
        cursor = max(cursor, m.end)
        if m.shared and not m.writable:
            why = f"lies in a read-only shared mapping now ({m.perms} at 0x{m.start:x})"
            raise RegionMismatch(member, r.name, f"0x{r.start:x}-0x{r.end:x} {why}")
    if cursor < r.end:
        unmapped += r.end - cursor
        first_hole = cursor if first_hole < 0 else first_hole
    if unmapped:
        raise RegionMismatch(
            member,
            r.name,
            f"0x{r.start:x}-0x{r.end:x} ({r.size} bytes) is not mapped any more: "
            f"{unmapped} bytes unmapped, the first at 0x{first_hole:x}",
        )
    if r.mappings:
        _same_as_cut(member, r, now)
    elif not explicit:
        _like_default_set(member, r, now)


def _same_as_cut(member: str, r: RegionLayout, now: Sequence[Mapping]) -> None:
    """Every byte of the region lies in a mapping with the permissions and the backing
    it had at the cut (`now`: the mappings over the region, sorted, covering it)."""
    cut = r.mappings
    j = 0
    prev = r.start
    for f in cut:
        if f.start > prev:  # unmapped at the cut, mapped now (every byte is, see above)
            _newly_mapped(member, r, now, prev, f.start)
        prev = f.end
        while j < len(now) and now[j].end <= f.start:
            j += 1
        k = j
        while k < len(now) and now[k].start < f.end:
            m = now[k]
            a, b = max(f.start, m.start), min(f.end, m.end)
            what = differs(f.clipped(a, b), fact_of(m, a, b))
            if what:
                raise RegionMismatch(
                    member,
                    r.name,
                    f"0x{r.start:x}-0x{r.end:x} is mapped otherwise than at the cut at "
                    f"0x{a:x}-0x{b:x}: {what}",
                )
            k += 1
    if prev < r.end:
        _newly_mapped(member, r, now, prev, r.end)


def _newly_mapped(member: str, r: RegionLayout, now: Sequence[Mapping], a: int, b: int) -> None:
    m = next(m for m in now if m.start <= a < m.end)
    what = f"{m.perms} {fact_of(m, a, b).backing()}"
    raise RegionMismatch(
        member, r.name, f"0x{a:x}-0x{b:x} was not mapped at the cut and is now ({what})"
    )


def _like_default_set(member: str, r: RegionLayout, now: Sequence[Mapping]) -> None:
    """A default-set region of a generation that does not record its mappings: it was
    one readable and writable mapping of the kind its name says (regions.py), so it must
    still be readable, writable and of that kind."""
    for m in now:
        kind = _kind(default_region_name(m, unique_kind=True))
        if kind != _kind(r.name):
            raise RegionMismatch(member, r.name, f"is a {kind!r} mapping now at 0x{m.start:x}")
        if not (m.readable and m.writable):
            why = f"was readable and writable at the cut, is {m.perms} now at 0x{m.start:x}"
            raise RegionMismatch(member, r.name, why)
