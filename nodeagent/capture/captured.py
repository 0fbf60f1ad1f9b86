"""The result of a capture: its regions' pages at the cut, built over the copied rows.

Owns the values nodeagent/capture/process.py returns (Capture, CapturedRegion, CaptureTimings),
building them from the copy (`build_regions`: unreadable pages dropped, zero pages
found), the vectorised zero-page test (`zero_rows`, also used by the uploader) and
`concat_parts`, which joins select_pages' per-region slices without a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE, AddressRange
from nodeagent.capture import inplace
from nodeagent.capture.inplace import Destination
from nodeagent.capture.regions import RegionSpec
from nodeagent.pages import PageNumbers, Runs, empty_pages, runs_from_pages
from nodeagent.proc.procfs import Mapping, ProcessIdentity
from nodeagent.proc.staging import Staging

if TYPE_CHECKING:
    from nodeagent.capture.livecopy import Report as PrecopyReport


@dataclass(frozen=True)
class CapturedRegion:
    """One region's pages at the cut. Offsets count pages from `start`, sorted."""

    name: str
    start: int
    end: int
    pages: npt.NDArray[np.uint64]  # offsets copied (all of them if full)
    all_pages: npt.NDArray[np.uint64]  # offsets taken by the rule (present or swapped)
    zero: npt.NDArray[np.bool_]  # per entry of `pages`: the page is all zeros
    # Staging: `(len(pages), PAGE_SIZE)`, row i holds page pages[i]. In place (a
    # Destination): the region's rows, row k holds page offset k.
    rows: npt.NDArray[np.uint8]
    requested: AddressRange | None = None
    in_place: bool = False

    @cached_property
    def data(self) -> npt.NDArray[np.uint8]:
        """`(len(pages), PAGE_SIZE)`: row i holds page pages[i] (in place and sparse: a
        copy, made on first use)."""
        if not self.in_place:
            return self.rows
        dense = inplace.dense_slice(self.pages)
        if dense is not None:
            return self.rows[dense]
        return self.rows[self.pages.astype(np.intp)]

    @property
    def runs(self) -> Runs:
        return runs_from_pages(self.pages)

    @property
    def all_runs(self) -> Runs:
        return runs_from_pages(self.all_pages)

    @property
    def zero_count(self) -> int:
        return int(np.count_nonzero(self.zero))

    @property
    def nbytes(self) -> int:
        return int(self.pages.size) * PAGE_SIZE


@dataclass(frozen=True)
class CaptureTimings:
    """Seconds. `frozen` spans the first seize to the last detach (an upper bound)."""

    prepare: float
    freeze: float
    select: float
    copy: float
    thaw: float
    frozen: float
    zero_scan: float
    total: float


@dataclass(frozen=True)
class Capture:
    ident: ProcessIdentity
    maps: tuple[Mapping, ...]  # the maps at the cut
    regions: tuple[CapturedRegion, ...]
    timings: CaptureTimings
    incremental: bool  # hooks restricted the copy to a changed set
    readv_calls: int
    fallback_bytes: int  # read through /proc/PID/mem
    unreadable_pages: int  # taken by the rule but readable by neither path: left out
    staging: Staging
    shared_bytes: int = 0  # read through /proc/PID/mem: not exclusively mapped (COW)
    object_bytes: int = 0  # read from the objects behind shared mappings
    precopy: PrecopyReport | None = None  # what the live passes did (pre-copy only)

    @property
    def pages(self) -> int:
        return sum(int(r.pages.size) for r in self.regions)

    @property
    def nbytes(self) -> int:
        return self.pages * PAGE_SIZE

    @property
    def zero_pages(self) -> int:
        return sum(r.zero_count for r in self.regions)

    def region(self, name: str) -> CapturedRegion:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)


def zero_rows(
    data: npt.NDArray[np.uint8], index: npt.NDArray[np.uint64] | None = None
) -> npt.NDArray[np.bool_]:
    """Which rows (pages) of `(n, PAGE_SIZE)` data, or of `data[index]`, are all zeros.

    A page whose first and last words are not both zero cannot be a zero page: that
    check reads two cache lines per page, and only the few candidates left are scanned
    whole (in bounded chunks), so incompressible data costs almost nothing here.
    """
    n = data.shape[0] if index is None else index.size
    zero = np.zeros(n, dtype=np.bool_)
    if n == 0:
        return zero
    words = data.view(np.uint64).reshape(data.shape[0], PAGE_SIZE // 8)
    if index is None:
        cand = np.flatnonzero((words[:, 0] == 0) & (words[:, -1] == 0))
        at = cand
    else:
        idx = index.astype(np.intp)
        cand = np.flatnonzero((words[idx, 0] == 0) & (words[idx, -1] == 0))
        at = idx[cand]
    step = 8192  # 32 MiB of candidate pages per pass
    for i in range(0, cand.size, step):
        zero[cand[i : i + step]] = ~words[at[i : i + step]].any(axis=1)
    return zero


def concat_parts(parts: Sequence[PageNumbers]) -> PageNumbers:
    """The parts as one array. select_pages hands out consecutive slices of one array:
    then that array is returned as a view (no 2 MB copy per GiB in the frozen window)."""
    if not parts:
        return empty_pages()
    if len(parts) == 1:
        return parts[0]
    full = [p for p in parts if p.size]  # empty slices may point anywhere
    base = full[0].base if full else None
    if isinstance(base, np.ndarray) and base.flags.c_contiguous:
        at = start = full[0].ctypes.data
        ok = True
        for p in full:
            ok = ok and p.base is base and p.ctypes.data == at and p.flags.c_contiguous
            at += p.nbytes
        if ok:
            n = (at - start) // 8
            return np.ndarray((n,), dtype=np.uint64, buffer=base, offset=start - base.ctypes.data)
    return np.concatenate(parts)


def build_regions(
    specs: Sequence[RegionSpec],
    taken: Sequence[PageNumbers],
    copied: Sequence[PageNumbers],
    unreadable: PageNumbers,
    staging: Staging,
    into: Destination | None = None,
    holes: npt.NDArray[np.bool_] | None = None,
) -> tuple[CapturedRegion, ...]:
    """Region values over the staging rows (or the Destination's); unreadable pages are
    dropped (rare path: with staging, that region's rows are compacted into a copy).
    Pages in holes of shared objects (`holes`, in place only) are zero without a look."""
    out: list[CapturedRegion] = []
    row = 0
    for spec, t, c, hm in zip(specs, taken, copied, inplace.split_mask(holes, copied), strict=True):
        if into is None:
            rows = staging.pages(row, int(c.size))
            row += int(c.size)
        if unreadable.size:
            keep = ~np.isin(c, unreadable, assume_unique=True)
            if not keep.all():
                c = c[keep]
                hm = None if hm is None else hm[keep]
                if into is None:
                    rows = rows[keep]
                t = t[~np.isin(t, unreadable, assume_unique=True)]
        base = np.uint64(spec.start >> PAGE_SHIFT)
        pages = c - base
        if into is None:
            zero = zero_rows(rows)
        else:
            rows = into.rows(spec.name)
            dense = inplace.dense_slice(pages) if hm is None else None
            if dense is not None:
                zero = zero_rows(rows[dense])
            else:
                zero = np.ones(pages.size, dtype=np.bool_)
                look = slice(None) if hm is None else ~hm
                zero[look] = zero_rows(rows, pages[look])
        out.append(
            CapturedRegion(
                name=spec.name,
                start=spec.start,
                end=spec.end,
                pages=pages,
                all_pages=t - base,
                zero=zero,
                rows=rows,
                requested=spec.requested,
                in_place=into is not None,
            )
        )
    return tuple(out)
