"""Which pages a restore in place must write, as the manifests tell it (ids only, never
page bytes): the pages that differ between the generation written back and the
member's tracker base (its latest committed capture), and a page table cut down to
chosen pages (the prefetch's DownloadPages filter).

Two generations hold the same page when both list it with the same chunk id at the same
place in the chunk (zero pages: both the zero marker); a page listed by only one of them
differs (absent reads as zeros, but a zero written where nothing is costs nothing and
keeps the rule simple). A region of the generation that the base does not hold with the
same name and bounds differs whole (it is not listed). All NumPy over the expanded
tables: one row per page, no Python loop per page.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from coordinator.store.manifest import MemberMap, PageTable
from cpcoord.gen.v1 import types_pb2
from cpcoord.image import runs_of
from storecore.ids import zero_mask

U64 = npt.NDArray[np.uint64]


def differing_pages(a: PageTable, b: PageTable) -> U64:
    """Page offsets (sorted) whose contents differ between two tables of one region."""
    pa, ea, wa = a.expand()
    pb, eb, wb = b.expand()
    wa[zero_mask(a.ids)[ea]] = 0  # a zero page is a zero page, wherever in its run
    wb[zero_mask(b.ids)[eb]] = 0
    in_b = _in_sorted(pa, pb)
    ia = np.flatnonzero(in_b)
    ib = np.searchsorted(pb, pa[ia])
    same = np.asarray(a.ids[ea[ia]] == b.ids[eb[ib]], dtype=bool) & (wa[ia] == wb[ib])
    differ = ~in_b
    differ[ia[~same]] = True
    only_b = pb[~_in_sorted(pb, pa)]
    out = np.concatenate((pa[differ], only_b))
    out.sort(kind="stable")  # two sorted runs, disjoint: a merge (np.union1d hashes)
    return out


def _in_sorted(a: U64, b: U64) -> npt.NDArray[np.bool_]:
    """Per element of `a`, whether it is in `b` (both sorted, unique), without a sort."""
    if a.size == 0 or b.size == 0:
        return np.zeros(a.size, dtype=np.bool_)
    idx = np.searchsorted(b, a)
    idx[idx == b.size] = b.size - 1
    return np.asarray(b[idx] == a)


def differing_regions(gen: MemberMap, base: MemberMap) -> list[types_pb2.Region]:
    """Per region of `gen` that `base` holds with the same name and bounds: its differing
    pages as runs (Prepare.members[].differs)."""
    held = {(r.name, r.start, r.end): r for r in base.regions}
    out = []
    for r in gen.regions:
        other = held.get((r.name, r.start, r.end))
        if other is None:
            continue  # differs whole
        runs = runs_of(differing_pages(r.pages, other.pages))
        out.append(
            types_pb2.Region(
                name=r.name,
                start=r.start,
                end=r.end,
                pages=[types_pb2.PageRun(offset=int(o), count=int(c)) for o, c in runs.tolist()],
            )
        )
    return out


def pages_of_runs(runs: Iterable[types_pb2.PageRun]) -> U64:
    """PageRun messages -> sorted page offsets."""
    rs = list(runs)
    if not rs:
        return np.zeros(0, dtype=np.uint64)
    off = np.fromiter((r.offset for r in rs), dtype=np.uint64, count=len(rs))
    cnt = np.fromiter((r.count for r in rs), dtype=np.int64, count=len(rs))
    first = np.repeat(off, cnt)
    within = np.arange(int(cnt.sum()), dtype=np.uint64) - np.repeat(
        (np.cumsum(cnt) - cnt).astype(np.uint64), cnt
    )
    out = np.sort(first + within, kind="stable")
    return out[np.concatenate(([True], np.diff(out) != 0))] if out.size else out


def only_pages(t: PageTable, pages: U64) -> PageTable:
    """The entries of `t` cut down to `pages` (sorted), adjacent pages of one entry kept
    as one entry."""
    p, entry, within = t.expand()
    keep = _in_sorted(p, np.asarray(pages, dtype=np.uint64))
    p, entry, within = p[keep], entry[keep], within[keep]
    if p.size == 0:
        return PageTable.empty()
    brk = np.flatnonzero((np.diff(entry) != 0) | (np.diff(p.astype(np.int64)) != 1)) + 1
    first = np.concatenate(([0], brk))
    counts = np.diff(np.concatenate((first, [p.size])))
    ids = t.ids[entry[first]]
    return PageTable.of(p[first], counts, ids, np.where(zero_mask(ids), 0, within[first]))
