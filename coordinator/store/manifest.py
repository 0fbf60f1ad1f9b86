"""The manifest model: a generation's complete map, job -> members -> regions -> page
entries, as frozen values with validation, and `overlay` to build a complete manifest
from a parent's and a capture's page tables. (The file format is manifest_io.py.)

A page entry says: pages [offset, offset + count) of the region hold pages [skip, skip +
count) of chunk `id`, or are all zero when `id` is the ZERO marker (then skip is 0). A
chunk may be one page or a run of pages; the store does not care which. Pages with no
entry were not captured (not present, or unreadable) and restore leaves them alone.

A manifest is complete: it lists every captured page of the generation, so restore and
export read one manifest and never walk a parent chain.

Each region records the member's mappings over it at the cut (`RegionMap.mappings`;
none in manifests written before they were): restore in place refuses a region whose
memory is mapped otherwise now. A member of the default (whole-memory) region set also
carries every thread's registers at the cut (`MemberMap.threads`, opaque bytes to the
store): restore in place of a whole address space puts them back. Explicit-region
members and older manifests have none.

Page tables are four aligned NumPy columns (offsets u64, counts u32, skips u32, ids V32),
44 bytes per entry; validation and overlay are vectorised, never a loop per page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from cpcoord.errors import ManifestInvalid
from cpcoord.kstate import KernelState
from cpcoord.mapfacts import MapFact, check_facts
from storecore.ids import ID_DTYPE, IdArray, as_id_array, unique_ids, zero_mask

FORMAT = 1
MAX_NAME = 1024
MAX_REGS = 1 << 16  # bytes of one thread's register set (an XSAVE area is a few KiB)


@dataclass(frozen=True)
class ThreadRegs:
    """One thread's registers at the cut (manifest.proto ManifestThread)."""

    tid: int
    arch: str
    regs: bytes = field(repr=False)  # may hold secrets: never printed
    fpregs: bytes = field(repr=False)
    start_time: int = 0  # clock ticks since boot (tells a reused tid apart); 0 = unknown

    def problem(self) -> str:
        """Why this cannot be a thread's saved state (empty: fine)."""
        if not 1 <= self.tid < 1 << 31:
            return f"thread id {self.tid} out of range"
        if not 0 <= self.start_time < 1 << 64:
            return f"thread {self.tid}: start time out of range"
        if not self.arch or len(self.arch) > 32:
            return f"thread {self.tid}: empty or overlong arch"
        if not self.regs or len(self.regs) > MAX_REGS or len(self.fpregs) > MAX_REGS:
            return f"thread {self.tid}: register sets of {len(self.regs)}/{len(self.fpregs)} bytes"
        return ""


@dataclass(frozen=True, eq=False)
class PageTable:
    """Page entries of one region, sorted by offset, non-overlapping."""

    offsets: npt.NDArray[np.uint64]
    counts: npt.NDArray[np.uint32]
    skips: npt.NDArray[np.uint32]
    ids: IdArray

    @staticmethod
    def of(offsets: Any, counts: Any, ids: Any, skips: Any = None) -> PageTable:
        o = np.ascontiguousarray(offsets, dtype=np.uint64).reshape(-1)
        c = np.ascontiguousarray(counts, dtype=np.uint32).reshape(-1)
        i = as_id_array(ids)
        s = (
            np.zeros(o.size, dtype=np.uint32)
            if skips is None
            else np.ascontiguousarray(skips, dtype=np.uint32).reshape(-1)
        )
        if not (o.size == c.size == s.size == i.size):
            raise ManifestInvalid("?", "?", "page table columns differ in length")
        return PageTable(o, c, s, i)

    @staticmethod
    def empty() -> PageTable:
        return PageTable.of([], [], np.zeros(0, ID_DTYPE))

    def __len__(self) -> int:
        return int(self.offsets.size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageTable):
            return NotImplemented
        return (
            np.array_equal(self.offsets, other.offsets)
            and np.array_equal(self.counts, other.counts)
            and np.array_equal(self.skips, other.skips)
            and bool(np.all(self.ids == other.ids))
            and len(self) == len(other)
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def page_count(self) -> int:
        return int(self.counts.sum(dtype=np.uint64))

    @property
    def zero(self) -> npt.NDArray[np.bool_]:
        return zero_mask(self.ids)

    @property
    def zero_pages(self) -> int:
        return int(self.counts[self.zero].sum(dtype=np.uint64))

    def problems(self, region_pages: int) -> list[str]:
        """Why this table cannot describe a region of `region_pages` pages (empty: fine)."""
        out = []
        if np.any(self.counts == 0):
            out.append("an entry covers no page")
        ends = self.offsets + self.counts.astype(np.uint64)
        if np.any(ends < self.offsets):
            out.append("page offset overflows")
        if len(self) > 1 and np.any(self.offsets[1:] < ends[:-1]):
            out.append("entries are not sorted and disjoint")
        if len(self) and int(ends.max()) > region_pages:
            out.append(f"an entry ends beyond the region's {region_pages} pages")
        if np.any(self.skips[self.zero] != 0):
            out.append("a zero entry has a chunk skip")
        return out

    def expand(self) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64], npt.NDArray]:
        """Per page: (page offset, entry index, page index within the chunk)."""
        n = self.page_count
        entry = np.repeat(np.arange(len(self), dtype=np.int64), self.counts)
        first = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)[:-1]])
        within = np.arange(n, dtype=np.int64) - first[entry]
        pages = self.offsets[entry] + within.astype(np.uint64)
        return pages, entry, self.skips[entry].astype(np.int64) + within


@dataclass(frozen=True)
class RegionMap:
    name: str
    start: int
    end: int
    pages: PageTable = field(default_factory=PageTable.empty)
    # The member's mappings over the region at the cut (cpcoord/mapfacts.py): what a
    # restore in place checks the process against. Empty in older manifests.
    mappings: tuple[MapFact, ...] = ()


@dataclass(frozen=True)
class MemberMap:
    name: str
    regions: tuple[RegionMap, ...]
    threads: tuple[ThreadRegs, ...] = ()  # sorted by tid; empty: no registers saved
    # Whole-memory members: the kernel side at the cut (fds, offsets, pipe and socket
    # queues) that a restore in place compares with; None in older manifests.
    kernel: KernelState | None = None
    # Every mapping of the member at the cut (whole memory; ManifestMember.layout):
    # what a restore in place puts the layout back to. Empty: not recorded.
    layout: tuple[MapFact, ...] = ()

    def region(self, name: str) -> RegionMap:
        """By name: one dict lookup (a member may have tens of thousands of regions)."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(name) from None

    @cached_property
    def _by_name(self) -> dict[str, RegionMap]:
        return {r.name: r for r in self.regions}


@dataclass(frozen=True)
class Manifest:
    """A generation's complete map. `namespace` is filled in by the store at commit."""

    job: str
    generation: int
    parent: int | None
    time_ns: int
    page_size: int
    members: tuple[MemberMap, ...]
    namespace: str = ""

    def member(self, name: str) -> MemberMap:
        return self._by_name[name]

    @cached_property
    def _by_name(self) -> dict[str, MemberMap]:
        # Built once: every upload of a job with thousands of members looks its parent up.
        return {m.name: m for m in self.members}

    def tables(self) -> list[tuple[str, RegionMap]]:
        return [(m.name, r) for m in self.members for r in m.regions]

    @property
    def page_count(self) -> int:
        return sum(r.pages.page_count for _, r in self.tables())

    @property
    def zero_pages(self) -> int:
        return sum(r.pages.zero_pages for _, r in self.tables())

    @property
    def logical_bytes(self) -> int:
        return self.page_count * self.page_size

    def chunk_ids(self, member: str | None = None) -> IdArray:
        """Sorted unique non-zero chunk ids (of one member, or of all)."""
        parts = [
            r.pages.ids[~r.pages.zero] for m, r in self.tables() if member is None or m == member
        ]
        return unique_ids(np.concatenate(parts)) if parts else np.zeros(0, ID_DTYPE)

    def validate(self) -> None:
        """Raise ManifestInvalid naming the first problem found."""

        def bad(why: str) -> ManifestInvalid:
            return ManifestInvalid(self.generation, self.job, why)

        if not self.job or len(self.job) > MAX_NAME:
            raise bad("empty or overlong job name")
        if self.generation < 1:
            raise bad("generation numbers start at 1")
        if self.parent is not None and not 1 <= self.parent < self.generation:
            raise bad(f"parent {self.parent} is not an earlier generation")
        ps = self.page_size
        if ps < 512 or ps & (ps - 1) or ps > 1 << 30:
            raise bad(f"page size {ps} is not a power of two in 512..1 GiB")
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise bad("duplicate member name")
        for m in self.members:
            if not m.name or len(m.name) > MAX_NAME:
                raise bad("empty or overlong member name")
            tids = [t.tid for t in m.threads]
            if tids != sorted(set(tids)):
                raise bad(f"member {m.name}: thread ids not sorted and unique")
            for t in m.threads:
                if why := t.problem():
                    raise bad(f"member {m.name}: {why}")
            rnames = [r.name for r in m.regions]
            if len(set(rnames)) != len(rnames):
                raise bad(f"member {m.name}: duplicate region name")
            for r in m.regions:
                where = f"member {m.name} region {r.name}"
                if not r.name or len(r.name) > MAX_NAME:
                    raise bad(f"member {m.name}: empty or overlong region name")
                if r.start % ps or r.end % ps or not r.start < r.end or r.end > 1 << 64:
                    raise bad(f"{where}: [{r.start:#x}, {r.end:#x}) is not page-aligned")
                for why in r.pages.problems((r.end - r.start) // ps):
                    raise bad(f"{where}: {why}")
                if why := check_facts(r.mappings, r.start, r.end):
                    raise bad(f"{where}: mappings at the cut: {why}")


def overlay(
    base: PageTable, delta: PageTable, present: npt.NDArray[np.uint64] | None = None
) -> PageTable:
    """The complete page table of a region after an incremental capture: `delta`'s pages
    over `base`'s, keeping only base pages listed in `present` (sorted page offsets of
    pages the region holds now) when given. Adjacent pages of one chunk coalesce.
    Vectorised; costs ~24 bytes of temporary memory per page of the two tables."""
    bp, be, bs = base.expand()
    dp, de, ds = delta.expand()
    keep = np.ones(bp.size, dtype=bool)
    if dp.size:
        pos = np.minimum(np.searchsorted(dp, bp), dp.size - 1)
        keep &= dp[pos] != bp
    if present is not None:
        pr = np.asarray(present, dtype=np.uint64)
        if pr.size:
            pos = np.minimum(np.searchsorted(pr, bp), pr.size - 1)
            keep &= pr[pos] == bp
        else:
            keep[:] = False
    pages = np.concatenate([bp[keep], dp])
    ids = np.concatenate([base.ids[be[keep]], delta.ids[de]])
    skips = np.concatenate([bs[keep], ds])
    order = np.argsort(pages, kind="stable")
    pages, ids, skips = pages[order], ids[order], skips[order]
    zero = zero_mask(ids)
    skips[zero] = 0
    if not pages.size:
        return PageTable.empty()
    brk = np.ones(pages.size, dtype=bool)
    brk[1:] = (
        (pages[1:] != pages[:-1] + 1)
        | (ids[1:] != ids[:-1])
        | (~zero[1:] & (skips[1:] != skips[:-1] + 1))
    )
    starts = np.flatnonzero(brk)
    counts = np.diff(np.append(starts, pages.size))
    return PageTable.of(pages[starts], counts, ids[starts], skips[starts])
