"""Captures in place: the pages of a capture land in memory of each region's own.

Owns the Destination protocol (what nodeagent.capture.process needs of such memory; the tmpfs
image's region files of cpcoord/image_files.py are the one implementation), the
vectorised bookkeeping of an in-place copy (each page's local address: its offset in its
region's memory; which pages lie in holes of shared objects, nodeagent/proc/shared.py: they
read as zeros without being read, so they need no memory reserved and no look by the
zero scan), and `reserve_in_place`, the pre-pass alone, which imports nothing of the
freeze (the CLI runs it on a second thread while it imports and sets up the rest).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from cpcoord.ranges import PAGE_SHIFT, AddressRange
from nodeagent.capture.regions import RegionSpec, resolve_regions
from nodeagent.capture.selection import select_pages
from nodeagent.pages import PageNumbers, empty_pages
from nodeagent.proc.mapscache import read_maps_shared
from nodeagent.proc.pagemap import PagemapReader
from nodeagent.proc.procfs import Mapping, ProcessIdentity
from nodeagent.proc.shared import SharedObjects


class Destination(Protocol):
    """Where a capture copies to instead of staging: each region's pages at their offset
    in memory of that region's own (cpcoord.image_files.RegionFiles, a tmpfs image)."""

    def reserve(self, regions: Sequence[tuple[str, int, int]], pages: Sequence[PageNumbers]) -> int:
        """Make every page of `pages[i]` (page numbers) of region `regions[i]` = (name,
        start, end) writable without a fault; return how many pages it had to add. The
        memory of pages never reserved reads as zeros."""
        ...

    def address(self, name: str) -> int:
        """Where page offset 0 of region `name` lives (after `reserve`)."""
        ...

    def rows(self, name: str) -> npt.NDArray[np.uint8]:
        """The region's memory as `(pages, PAGE_SIZE)` rows, row k = page offset k."""
        ...


def dense_slice(pages: npt.NDArray[np.uint64]) -> slice | None:
    """`pages` (sorted unique offsets) as a slice when they are one run (or none)."""
    if pages.size == 0:
        return slice(0, 0)
    first, last = int(pages[0]), int(pages[-1])
    return slice(first, last + 1) if last - first + 1 == pages.size else None


def bounds_of(specs: Sequence[RegionSpec]) -> list[tuple[str, int, int]]:
    return [(s.name, s.start, s.end) for s in specs]


def hole_mask(
    pages: PageNumbers, maps: Sequence[Mapping], objects: SharedObjects
) -> npt.NDArray[np.bool_] | None:
    """Which of the sorted `pages` lie in holes of shared objects (None: none do). They
    read as zeros without being read (SharedObjects.read), so they need no memory."""
    chosen = objects.bounds(maps)[2]
    if not chosen or pages.size == 0:
        return None
    h = np.concatenate([objects.holes(m) for m in chosen])
    if h.shape[0] == 0:
        return None
    edge = np.zeros(pages.size + 1, dtype=np.int64)  # +1 where a hole starts, -1 after it
    np.add.at(edge, np.searchsorted(pages, h[:, 0]), 1)
    np.add.at(edge, np.searchsorted(pages, h[:, 1]), -1)
    return np.cumsum(edge[:-1]) > 0


def split_mask(mask: npt.NDArray[np.bool_] | None, parts: Sequence[PageNumbers]) -> list[Any]:
    """`mask` over the concatenated parts, cut into one piece per part (None: Nones)."""
    if mask is None:
        return [None] * len(parts)
    at = np.cumsum([0] + [int(p.size) for p in parts]).tolist()
    return [mask[a:b] for a, b in itertools.pairwise(at)]


def without(
    parts: Sequence[PageNumbers], holes: npt.NDArray[np.bool_] | None
) -> Sequence[PageNumbers]:
    """The parts without the pages `holes` marks (a mask over their concatenation)."""
    if holes is None:
        return parts
    return [p[~m] for p, m in zip(parts, split_mask(holes, parts), strict=True)]


def local_rows(
    specs: Sequence[RegionSpec], copied: Sequence[PageNumbers], into: Destination
) -> npt.NDArray[np.uint64]:
    """Per copied page, its local page number: its offset in its region's memory at
    `into` (MemoryReader.read_pages with dest 0; runs never cross regions, since two
    regions' memories are never adjacent rows)."""
    out = [
        c - np.uint64(s.start >> PAGE_SHIFT) + np.uint64(into.address(s.name) >> PAGE_SHIFT)
        for s, c in zip(specs, copied, strict=True)
    ]
    return np.concatenate(out) if out else empty_pages()


def reserve_in_place(
    ident: ProcessIdentity, ranges: Sequence[AddressRange] | None, into: Destination
) -> None:
    """The in-place half of a capture's preparation on its own: reserve at `into` every
    page the pre-pass takes. The CLI runs it on a second thread while it sets up the
    chain; capture() then finds (nearly) every page reserved. Raises like capture()."""
    pid = ident.view("capture")
    with PagemapReader(pid) as pm, SharedObjects(pid) as pre:
        maps = read_maps_shared(pid)
        specs = resolve_regions(ranges, maps, pid)
        parts = select_pages(pm, specs, maps, pre)
        holes = hole_mask(np.concatenate(parts) if parts else empty_pages(), maps, pre)
        into.reserve(bounds_of(specs), without(parts, holes))
