"""The write plan of a restore: which bytes go where, as iovec pieces built in bulk.

Owns the arithmetic between "region contents" and "writes": per region, runs of data
pages (each a contiguous block of rows of the contents' data) and the gaps between them
(pages not captured; with a scope, only the scope's unlisted pages: a partial write);
cut at each region's write end (a client region's exact length);
split at mapping boundaries (a piece in a mapping the target cannot write goes through
/proc/PID/mem, see writer.py). Gaps in private mappings are pages absent at the cut: they
get zeros where a page is present (or swapped) now, since an absent private page already
reads as zeros; gaps in shared mappings were never captured and are never written (a
listed zero page is data like any other). Zero pieces split to the size of the zero
source. A page absent at the cut in a private
*file* mapping read as the file then, not as zeros: where such a page is present now
(copied on write, or read in since), its piece gets the file's bytes (`FileFn`), so a
library's data page first touched after the cut comes back as the file, never zeroed.
Everything is NumPy over runs and pieces; the only Python loops are per region and per
such file run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from cpcoord.errors import RegionMismatch
from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE
from nodeagent.pages import in_sorted, runs_from_pages
from nodeagent.proc.procfs import Mapping
from nodeagent.proc.writer import ZERO_CHUNK, zero_source

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
# (first pages, end pages) of sorted, disjoint segments -> present-or-swapped pages in them
PresentFn = Callable[[U64, U64], U64]
# (a private file mapping, address, length) -> the file's bytes there (None: unreadable,
# then zeros are written, as for an anonymous page)
FileFn = Callable[[Mapping, int, int], bytes | None]
_SHIFT = np.uint64(PAGE_SHIFT)


class Contents(Protocol):
    """What the plan needs of restore.RegionContents (read-only)."""

    @property
    def start(self) -> int: ...

    @property
    def end(self) -> int: ...

    @property
    def pages(self) -> U64: ...

    @property
    def data(self) -> npt.NDArray[np.uint8]: ...


@dataclass(frozen=True)
class Plan:
    remote: U64  # (n, 2) [address, length], sorted by address
    local: U64  # (n, 2) [address, length], same lengths
    forced: npt.NDArray[np.bool_]  # piece lies in a mapping the target cannot write
    total_bytes: int
    zero_bytes: int
    keep: tuple[object, ...]  # arrays the local addresses point into


def _region_runs(
    c: Contents, data: npt.NDArray[np.uint8], write_end: int
) -> tuple[I64, I64, I64, npt.NDArray[np.bool_]]:
    """Byte pieces of one region: start, end, local address (into `data`, the contents'
    rows, C-contiguous), is-zero; cut at write_end."""
    runs = runs_from_pages(c.pages).astype(np.int64)
    off, cnt = runs[:, 0], runs[:, 1]
    rows = np.cumsum(cnt) - cnt
    npages = (c.end - c.start) >> PAGE_SHIFT
    scope = getattr(c, "scope", None)
    if scope is not None:  # only the scope's pages: its unlisted ones are the gaps
        gaps = runs_from_pages(scope[~in_sorted(scope, c.pages)]).astype(np.int64)
        gap_lo, gap_hi = gaps[:, 0], gaps[:, 0] + gaps[:, 1]
    else:
        gap_lo = np.concatenate(([0], off + cnt))
        gap_hi = np.concatenate((off, [npages]))
        has = gap_hi > gap_lo
        gap_lo, gap_hi = gap_lo[has], gap_hi[has]
    start = np.concatenate((off, gap_lo)) * PAGE_SIZE + c.start
    end = np.concatenate((off + cnt, gap_hi)) * PAGE_SIZE + c.start
    local = np.concatenate((rows * PAGE_SIZE + int(data.ctypes.data), np.zeros_like(gap_lo)))
    zero = np.concatenate((np.zeros(off.size, bool), np.ones(gap_lo.size, bool)))
    np.minimum(end, write_end, out=end)
    keep = end > start
    return start[keep], end[keep], local[keep], zero[keep]


def build_plan(
    regions: Sequence[tuple[Contents, int]],
    maps: Sequence[Mapping],
    present: PresentFn,
    member: str = "?",
    file_bytes: FileFn | None = None,
) -> Plan:
    """Pieces for `(contents, write_end)` of every region, sorted by start and disjoint.
    The plan keeps the arrays its local addresses point into."""
    keep = tuple(np.ascontiguousarray(c.data) for c, _ in regions)
    parts = [_region_runs(c, d, wend) for (c, wend), d in zip(regions, keep, strict=True)]
    if not parts:
        return _empty(keep)
    start = np.concatenate([p[0] for p in parts])
    end = np.concatenate([p[1] for p in parts])
    local = np.concatenate([p[2] for p in parts])
    zero = np.concatenate([p[3] for p in parts])
    order = np.argsort(start, kind="stable")
    start, end, local, zero = start[order], end[order], local[order], zero[order]

    # Split at mapping boundaries: every (piece, overlapping mapping) pair, in bulk.
    # ([vsyscall] lies above the user address space and beyond int64: never a target.)
    maps = [m for m in maps if m.end < 1 << 62]
    ms = np.array([m.start for m in maps], dtype=np.int64)
    me = np.array([m.end for m in maps], dtype=np.int64)
    writable = np.array([m.writable for m in maps], dtype=bool)
    shared = np.array([m.shared for m in maps], dtype=bool)
    i0 = np.searchsorted(me, start, side="right")
    i1 = np.searchsorted(ms, end, side="left")
    counts = np.maximum(i1 - i0, 0)
    pidx = np.repeat(np.arange(start.size), counts)
    firsts = np.cumsum(counts) - counts
    midx = i0[pidx] + (np.arange(pidx.size) - firsts[pidx])
    s = np.maximum(ms[midx], start[pidx])
    e = np.minimum(me[midx], end[pidx])
    if int((e - s).sum()) != int((end - start).sum()):
        hole = int(start[counts == 0][0]) if np.any(counts == 0) else int(start[0])
        raise RegionMismatch(member, f"at 0x{hole:x}", "is not mapped any more")
    z = zero[pidx]
    loc = np.where(z, 0, local[pidx] + (s - start[pidx]))

    # Pages the generation does not list. In a private mapping such a page was absent
    # at the cut, where it read as zeros (or as the file): only pages present now need
    # writing. In a shared mapping it was never captured (beyond the object's end,
    # unreadable, or taken from page tables without the capability to read the object):
    # it is left alone, since a restore never writes what was not captured.
    narrow = z & ~shared[midx]
    ks, ke, km = _present_runs(s[narrow], e[narrow], midx[narrow], present)
    kloc, kz, filed = _file_runs(ks, ke, km, maps, file_bytes)
    kept: tuple[object, ...] = (*keep, *filed)
    data = ~z
    s = np.concatenate((s[data], ks))
    e = np.concatenate((e[data], ke))
    loc = np.concatenate((loc[data], kloc))
    z = np.concatenate((z[data], kz))
    midx = np.concatenate((midx[data], km))

    # Zero pieces longer than the zero source: several pieces, all reading from it.
    n = np.where(z, (e - s + ZERO_CHUNK - 1) // ZERO_CHUNK, 1)
    rep = np.repeat(np.arange(s.size), n)
    k = np.arange(rep.size) - (np.cumsum(n) - n)[rep]
    ps = s[rep] + k * np.where(z[rep], ZERO_CHUNK, 0)
    pe = np.where(z[rep], np.minimum(ps + ZERO_CHUNK, e[rep]), e[rep])
    pz = z[rep]
    ploc = np.where(pz, zero_source(), loc[rep])
    pm = midx[rep]

    order = np.argsort(ps, kind="stable")
    ps, pe, ploc, pz, pm = ps[order], pe[order], ploc[order], pz[order], pm[order]
    length = (pe - ps).astype(np.uint64)
    remote = np.stack((ps.astype(np.uint64), length), axis=1)
    localv = np.stack((ploc.astype(np.uint64), length), axis=1)
    return Plan(
        remote=np.ascontiguousarray(remote),
        local=np.ascontiguousarray(localv),
        forced=~writable[pm],
        total_bytes=int(length.sum()),
        zero_bytes=int(length[pz].sum()),
        keep=kept,
    )


def _file_runs(
    s: I64, e: I64, m: I64, maps: Sequence[Mapping], file_bytes: FileFn | None
) -> tuple[I64, npt.NDArray[np.bool_], tuple[object, ...]]:
    """Local addresses and zero flags of the pieces `[s, e)` (pages absent at the cut,
    present now, in mapping `m`): the file's bytes for private file mappings, else
    zeros. One read per run of pages, never per page."""
    loc = np.zeros_like(s)
    zero = np.ones(s.size, dtype=bool)
    if file_bytes is None or s.size == 0:
        return loc, zero, ()
    is_file = np.array([mp.is_regular_file for mp in maps] + [False], dtype=bool)
    bufs = []
    for i in np.flatnonzero(is_file[m]).tolist():
        got = file_bytes(maps[int(m[i])], int(s[i]), int(e[i] - s[i]))
        if got is None:
            continue
        buf = np.frombuffer(got, dtype=np.uint8)
        bufs.append(buf)
        loc[i], zero[i] = int(buf.ctypes.data), False
    return loc, zero, tuple(bufs)


def _present_runs(s: I64, e: I64, m: I64, present: PresentFn) -> tuple[I64, I64, I64]:
    """Sub-pieces of zero pieces `[s, e)` (page-aligned starts) over the pages present
    now; a run never crosses from one piece into the next."""
    if s.size == 0:
        return s, e, m
    lo = (s >> PAGE_SHIFT).astype(np.uint64)
    hi = ((e + PAGE_SIZE - 1) >> PAGE_SHIFT).astype(np.uint64)
    pages = present(lo, hi)
    if pages.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    piece = np.searchsorted(lo, pages, side="right") - 1
    brk = np.flatnonzero((np.diff(pages.astype(np.int64)) != 1) | (np.diff(piece) != 0)) + 1
    first = np.concatenate(([0], brk))
    last = np.concatenate((brk - 1, [pages.size - 1]))
    p = piece[first]
    rs = np.maximum((pages[first] << _SHIFT).astype(np.int64), s[p])
    re = np.minimum(((pages[last] + np.uint64(1)) << _SHIFT).astype(np.int64), e[p])
    return rs, re, m[p]


def _empty(keep: tuple[object, ...]) -> Plan:
    z = np.zeros((0, 2), dtype=np.uint64)
    return Plan(z, z.copy(), np.zeros(0, dtype=bool), 0, 0, keep)
