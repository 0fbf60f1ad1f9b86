"""The agent's half of a capture: the member is already frozen (by a Freeze command), so
this copies the chosen pages of its regions into staging and leaves thawing to the caller.

nodeagent/capture.py freezes, copies and thaws in one call; the agent cannot use it
as is, because the protocol splits those steps across commands (Freeze, Capture) and
thaws only once the changed set is known and the tracker re-armed. This module reuses
the capture engine's parts (the seed's page rule `select_pages`, batched
`process_vm_readv` into a prefaulted `Staging`) and keeps the same guarantees:
- `estimate` runs before the freeze, so staging is sized and prefaulted outside the
  frozen window;
- `select` and `copy` run frozen; only pages taken by the rule are ever copied;
- pages neither read path can read are dropped from the result, never invented.
Zero detection is left to the uploader: it runs after the thaw, off the ptrace thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cpcoord.mapfacts import MapFact, facts_for
from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE
from nodeagent.capture import SLACK_FRACTION, SLACK_MIN, select_pages
from nodeagent.pagemap import PagemapReader, PageNumbers, empty_pages, runs_from_pages
from nodeagent.procfs import Mapping, read_maps
from nodeagent.reader import MemoryReader, ReadvFn, Staging, _sys_readv
from nodeagent.regions import RegionSpec, default_regions

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
    regions: tuple[StagedRegion, ...]
    readv_calls: int
    unreadable_pages: int

    @property
    def pages(self) -> int:
        return sum(int(r.pages.size) for r in self.regions)


def resolve(explicit: Sequence[RegionSpec] | None, maps: Sequence[Mapping]) -> list[RegionSpec]:
    """The member's regions now: its explicit ones (sorted; one that no longer touches a
    mapping simply holds no page), or the default set of the current maps."""
    if explicit is None:
        return default_regions(maps)
    return sorted(explicit, key=lambda s: s.start)


def select(pid: int, specs: Sequence[RegionSpec], maps: Sequence[Mapping]) -> list[PageNumbers]:
    """Per region, the absolute page numbers the seed's rule takes (sorted)."""
    if not specs:
        return []
    with PagemapReader(pid) as pm:
        return select_pages(pm, specs, maps)


def estimate(pid: int, explicit: Sequence[RegionSpec] | None) -> int:
    """Bytes a full copy would take now, plus slack (call while the member runs)."""
    maps = read_maps(pid)
    taken = select(pid, resolve(explicit, maps), maps)
    est = sum(int(t.size) for t in taken) * PAGE_SIZE
    return est + max(SLACK_MIN, int(est * SLACK_FRACTION))


def copy(
    pid: int,
    specs: Sequence[RegionSpec],
    taken: Sequence[PageNumbers],
    deliver: Sequence[PageNumbers],
    staging: Staging,
    readv: ReadvFn = _sys_readv,
    maps: Sequence[Mapping] = (),
) -> CopyResult:
    """Copy the `deliver` pages (absolute, a subset of `taken`, per region) into staging,
    back to back in region order. The member must be frozen. `maps` (the cut's) gives
    each region its mapping facts."""
    allp = np.concatenate(list(deliver)) if deliver else empty_pages()
    if staging.reserve(int(allp.size) * PAGE_SIZE):
        log.warning(
            "staging grown while frozen: pages appeared after the estimate",
            extra={"fields": {"pid": pid, "pages": int(allp.size)}},
        )
    reader = MemoryReader(pid, readv)
    try:
        stats = reader.read_runs(runs_from_pages(allp) << np.uint64(PAGE_SHIFT), staging.address)
    finally:
        reader.close()
    bad = stats.unreadable
    out: list[StagedRegion] = []
    row = 0
    facts = facts_for(maps, [(s.start, s.end) for s in specs]) if maps else [()] * len(specs)
    for spec, t, d, f in zip(specs, taken, deliver, facts, strict=True):
        data = staging.pages(row, int(d.size))
        row += int(d.size)
        if bad.size:
            # Rare path (device mappings, poisoned pages): compact this region's rows.
            keep = ~np.isin(d, bad, assume_unique=True)
            if not keep.all():
                data, d = data[keep], d[keep]
            t = t[~np.isin(t, bad, assume_unique=True)]
        base = np.uint64(spec.start >> PAGE_SHIFT)
        out.append(StagedRegion(spec.name, spec.start, spec.end, d - base, t - base, data, f))
    return CopyResult(tuple(out), stats.readv_calls, int(bad.size))
