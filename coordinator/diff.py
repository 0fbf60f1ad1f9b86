"""Diff of two committed generations: per member and region, the pages that changed.

Computed from the two complete manifests alone (no chunk is read): a page changed when
it is present in one generation only, or when its content differs, i.e. its chunk id
differs or it sits at a different page of the same chunk. Identical ids at the same
place name identical bytes (content addressing), so unchanged pages are never reported;
a page rewritten with the same bytes may still be reported if the capture chunked it
differently. All per-page work is vectorised over the page-entry columns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from coordinator.store import Manifest
from coordinator.store.manifest import MemberMap, PageTable
from cpcoord.errors import UnknownMember
from cpcoord.image import runs_of
from storecore.ids import zero_mask


@dataclass(frozen=True)
class RegionDiff:
    member: str
    region: str
    added: bool  # in B only
    removed: bool  # in A only
    runs: npt.NDArray[np.uint64]  # (n, 2) sorted runs (offset, count) of changed pages

    @property
    def pages(self) -> int:
        return int(self.runs[:, 1].sum()) if len(self.runs) else 0


def changed_pages(a: PageTable, b: PageTable) -> npt.NDArray[np.uint64]:
    """Sorted page offsets whose content differs between two page tables."""
    pa, ea, wa = a.expand()
    pb, eb, wb = b.expand()
    common, ia, ib = np.intersect1d(pa, pb, assume_unique=True, return_indices=True)
    ida = a.ids[ea[ia]]
    # Any page of a ZERO entry is zeros: only real chunks care which page of them it is.
    differ = (ida != b.ids[eb[ib]]) | ((wa[ia] != wb[ib]) & ~zero_mask(ida))
    only = np.setxor1d(pa, pb, assume_unique=True)
    return np.union1d(common[differ], only).astype(np.uint64)


def _regions(mm: MemberMap | None) -> dict[str, PageTable]:
    return {} if mm is None else {r.name: r.pages for r in mm.regions}


def _member(m: Manifest, name: str) -> MemberMap | None:
    try:
        return m.member(name)
    except KeyError:
        return None


def diff(a: Manifest, b: Manifest, members: Sequence[str] = ()) -> Iterator[RegionDiff]:
    """Region diffs, members in name order then regions in A's order (B's new ones last).
    A member or region in one generation only is all added or all removed."""
    names = sorted({x.name for x in a.members} | {x.name for x in b.members})
    if members:
        for n in members:
            if n not in names:
                raise UnknownMember(a.job, n, f"in generations {a.generation} and {b.generation}")
        names = [n for n in names if n in set(members)]
    for name in names:
        ra, rb = _regions(_member(a, name)), _regions(_member(b, name))
        for region in [*ra, *(r for r in rb if r not in ra)]:
            ta, tb = ra.get(region), rb.get(region)
            pages = changed_pages(
                ta if ta is not None else PageTable.empty(),
                tb if tb is not None else PageTable.empty(),
            )
            yield RegionDiff(name, region, ta is None, tb is None, runs_of(pages))
