"""The agent's half of a capture: the member is already frozen (by a Freeze command), so
this copies the chosen pages of its regions into staging and leaves thawing to the caller.

nodeagent/capture.py freezes, copies and thaws in one call; the agent cannot use it
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
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE
from nodeagent.capture import SLACK_FRACTION, SLACK_MIN, select_pages
from nodeagent.pagemap import PagemapReader, PageNumbers, empty_pages
from nodeagent.procfs import Mapping, read_maps
from nodeagent.reader import MemoryReader, ReadvFn, Staging, _sys_readv
from nodeagent.regions import RegionSpec, default_regions
from nodeagent.shared import SharedObjects

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
    maps = read_maps(pid)
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
    readv: ReadvFn = _sys_readv,
    *,
    objects: SharedObjects | None = None,
    maps: Sequence[Mapping] = (),
) -> CopyResult:
    """Copy the `deliver` pages (absolute, a subset of `taken`, per region) into staging,
    back to back in region order. The member must be frozen. `objects` and `maps`: as
    given to `select` (pages of object-backed shared mappings come from the objects)."""
    allp = np.concatenate(list(deliver)) if deliver else empty_pages()
    holes = objects.hole_pages(maps, allp) if objects is not None else 0
    if staging.reserve(int(allp.size) * PAGE_SIZE, populate=(int(allp.size) - holes) * PAGE_SIZE):
        log.warning(
            "staging grown while frozen: pages appeared after the estimate",
            extra={"fields": {"pid": pid, "pages": int(allp.size)}},
        )
    reader = MemoryReader(pid, readv, objects=objects, maps=maps)
    try:
        stats = reader.read_pages(allp, staging.address)
    finally:
        reader.close()
    bad = stats.unreadable
    out: list[StagedRegion] = []
    row = 0
    for spec, t, d in zip(specs, taken, deliver, strict=True):
        data = staging.pages(row, int(d.size))
        row += int(d.size)
        if bad.size:
            # Rare path (device mappings, poisoned pages): compact this region's rows.
            keep = ~np.isin(d, bad, assume_unique=True)
            if not keep.all():
                data, d = data[keep], d[keep]
            t = t[~np.isin(t, bad, assume_unique=True)]
        base = np.uint64(spec.start >> PAGE_SHIFT)
        out.append(StagedRegion(spec.name, spec.start, spec.end, d - base, t - base, data))
    return CopyResult(tuple(out), stats.readv_calls, int(bad.size))
