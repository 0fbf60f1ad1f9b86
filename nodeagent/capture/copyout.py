"""The agent's half of a capture: the member is already frozen (by a Freeze command), so
this copies the chosen pages of its regions into staging and leaves thawing to the caller.

nodeagent/capture/process.py freezes, copies and thaws in one call; the agent cannot use it
as is, because the protocol splits those steps across commands (Freeze, Capture) and
thaws only once the changed set is known and the tracker re-armed. This module reuses
the capture engine's parts (the seed's page rule `select_pages`, batched
`process_vm_readv` into a prefaulted `Staging`) and keeps the same guarantees:
- `estimate` runs before the freeze, so staging is sized and prefaulted outside the
  frozen window;
- `select` and `copy` run frozen, with the same shared objects open; only pages taken
  by the rule are ever copied, and read without unsharing anything (reader.py);
- pages neither read path can read are dropped from the result, never invented.
Zero detection is left to the uploader: it runs after the thaw, off the ptrace thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import numpy.typing as npt

from cpcoord.mapfacts import MapFact, facts_for
from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE
from nodeagent.capture.livecopy import Plan
from nodeagent.capture.process import SLACK_FRACTION, SLACK_MIN, select_pages
from nodeagent.capture.regions import RegionSpec, default_regions
from nodeagent.pages import PageNumbers, empty_pages
from nodeagent.proc import owners
from nodeagent.proc.mapscache import derived, read_maps_shared
from nodeagent.proc.pagemap import PagemapReader
from nodeagent.proc.procfs import Mapping
from nodeagent.proc.reader import MemoryReader, ReadvFn, sys_readv
from nodeagent.proc.shared import SharedObjects
from nodeagent.proc.staging import Staging

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedRegion:
    """One region's copied pages. Offsets count pages from `start`, sorted."""

    name: str
    start: int
    end: int
    pages: npt.NDArray[np.uint64]  # offsets whose bytes are in `data` (the delivered set)
    all_pages: npt.NDArray[np.uint64]  # offsets of every page present at the cut
    data: npt.NDArray[np.uint8]  # (len(pages), PAGE_SIZE) view of staging
    # The member's mappings over the region at the cut (restore's fit check compares
    # them with the mappings then); empty when not known.
    mappings: tuple[MapFact, ...] = ()

    @property
    def layout(self) -> tuple[int, int]:
        return (self.start, self.end)


@dataclass(frozen=True)
class CopyResult:
    """What a copy staged. `regions` is built on first use, after the thaw: for tens of
    thousands of regions it is tens of milliseconds the target need not wait for."""

    readv_calls: int
    unreadable_pages: int
    pages: int  # pages whose bytes are in staging (the delivered set)
    build: Callable[[], tuple[StagedRegion, ...]] = field(repr=False, compare=False)
    # Every region's rows back to back (their `data` are views of it), unless
    # unreadable pages were dropped (then each region's data stands alone).
    rows: npt.NDArray[np.uint8] | None = field(default=None, repr=False, compare=False)

    @cached_property
    def regions(self) -> tuple[StagedRegion, ...]:
        return self.build()


@derived
def resolve(explicit: Sequence[RegionSpec] | None, maps: Sequence[Mapping]) -> list[RegionSpec]:
    """The member's regions now: its explicit ones (sorted; one that no longer touches a
    mapping simply holds no page), or the default set of the current maps. Remembered
    per maps list (nodeagent/proc/mapscache.py): the result is shared, never to be mutated."""
    if explicit is None:
        return default_regions(maps)
    return sorted(explicit, key=lambda s: s.start)


def select(
    pid: int,
    specs: Sequence[RegionSpec],
    maps: Sequence[Mapping],
    objects: SharedObjects | None = None,
) -> list[PageNumbers]:
    """Per region, the absolute page numbers taken (sorted; capture.select_pages).
    `objects`: the cut's shared objects, to be handed to `copy` as well."""
    if not specs:
        return []
    with PagemapReader(pid) as pm:
        return select_pages(pm, specs, maps, objects)


def estimate(pid: int, explicit: Sequence[RegionSpec] | None) -> tuple[int, int]:
    """Bytes a full copy would take now, plus slack, and how many of them hold data
    (holes of shared objects need address space in staging, not memory). Call while the
    member runs."""
    maps = read_maps_shared(pid)
    with SharedObjects(pid) as objects:
        taken = select(pid, resolve(explicit, maps), maps, objects)
        allp = np.concatenate(taken) if taken else empty_pages()
        holes = objects.hole_pages(maps, allp) * PAGE_SIZE
    est = int(allp.size) * PAGE_SIZE
    slack = max(SLACK_MIN, int((est - holes) * SLACK_FRACTION))
    return est + slack, est - holes + slack


def prepare(staging: Staging, pid: int, explicit: Sequence[RegionSpec] | None) -> None:
    """Size and prefault staging for the member's next capture (while it runs)."""
    total, data = estimate(pid, explicit)
    staging.reserve(total, populate=data)


def copy(
    pid: int,
    specs: Sequence[RegionSpec],
    taken: Sequence[PageNumbers],
    deliver: Sequence[PageNumbers],
    staging: Staging,
    readv: ReadvFn = sys_readv,
    *,
    objects: SharedObjects | None = None,
    maps: Sequence[Mapping] = (),
) -> CopyResult:
    """Copy the `deliver` pages (absolute, a subset of `taken`, per region) into staging,
    back to back in region order. The member must be frozen. `objects` and `maps`: as
    given to `select` (pages of object-backed shared mappings come from the objects;
    `maps`, the cut's, also gives each region its mapping facts)."""
    allp = np.concatenate(list(deliver)) if deliver else empty_pages()
    holes = objects.hole_pages(maps, allp) if objects is not None else 0
    if staging.reserve(int(allp.size) * PAGE_SIZE, populate=(int(allp.size) - holes) * PAGE_SIZE):
        log.warning(
            "staging grown while frozen: pages appeared after the estimate",
            extra={"fields": {"pid": pid, "pages": int(allp.size)}},
        )
    reader = MemoryReader(pid, readv, objects=objects, maps=maps)
    try:
        stats = reader.read_pages(allp, staging.rewrite())
    finally:
        reader.close()
    bad = stats.unreadable
    lost = int(np.count_nonzero(np.isin(allp, bad, assume_unique=True))) if bad.size else 0

    def build() -> tuple[StagedRegion, ...]:
        spans = [(s.start, s.end) for s in specs]
        facts = facts_for(maps, spans) if maps else [()] * len(specs)
        if owners.elsewhere(pid):
            facts = owned_facts(pid, facts)
        if bad.size:
            return _regions_compacted(specs, taken, deliver, staging, bad, facts)
        return _regions(specs, taken, deliver, allp, staging, facts)

    rows = None if bad.size else staging.pages(0, int(allp.size))
    return CopyResult(stats.readv_calls, int(bad.size), int(allp.size) - lost, build, rows)


def copy_planned(
    pid: int,
    specs: Sequence[RegionSpec],
    taken: Sequence[PageNumbers],
    plan: Plan,
    readv: ReadvFn = sys_readv,
    *,
    objects: SharedObjects | None = None,
    maps: Sequence[Mapping] = (),
) -> CopyResult:
    """`copy` of every taken page (a full capture) whose live copy is already in the
    plan's staging (nodeagent/capture/precopy.py): only `plan.read` is read, frozen. The
    rows are the cut's order once `plan.settle()` ran, after the thaw and before
    anything reads them (the regions are built lazily, the rows view stays valid)."""
    staging = plan.staging
    allp = np.concatenate(list(taken)) if taken else empty_pages()
    reader = MemoryReader(pid, readv, objects=objects, maps=maps)
    try:
        stats = reader.read_pages(plan.read, staging.rewrite(), plan.read_rows)
    finally:
        reader.close()
    bad = stats.unreadable

    def build() -> tuple[StagedRegion, ...]:
        spans = [(s.start, s.end) for s in specs]
        facts = facts_for(maps, spans) if maps else [()] * len(specs)
        if owners.elsewhere(pid):
            facts = owned_facts(pid, facts)
        if bad.size:
            return _regions_compacted(specs, taken, taken, staging, bad, facts)
        return _regions(specs, taken, taken, allp, staging, facts)

    rows = None if bad.size else staging.pages(0, int(allp.size))
    return CopyResult(stats.readv_calls, int(bad.size), int(allp.size) - int(bad.size), build, rows)


def owned_facts(pid: int, facts: Sequence[tuple[MapFact, ...]]) -> list[tuple[MapFact, ...]]:
    """The facts with `owner` set where a sibling of the tree group stores the object
    (nodeagent/proc/owners.py): the manifest says where the pages are."""
    table = owners.elsewhere(pid)
    out = []
    for fs in facts:
        got = []
        for f in fs:
            k = owners.object_key(f.dev, f.inode, f.path, f.shared)
            own = table.get(k, "") if k is not None else ""
            got.append(replace(f, owner=own) if own else f)
        out.append(tuple(got))
    return out


def _counts(parts: Sequence[PageNumbers]) -> npt.NDArray[np.int64]:
    return np.fromiter((p.size for p in parts), dtype=np.int64, count=len(parts))


def _regions(
    specs: Sequence[RegionSpec],
    taken: Sequence[PageNumbers],
    deliver: Sequence[PageNumbers],
    allp: PageNumbers,
    staging: Staging,
    facts: Sequence[tuple[MapFact, ...]],
) -> tuple[StagedRegion, ...]:
    """Every region's rows, offsets made relative to its start in two array operations
    (no arithmetic per region)."""
    base = np.fromiter((s.start >> PAGE_SHIFT for s in specs), dtype=np.uint64, count=len(specs))
    dn, tn = _counts(deliver), _counts(taken)
    d_off = allp - np.repeat(base, dn)
    t_all = np.concatenate(list(taken)) if taken else empty_pages()
    t_off = t_all - np.repeat(base, tn)
    data = staging.pages(0, int(allp.size))
    de, te = np.cumsum(dn).tolist(), np.cumsum(tn).tolist()
    out = []
    d0 = t0 = 0
    for spec, d1, t1, f in zip(specs, de, te, facts, strict=True):
        out.append(
            StagedRegion(
                spec.name, spec.start, spec.end, d_off[d0:d1], t_off[t0:t1], data[d0:d1], f
            )
        )
        d0, t0 = d1, t1
    return tuple(out)


def _regions_compacted(
    specs: Sequence[RegionSpec],
    taken: Sequence[PageNumbers],
    deliver: Sequence[PageNumbers],
    staging: Staging,
    bad: PageNumbers,
    facts: Sequence[tuple[MapFact, ...]],
) -> tuple[StagedRegion, ...]:
    """The rare path (device mappings, poisoned pages): unreadable pages dropped."""
    out: list[StagedRegion] = []
    row = 0
    for spec, t, d, f in zip(specs, taken, deliver, facts, strict=True):
        data = staging.pages(row, int(d.size))
        row += int(d.size)
        keep = ~np.isin(d, bad, assume_unique=True)
        if not keep.all():
            data, d = data[keep], d[keep]
        t = t[~np.isin(t, bad, assume_unique=True)]
        base = np.uint64(spec.start >> PAGE_SHIFT)
        out.append(StagedRegion(spec.name, spec.start, spec.end, d - base, t - base, data, f))
    return tuple(out)
