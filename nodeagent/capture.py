"""The capture engine: freeze a process, copy the selected pages into staging, thaw.

Owns the sequence of one capture and its result value (DESIGN.md, step 4):

1. *Prepare*, target running: read the maps, resolve regions, read pagemap, size and
   prefault the staging buffer from that estimate (first-touch faults on our side would
   otherwise land inside the frozen window).
2. *Frozen*: read the maps and pagemap again (authoritative: this is the cut), ask the
   hooks which pages changed (a tracker's ChangedSet restricts the copy: issue 3), grow
   staging only if the estimate was short, copy with batched `process_vm_readv`, check
   the process is still alive, let the hooks re-arm, thaw.
3. After thaw: zero pages are detected (vectorised) and marked, and the result is built.

The result aliases the staging buffer: a later capture into the same Staging overwrites it.
With a Destination (`into=`: an image's own region files, cpcoord/image_files.py) the
pages land at their offset in their region's memory instead, reserved before the freeze
like staging, and the result aliases that memory.
A caller that already holds the freeze passes its FrozenProcess (`fp=`): then nothing is
frozen or thawed here, and several captures can share one cut (an incremental capture and
a full reference in the same frozen window: tests of issue 3).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np
import numpy.typing as npt

from cpcoord.errors import NoSuchProcess, ProcessExited
from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE, AddressRange
from nodeagent import inplace
from nodeagent.freeze import FrozenProcess, frozen
from nodeagent.inplace import Destination as Destination  # re-exported
from nodeagent.mapscache import read_maps_shared
from nodeagent.pagemap import PagemapReader
from nodeagent.pages import PageNumbers, Runs, empty_pages, runs_from_pages
from nodeagent.procfs import Mapping, ProcessIdentity, check_alive
from nodeagent.reader import MemoryReader, ReadvFn, sys_readv
from nodeagent.regions import RegionSpec, resolve_regions
from nodeagent.selection import select_pages as select_pages  # re-exported (copyout, tests)
from nodeagent.shared import SharedObjects
from nodeagent.staging import PARALLEL_MIN, Staging, copy_threads
from nodeagent.trackers.base import ChangedSet

log = logging.getLogger(__name__)

# Staging headroom over the pre-pass estimate, for pages that appear before the freeze.
SLACK_FRACTION = 1 / 16
SLACK_MIN = 64 * PAGE_SIZE


class CaptureHooks(Protocol):
    """Called on the freezing thread while the target is frozen (issue 3 plugs in here)."""

    def changed(self, fp: FrozenProcess, maps: Sequence[Mapping]) -> ChangedSet | None:
        """Page numbers to copy (intersected with the pages taken by the rule); None
        copies every taken page (a full capture). Runs before the copy."""
        ...

    def after_copy(self, fp: FrozenProcess, maps: Sequence[Mapping]) -> None:
        """Runs after the copy, before the thaw: the place to arm or re-arm a tracker."""
        ...


class SelectionHooks(CaptureHooks, Protocol):
    """Hooks that also see the page selection (nodeagent.incremental). `capture` calls
    `changed_among` instead of `changed`, and `expect` during the preparation."""

    def changed_among(
        self, fp: FrozenProcess, maps: Sequence[Mapping], taken: PageNumbers
    ) -> ChangedSet | None:
        """Like `changed`, given every page the rule takes at the cut (sorted)."""
        ...

    def expect(self, pid: int, maps: Sequence[Mapping], taken: PageNumbers) -> int | None:
        """Before the freeze: how many pages the capture will likely copy (sizes the
        staging buffer); None: all of `taken`."""
        ...


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


def restrict(taken: Sequence[PageNumbers], changed: ChangedSet) -> list[PageNumbers]:
    """Per region, the taken pages that are in the changed set (both sorted, unique).

    One binary search of all taken pages (concatenated: regions are sorted and disjoint)
    in the changed ones, then one slice per region: no arithmetic per region, which
    mattered with tens of thousands of regions (never `np.intersect1d`, which sorts).
    """
    if not taken:
        return []
    c = changed.pages
    sizes = np.fromiter((t.size for t in taken), dtype=np.int64, count=len(taken))
    now = np.concatenate(list(taken))
    keep = np.zeros(now.size, dtype=np.bool_)
    if c.size and now.size:
        idx = np.searchsorted(c, now)
        ok = idx < c.size
        keep[ok] = c[idx[ok]] == now[ok]
    picked = now[keep]
    kept = np.concatenate(([0], np.cumsum(keep, dtype=np.int64)))[np.cumsum(sizes)].tolist()
    out, a = [], 0
    for b in kept:
        out.append(picked[a:b])
        a = b
    return out


def capture(
    ident: ProcessIdentity,
    ranges: Sequence[AddressRange] | None = None,
    *,
    hooks: CaptureHooks | None = None,
    staging: Staging | None = None,
    freeze_timeout: float = 5.0,
    readv: ReadvFn = sys_readv,
    fp: FrozenProcess | None = None,
    into: Destination | None = None,
) -> Capture:
    """Capture the process's regions (`ranges`, or the default set when None).

    With `fp`, the process is already frozen by the caller (on this thread), who also
    thaws it; otherwise it is frozen here for the copy only. With `into`, pages are
    copied there (in place) rather than into `staging`: meant for full captures, since
    it reserves every page taken before the freeze.

    Raises NoSuchProcess / PidReused before anything happens, ProcessExited when it dies
    on the way, PermissionDenied, FreezeFailed, RangeUnmapped, RangesOverlap. The target
    is thawed on every path.
    """
    t0 = time.perf_counter()
    ident.check()
    check_alive(ident, "capture")
    if fp is not None and (fp.ident != ident or fp.thawed):
        raise ValueError("fp must be the caller's live freeze of this very process")
    # The leader, or a live thread while the leader is a zombie (nodeagent/procfs.py).
    pid = fp.pid if fp is not None else ident.view("capture")
    staging = staging if staging is not None else Staging()
    objects = SharedObjects(pid)  # the cut's objects: selection and copy agree
    changed_among = getattr(hooks, "changed_among", None)
    expect = getattr(hooks, "expect", None)
    with PagemapReader(pid) as pm:
        try:
            # -- prepare (running, unless the caller froze it) -----------------------------
            maps0 = read_maps_shared(pid)  # the same list frozen, when nothing changed
            specs0 = resolve_regions(ranges, maps0, pid)
            with SharedObjects(pid) as pre:
                parts0 = select_pages(pm, specs0, maps0, pre)
                taken0 = _concat(parts0)
                if into is not None:  # holes of shared objects need no memory
                    into.reserve(
                        inplace.bounds_of(specs0),
                        inplace.without(parts0, inplace.hole_mask(taken0, maps0, pre)),
                    )
                holes0 = pre.hole_pages(maps0, taken0) * PAGE_SIZE  # need no memory
            guess = expect(pid, maps0, taken0) if expect is not None else None
            estimate = (taken0.size if guess is None else min(guess, taken0.size)) * PAGE_SIZE
            data = max(0, estimate - holes0)
            slack = max(SLACK_MIN, int(data * SLACK_FRACTION))
            if into is None:
                staging.reserve(estimate + slack, populate=data + slack)
            elif estimate >= PARALLEL_MIN:
                copy_threads()  # started now, not in the frozen window (Staging does too)
            t1 = time.perf_counter()
            # -- frozen ----------------------------------------------------------------
            held = contextlib.nullcontext(fp) if fp is not None else frozen(ident, freeze_timeout)
            with held as fz:
                t2 = time.perf_counter()
                maps = read_maps_shared(pid)
                specs = resolve_regions(ranges, maps, pid)
                taken = select_pages(pm, specs, maps, objects)
                if hooks is None:
                    changed = None
                elif changed_among is not None:
                    changed = changed_among(fz, maps, _concat(taken))
                else:
                    changed = hooks.changed(fz, maps)
                if getattr(hooks, "layout_touched", False):
                    # A tracker's registration may have merged VMAs: the cut is the
                    # layout it left (region names and mapping facts follow the maps).
                    maps = read_maps_shared(pid)
                    specs = resolve_regions(ranges, maps, pid)
                    taken = select_pages(pm, specs, maps, objects)
                copied = taken if changed is None else restrict(taken, changed)
                allp = _concat(copied)
                holes = None
                if into is not None:
                    holes = inplace.hole_mask(allp, maps, objects)
                    grown = into.reserve(inplace.bounds_of(specs), inplace.without(copied, holes))
                else:
                    grown = staging.reserve(
                        allp.size * PAGE_SIZE, populate=_data_bytes(allp, maps, objects)
                    )
                if grown:
                    log.warning(
                        "staging grown while frozen: pages appeared after the pre-pass",
                        extra={"fields": {"pid": pid, "estimate": estimate, "pages": allp.size}},
                    )
                t3 = time.perf_counter()
                reader = MemoryReader(pid, readv, objects=objects, maps=maps)
                try:
                    if into is None:
                        stats = reader.read_pages(allp, staging.address)
                    else:
                        stats = reader.read_pages(allp, 0, inplace.local_rows(specs, copied, into))
                finally:
                    reader.close()
                check_alive(ident, "capture")
                if hooks is not None:
                    hooks.after_copy(fz, maps)
                t4 = time.perf_counter()
            t5 = time.perf_counter()
        except NoSuchProcess:
            raise ProcessExited(pid, "capture") from None
        finally:
            objects.close()
    regions = _build(specs, taken, copied, stats.unreadable, staging, into, holes)
    t6 = time.perf_counter()
    timings = CaptureTimings(
        prepare=t1 - t0,
        freeze=t2 - t1,
        select=t3 - t2,
        copy=t4 - t3,
        thaw=t5 - t4,
        frozen=t5 - t1,
        zero_scan=t6 - t5,
        total=t6 - t0,
    )
    result = Capture(
        ident=ident,
        maps=tuple(maps),
        regions=regions,
        timings=timings,
        incremental=changed is not None,
        readv_calls=stats.readv_calls,
        fallback_bytes=stats.fallback_bytes,
        unreadable_pages=int(stats.unreadable.size),
        staging=staging,
        shared_bytes=stats.shared_bytes,
        object_bytes=stats.object_bytes,
    )
    log.info(
        "captured",
        extra={
            "fields": {
                "pid": pid,
                "regions": len(regions),
                "pages": result.pages,
                "zero_pages": result.zero_pages,
                "unreadable": result.unreadable_pages,
                "prepare_ms": round(timings.prepare * 1e3, 3),
                "freeze_ms": round(timings.freeze * 1e3, 3),
                "select_ms": round(timings.select * 1e3, 3),
                "copy_ms": round(timings.copy * 1e3, 3),
                "thaw_ms": round(timings.thaw * 1e3, 3),
                "frozen_ms": round(timings.frozen * 1e3, 3),
            }
        },
    )
    return result


def _data_bytes(pages: PageNumbers, maps: Sequence[Mapping], objects: SharedObjects) -> int:
    """Bytes of staging the pages need populated: holes of shared objects need none."""
    return (int(pages.size) - objects.hole_pages(maps, pages)) * PAGE_SIZE


def _concat(parts: Sequence[PageNumbers]) -> PageNumbers:
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


def _build(
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
