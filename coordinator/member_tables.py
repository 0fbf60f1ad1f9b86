"""A member's regions as flat columns with a region index: the run lists of an upload's
header and the page tables of its entries, checked, compared and completed (parent
pages inherited) in a few vectorised passes over the whole member.

Why flat: a process may have tens of thousands of one-page regions. One NumPy call per
region costs microseconds of overhead each, and an upload made several per region (the
header's runs, each batch, the coverage check, the overlay): 20 000 regions took
seconds, on the coordinator's event loop at first. Here the cost is that of one region
holding the same pages, plus one small Python step per region where a per-region
object must be built (the RegionMap of the result).

Runs are `(m, 2)` uint64 rows `(offset, count)` in pages; region r's are rows
`idx[r]:idx[r + 1]`. Entries are page table columns plus `rid`, the region of each
entry, sorted by region (stable: the stream's order within a region).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from coordinator.store.manifest import PageTable, overlay
from cpcoord.image import stored_offsets
from storecore.ids import IdArray, unique_ids, zero_mask

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]
# Regions overlaid together are laid end to end in one page space of this many pages
# (a page of gap between two, so no run or chunk joins two regions).
SPACE = 1 << 62


@dataclass(frozen=True)
class Runs:
    """Every region's runs: region r's are rows idx[r]:idx[r + 1] of `runs`."""

    runs: U64  # (m, 2): offset, count
    idx: I64  # (n + 1,)

    def of(self, r: int) -> U64:
        return self.runs[self.idx[r] : self.idx[r + 1]]

    @property
    def rid(self) -> I64:
        return np.repeat(np.arange(self.idx.size - 1), np.diff(self.idx))

    def pages(self) -> U64:
        """Pages per region."""
        cs = np.concatenate(([0], np.cumsum(self.runs[:, 1], dtype=np.uint64)))
        return (cs[self.idx[1:]] - cs[self.idx[:-1]]).astype(np.uint64)


class RunProblem(Exception):
    """Region `region`'s runs cannot be what they say (`why`); the caller names it."""

    def __init__(self, region: int, why: str) -> None:
        super().__init__(why)
        self.region, self.why = region, why


def first(mask: Bools, rid: I64) -> int | None:
    """The lowest region with a True row, or None."""
    hit = np.flatnonzero(mask)
    return int(rid[hit].min()) if hit.size else None


def parse_runs(flat: U64, per_region: I64, npages: U64) -> Runs:
    """Runs from flat (offset, count) pairs, `per_region[r]` pairs for region r, checked
    (each run has a page, does not overflow, runs ascend disjoint, end inside their
    region of `npages[r]` pages) and coalesced (touching runs join). RunProblem names
    the first region at fault, by the first kind of fault in that order."""
    arr = flat.reshape(-1, 2)
    n = per_region.size
    rid = np.repeat(np.arange(n), per_region)
    off, cnt = arr[:, 0], arr[:, 1]
    end = off + cnt
    same = rid[1:] == rid[:-1]
    bad = [
        ((cnt == 0) | (end < off), "a run has no page or overflows"),
        (
            np.concatenate(([False], same & (off[1:] < end[:-1]))),
            "runs are not sorted and disjoint",
        ),
        (end > npages[rid], "a run ends beyond the region's {} pages"),
    ]
    found = [(r, why) for mask, why in bad if (r := first(mask, rid)) is not None]
    if found:
        r, why = min(found, key=lambda x: x[0])  # the first region; its first kind
        raise RunProblem(r, why.format(int(npages[r])))
    return _coalesced(rid, off, end, n)


def _coalesced(rid: I64, off: U64, end: U64, n: int) -> Runs:
    """Sorted disjoint spans [off, end) per region -> coalesced Runs."""
    if off.size == 0:
        return Runs(np.zeros((0, 2), dtype=np.uint64), np.zeros(n + 1, dtype=np.int64))
    brk = np.ones(off.size, dtype=np.bool_)
    brk[1:] = (rid[1:] != rid[:-1]) | (off[1:] != end[:-1])
    lo = np.flatnonzero(brk)
    hi = np.append(lo[1:], off.size) - 1
    runs = np.stack((off[lo], end[hi] - off[lo]), axis=1).astype(np.uint64)
    return Runs(runs, np.searchsorted(rid[lo], np.arange(n + 1)).astype(np.int64))


def entry_runs(rid: I64, offsets: U64, counts: npt.NDArray[np.uint32], n: int) -> Runs:
    """The pages entries cover, as coalesced runs per region (entries sorted by region,
    ascending and disjoint within one)."""
    return _coalesced(rid, offsets, offsets + counts.astype(np.uint64), n)


def same_runs(a: Runs, b: Runs) -> Bools:
    """Per region: whether a and b list the same runs."""
    la, lb = np.diff(a.idx), np.diff(b.idx)
    eq = la == lb
    cand = np.flatnonzero(eq & (la > 0))
    if cand.size:
        lens = la[cand]
        rel = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        pa = np.repeat(a.idx[cand], lens) + rel
        pb = np.repeat(b.idx[cand], lens) + rel
        differ = np.any(a.runs[pa] != b.runs[pb], axis=1)
        eq[np.repeat(cand, lens)[differ]] = False
    return eq


@dataclass(frozen=True)
class Entries:
    """Page table columns of many regions, sorted by region (`rid`), with `idx[r]` the
    first entry of region r (`idx` has n + 1 items)."""

    rid: I64
    table: PageTable
    idx: I64

    @staticmethod
    def build(rid: I64, table: PageTable, n: int) -> Entries:
        return Entries(rid, table, np.searchsorted(rid, np.arange(n + 1)).astype(np.int64))

    def region(self, r: int) -> PageTable:
        a, b = int(self.idx[r]), int(self.idx[r + 1])
        t = self.table
        return PageTable(t.offsets[a:b], t.counts[a:b], t.skips[a:b], t.ids[a:b])


def concat_tables(tables: Sequence[PageTable]) -> PageTable:
    if not tables:
        return PageTable.empty()
    if len(tables) == 1:
        return tables[0]
    return PageTable(
        np.concatenate([t.offsets for t in tables]),
        np.concatenate([t.counts for t in tables]),
        np.concatenate([t.skips for t in tables]),
        np.concatenate([t.ids for t in tables]),
    )


def overlay_regions(
    regions: I64,
    npages: U64,
    bases: Sequence[PageTable],
    delta: Entries,
    present: Runs,
) -> tuple[Entries, int | None]:
    """The complete tables of `regions` (indices, ascending): each one's `delta` entries
    over its base table (`bases[k]` for regions[k]), keeping only base pages `present`
    at the cut. Same result as `manifest.overlay` region by region; done for many
    regions at once by laying them end to end in one page space (a gap page between
    two: nothing coalesces across). Also returns the first region whose delta names
    a page not present (or None): such an upload is refused."""
    n = int(npages.size)
    rids: list[I64] = []
    tables: list[PageTable] = []
    bad: int | None = None
    blens = np.array([len(t) for t in bases], dtype=np.int64)
    ball = concat_tables(bases)
    bstart = np.concatenate(([0], np.cumsum(blens))).astype(np.int64)
    bcs = np.concatenate(([0], np.cumsum(ball.counts, dtype=np.uint64))).astype(np.uint64)
    weight = present.pages()[regions] + (bcs[bstart[1:]] - bcs[bstart[:-1]])
    for lo, hi in _groups(npages[regions], weight):
        sel = regions[lo:hi]
        gbase = np.zeros(sel.size, dtype=np.uint64)
        gbase[1:] = np.cumsum(npages[sel] + np.uint64(1), dtype=np.uint64)[:-1]
        where = np.full(n, -1, dtype=np.int64)
        where[sel] = np.arange(sel.size)
        # The delta's entries, the base's and the present runs of these regions, in
        # the one space.
        dk = where[delta.rid]
        dm = dk >= 0
        dt = delta.table
        d = PageTable(dt.offsets[dm] + gbase[dk[dm]], dt.counts[dm], dt.skips[dm], dt.ids[dm])
        a, z = int(bstart[lo]), int(bstart[hi])
        shift = np.repeat(gbase, blens[lo:hi])
        b = PageTable(ball.offsets[a:z] + shift, ball.counts[a:z], ball.skips[a:z], ball.ids[a:z])
        pk = where[present.rid]
        pm = pk >= 0
        pr = present.runs[pm]
        pr[:, 0] += gbase[pk[pm]]
        pages = stored_offsets(pr)
        if bad is None:  # delivered pages must be present at the cut
            dp = d.expand()[0]
            pos = np.minimum(np.searchsorted(pages, dp), max(pages.size - 1, 0))
            out = dp[pages[pos] != dp] if pages.size else dp
            if out.size:
                bad = int(sel[int(np.searchsorted(gbase, out[0], side="right")) - 1])
        done = overlay(b, d, pages)
        k = np.searchsorted(gbase, done.offsets, side="right").astype(np.int64) - 1
        rids.append(sel[k])
        tables.append(PageTable(done.offsets - gbase[k], done.counts, done.skips, done.ids))
    rid = np.concatenate(rids) if rids else np.zeros(0, dtype=np.int64)
    return Entries.build(rid, concat_tables(tables), n), bad


# Regions overlaid at once hold at most this many pages (present at the cut plus base
# entries), unless one region alone holds more: ~24 bytes of temporaries per page.
GROUP_PAGES = 1 << 22


def _groups(sizes: U64, weight: U64) -> list[tuple[int, int]]:
    """Consecutive index ranges [lo, hi) into `sizes` whose sizes (+1 each) fit in SPACE
    and whose weights stay within GROUP_PAGES (a region alone may exceed it): one range
    unless the regions are huge."""
    span = [int(x) + 1 for x in sizes.tolist()]
    w = weight.tolist()
    if sum(span) < SPACE and sum(w) <= GROUP_PAGES:
        return [(0, len(span))]
    out: list[tuple[int, int]] = []
    start = acc = acc_w = 0
    for i in range(len(span)):
        if i > start and (acc + span[i] >= SPACE or acc_w + w[i] > GROUP_PAGES):
            out.append((start, i))
            start, acc, acc_w = i, 0, 0
        acc += span[i]
        acc_w += w[i]
    out.append((start, len(span)))
    return out


def nonzero_ids(tables: Sequence[PageTable]) -> IdArray:
    """Sorted unique non-zero ids of the tables."""
    ids = [t.ids[~zero_mask(t.ids)] for t in tables]
    return unique_ids(np.concatenate(ids))
