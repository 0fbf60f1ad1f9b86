"""The page rule: which pages of a member's regions a capture takes.

Owns `select_pages` (docs/decisions.md, "Page rule"): a page is taken when it lies wholly
inside a region and in a readable mapping, and either
- the mapping is an object-backed shared mapping and the page lies inside the object
  (nodeagent/proc/shared.py: whether this process maps the page says nothing about it), or
- pagemap says present or swapped (PAGEMAP_SCAN where the kernel has it, pagemap words
  for device memory and older kernels; PTE markers left out: pagemap.taken_mask).
Vectorised over segments and pages; Python steps once per mapping that holds a region.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cpcoord.ranges import PAGE_SHIFT
from nodeagent.capture.regions import RegionSpec, readable_table, segment_pages
from nodeagent.pages import PageNumbers, empty_pages, pages_from_runs
from nodeagent.proc.mapscache import derived
from nodeagent.proc.pagemap import PagemapReader, taken_in
from nodeagent.proc.procfs import Mapping
from nodeagent.proc.shared import SharedObjects


def select_pages(
    pm: PagemapReader,
    specs: Sequence[RegionSpec],
    maps: Sequence[Mapping],
    objects: SharedObjects | None = None,
) -> list[PageNumbers]:
    """Per region, the page numbers taken: fully inside the region, in a readable
    mapping, and present or swapped (the seed's rule) or, in an object-backed shared
    mapping, inside the object (nodeagent/proc/shared.py: a shared page need not be mapped in
    this process to hold data). Sorted; regions must be sorted and disjoint.

    `objects`: the capture's open objects, so that the copy reads what was selected;
    None opens them for this call only."""
    if objects is None:
        with SharedObjects(pm.pid) as own:
            return select_pages(pm, specs, maps, own)
    lo, hi = segment_pages(specs, maps)
    pages = _taken(pm, lo, hi, maps, objects)
    starts = np.array([s.start >> PAGE_SHIFT for s in specs], dtype=np.uint64)
    ends = np.array([s.end >> PAGE_SHIFT for s in specs], dtype=np.uint64)
    a = np.searchsorted(pages, starts, side="left")
    b = np.searchsorted(pages, ends, side="left")
    return [pages[i:j] for i, j in zip(a.tolist(), b.tolist(), strict=True)]


def _taken(
    pm: PagemapReader,
    lo: PageNumbers,
    hi: PageNumbers,
    maps: Sequence[Mapping],
    objects: SharedObjects,
) -> PageNumbers:
    """Taken pages of the segments: every page inside the object for object-backed
    shared mappings; PAGEMAP_SCAN for the mappings it walks (runs from the kernel: ~1.5
    ms per resident GiB), pagemap words for the others (device memory)."""
    if lo.size == 0:
        return empty_pages()
    mstart, safe = readable_table(maps)  # shared arrays, computed once per maps list
    # Each segment lies in one readable mapping: the last one starting at or before it.
    seg_map = np.searchsorted(mstart, lo, side="right") - 1
    parts: list[PageNumbers] = []
    shared_maps = _readable_shared(maps)
    used = {i: shared_maps[i] for i in np.unique(seg_map).tolist() if i in shared_maps}
    if used:
        obj_end = np.full(mstart.size, -1, dtype=np.int64)
        for i, m in used.items():  # one step per shared mapping holding a region
            obj_end[i] = objects.end_page(m)
        seg_end = obj_end[seg_map]
        in_obj = seg_end >= 0
        if in_obj.any():
            first = lo[in_obj].astype(np.int64)
            n = np.maximum(np.minimum(hi[in_obj].astype(np.int64), seg_end[in_obj]) - first, 0)
            parts.append(pages_from_runs(np.stack((lo[in_obj], n.astype(np.uint64)), axis=1)))
            lo, hi, seg_map = lo[~in_obj], hi[~in_obj], seg_map[~in_obj]
    if lo.size:
        seg_safe = safe[seg_map]
        if seg_safe.any():
            parts.append(taken_in(pm, lo[seg_safe], hi[seg_safe], scan=True))
        if not seg_safe.all():
            parts.append(taken_in(pm, lo[~seg_safe], hi[~seg_safe]))
    if not parts:
        return empty_pages()
    if len(parts) == 1:
        return parts[0]
    both = np.concatenate(parts)
    both.sort()
    return both


@derived
def _readable_shared(maps: Sequence[Mapping]) -> dict[int, Mapping]:
    """The readable shared mappings by their index in readable_table's order."""
    readable = sorted((m for m in maps if m.readable), key=lambda m: m.start)
    return {i: m for i, m in enumerate(readable) if m.shared}
