"""Which address ranges a capture covers: region specs, the default set, and segments.

Owns: turning `--range` values (or nothing) plus a maps snapshot into named, page-aligned
regions, and each region into the readable pieces of mappings it covers.

Rules (docs/decisions.md "Capture and images"):
- A region is `[start, end)` with page-aligned bounds: the whole pages inside the range
  as given (`AddressRange.page_start/page_end`), since a page partly outside is never taken.
- No range given: one region per writable, readable mapping, except shared mappings of
  regular files that still exist on disk (their contents already live in that file).
  Private mappings, heap, stacks, shared anonymous memory, memfd and SysV shm are in.
- Mappings without read permission (PROT_NONE guards, `-w-p`) are never read.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cpcoord.errors import RangesOverlap, RangeUnmapped
from cpcoord.ranges import PAGE_SHIFT, AddressRange
from nodeagent.pages import Runs, pages_from_runs
from nodeagent.proc.mapscache import derived
from nodeagent.proc.procfs import Mapping

NAME_MAX = 64


@dataclass(frozen=True)
class RegionSpec:
    """A named, page-aligned address range of a process to capture."""

    name: str
    start: int
    end: int
    requested: AddressRange | None = None  # the range as the user gave it; None: default

    @property
    def range(self) -> AddressRange:
        return AddressRange(self.start, self.end)

    @property
    def size(self) -> int:
        return self.end - self.start


def is_default_mapping(m: Mapping) -> bool:
    """Whether a mapping belongs to the default region set."""
    if not (m.readable and m.writable):
        return False
    # A shared mapping of a file that still exists is the file's business, not ours;
    # a deleted one is the only copy left, so it is captured.
    return not (m.shared and m.is_regular_file and not m.deleted)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _kind(m: Mapping) -> str:
    path = m.path.removesuffix(" (deleted)")
    if path == "[heap]":
        return "heap"
    if path == "[stack]":
        return "stack"
    if path.startswith("[") and path.endswith("]"):  # [anon:name], [anon_shmem:name], ...
        return "anon-" + path[1:-1].split(":", 1)[-1]
    if not path:
        return "anon"
    if path.startswith("/memfd:"):
        return "memfd-" + path[len("/memfd:") :]
    if path.startswith("/SYSV"):
        return "sysv-" + path[len("/SYSV") :]
    if path == "/dev/zero":
        return "shmem"  # shared anonymous memory shows up as "/dev/zero (deleted)"
    return "file-" + path.rsplit("/", 1)[-1]


def default_region_name(m: Mapping, unique_kind: bool = False) -> str:
    """`<kind>-<start hex>`, e.g. `anon-7f3a10000000`, `file-libc.so.6-7f3a2e1d5000`:
    path-safe, unique per mapping, stable while the mapping does not move. The heap and
    the main stack are plain `heap` / `stack` when the maps hold only one of each, so
    their names survive growth (the stack's start moves down as it grows)."""
    return _name_of_kind(m, _kind(m), unique_kind)


def _name_of_kind(m: Mapping, kind: str, unique_kind: bool) -> str:
    if kind == "anon":  # most mappings of a big process: no pattern to apply
        return f"anon-{m.start:x}"
    kind = _UNSAFE.sub("_", kind).lstrip(".") or "anon"
    if unique_kind and kind in ("heap", "stack"):
        return kind
    suffix = f"-{m.start:x}"
    return kind[: NAME_MAX - len(suffix)] + suffix


def default_regions(maps: Sequence[Mapping]) -> list[RegionSpec]:
    """One region per default mapping, sorted. Linear, a few microseconds a mapping:
    it runs in the frozen window, over tens of thousands of mappings for some processes."""
    chosen = [m for m in maps if is_default_mapping(m)]
    if any(a.start > b.start for a, b in itertools.pairwise(chosen)):  # /proc sorts them
        chosen.sort(key=lambda m: m.start)
    kinds = [_kind(m) for m in chosen]
    counts = Counter(kinds)
    return [
        RegionSpec(_name_of_kind(m, k, counts[k] == 1), m.start, m.end)
        for m, k in zip(chosen, kinds, strict=True)
    ]


def range_region_name(rng: AddressRange) -> str:
    """`range-<page_start hex>-<page_end hex>`: names the whole pages the range covers."""
    return f"range-{rng.page_start:x}-{rng.page_end:x}"


def range_regions(
    ranges: Sequence[AddressRange], maps: Sequence[Mapping], pid: int
) -> list[RegionSpec]:
    """One region per range (sorted by address). Raises RangeUnmapped when a range touches
    no mapping at all, RangesOverlap when two ranges share a page."""
    specs: list[RegionSpec] = []
    for rng in ranges:
        rng.validate()
        spec = RegionSpec(range_region_name(rng), rng.page_start, rng.page_end, rng)
        if not any(m.start < spec.end and spec.start < m.end for m in maps):
            raise RangeUnmapped(rng.format(), pid)
        specs.append(spec)
    specs.sort(key=lambda s: s.start)
    for a, b in itertools.pairwise(specs):
        if b.start < a.end:
            ra = a.requested.format() if a.requested else a.range.format()
            rb = b.requested.format() if b.requested else b.range.format()
            raise RangesOverlap(ra, rb)
    return specs


@derived
def resolve_regions(
    ranges: Sequence[AddressRange] | None, maps: Sequence[Mapping], pid: int
) -> list[RegionSpec]:
    """Regions for explicit ranges, or the default set when `ranges` is None. Remembered
    per (ranges, maps) lists (nodeagent/proc/mapscache.py): the result is shared."""
    if ranges is None:
        return default_regions(maps)
    return range_regions(ranges, maps, pid)


def segments(region: RegionSpec, maps: Sequence[Mapping]) -> list[tuple[int, int]]:
    """The page-aligned `[start, end)` pieces of `region` that lie in readable mappings,
    sorted. Mappings are page-aligned, and so are region bounds, so the pieces are too."""
    lo, hi = segment_pages([region], maps)
    return [(int(a) << PAGE_SHIFT, int(b) << PAGE_SHIFT) for a, b in zip(lo, hi, strict=True)]


@derived
def segment_pages(
    specs: Sequence[RegionSpec], maps: Sequence[Mapping]
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Page numbers `[lo, hi)` of every readable piece of every region, sorted.
    Remembered per (regions, maps) lists (nodeagent/proc/mapscache.py): shared arrays.

    `specs` must be sorted and disjoint; so are the readable mappings (the kernel keeps
    them so). Intersecting two sorted interval lists is done in bulk: per region, the
    first and last overlapping mapping by searchsorted, then every (region, mapping)
    pair expanded at once.
    """
    shift = np.uint64(PAGE_SHIFT)
    ms = np.array([m.start for m in maps if m.readable], dtype=np.uint64) >> shift
    me = np.array([m.end for m in maps if m.readable], dtype=np.uint64) >> shift
    order = np.argsort(ms)
    ms, me = ms[order], me[order]
    rs = np.array([s.start for s in specs], dtype=np.uint64) >> shift
    re_ = np.array([s.end for s in specs], dtype=np.uint64) >> shift
    i0 = np.searchsorted(me, rs, side="right")
    i1 = np.searchsorted(ms, re_, side="left")
    counts = np.maximum(i1 - i0, 0)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64)
    ridx = np.repeat(np.arange(rs.size), counts)
    # Mapping index of each pair: i0 of its region plus its rank within the region.
    firsts = np.cumsum(counts) - counts
    midx = i0[ridx] + (np.arange(total) - firsts[ridx])
    return np.maximum(ms[midx], rs[ridx]), np.minimum(me[midx], re_[ridx])


def _identity(m: Mapping) -> tuple[str, int, str, int, str]:
    # What a mapping is, apart from where it ends: growth keeps it, anything else not.
    return (m.perms, m.offset, m.dev, m.inode, m.path)


def new_or_changed_runs(armed: Sequence[Mapping], now: Sequence[Mapping]) -> Runs:
    """Runs `[first page, count]` of readable mappings in `now` that a tracker armed on
    `armed` cannot answer for, so they count as fully changed (trackers/base.py): mappings
    that are new, moved (mremap), or changed in permissions, file, offset; and the grown
    tail of a mapping that kept its start and identity (heap growth, mremap in place).
    Sorted. Runs, not pages: a new sparse mapping may span far more pages than it holds.
    """
    if len(armed) == len(now) and all(a is b or a == b for a, b in zip(armed, now, strict=True)):
        # The common case, a check per mapping: unchanged maps lines are parsed once and
        # shared (procfs.parse_maps), so this is mostly an identity test.
        return np.zeros((0, 2), dtype=np.uint64)
    before = {m.start: m for m in armed}
    lo: list[int] = []
    hi: list[int] = []
    for m in now:
        if not m.readable:
            continue
        old = before.get(m.start)
        if old is not None and _identity(old) == _identity(m):
            if m.end > old.end:
                lo.append(old.end)
                hi.append(m.end)
            continue
        lo.append(m.start)
        hi.append(m.end)
    if not lo:
        return np.zeros((0, 2), dtype=np.uint64)
    runs = np.array([lo, hi], dtype=np.uint64).T >> np.uint64(PAGE_SHIFT)
    runs[:, 1] -= runs[:, 0]  # [first page, count]
    return runs[np.argsort(runs[:, 0])]


def new_or_changed_pages(
    armed: Sequence[Mapping], now: Sequence[Mapping]
) -> npt.NDArray[np.uint64]:
    """`new_or_changed_runs` as sorted page numbers (one vectorised expand)."""
    return pages_from_runs(new_or_changed_runs(armed, now))


@derived
def readable_table(maps: Sequence[Mapping]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.bool_]]:
    """(first page, scan_safe) of every readable mapping, sorted by address: where a
    segment lies and whether PAGEMAP_SCAN may select its pages. Shared arrays."""
    readable = sorted((m for m in maps if m.readable), key=lambda m: m.start)
    mstart = np.fromiter((m.start >> PAGE_SHIFT for m in readable), np.uint64, len(readable))
    safe = np.fromiter((scan_safe(m) for m in readable), np.bool_, len(readable))
    return mstart, safe


# Kinds of mapping PAGEMAP_SCAN walks like /proc/PID/pagemap reads them. The scan skips
# VM_PFNMAP mappings (device memory) whose present pages the word read reports, and such
# mappings only come from device files or driver-specific anonymous inodes.
_SCAN_SAFE_SPECIAL = ("[heap]", "[stack]", "/dev/zero (deleted)")


def scan_safe(m: Mapping) -> bool:
    """Whether the present pages of `m` may be selected with PAGEMAP_SCAN: anonymous
    memory, heap, stacks, named anonymous memory, memfd, SysV shm, shared anonymous
    memory and regular files (not under /dev). Everything else reads words."""
    p = m.path
    if not p or p in _SCAN_SAFE_SPECIAL:
        return True
    if p.startswith(("[anon:", "[anon_shmem:", "/memfd:", "/SYSV")):
        return True
    return m.is_regular_file and not p.startswith("/dev/")
