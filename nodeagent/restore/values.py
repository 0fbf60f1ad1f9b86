"""The values a restore is made of: where each region must go, what goes there, a member
that passed the fit check, and what a write did.

Owns: `RegionLayout`/`MemberLayout` (the regions at the cut, from the generation),
`RegionContents` (a region's pages at the cut, with the checks that make it writable),
matching contents to a layout (`contents_for`), `Fitted` and `RestoreStats`. The
sequence that uses them is `restore`.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from cpcoord.errors import ContentsInvalid
from cpcoord.kstate import KernelState
from cpcoord.mapfacts import MapFact
from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE
from nodeagent.capture.process import CapturedRegion
from nodeagent.pages import in_sorted
from nodeagent.proc.freeze import FrozenProcess
from nodeagent.proc.procfs import Mapping
from nodeagent.proc.registers import ThreadStates
from nodeagent.restore.layout_plan import LayoutChange

U64 = npt.NDArray[np.uint64]


def page_up(n: int) -> int:
    return (n + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


@dataclass(frozen=True)
class RegionLayout:
    """Where a region of the generation must be written: `[start, end)`, page-aligned;
    only its first `length` bytes when set (a client region whose last page is shared)."""

    name: str
    start: int
    end: int
    length: int | None = None
    # The member's mappings over the region at the cut; empty when the generation does
    # not say (older manifests, restore into a new process): then the fit check does
    # what it can without them (module docstring of check_fit).
    mappings: tuple[MapFact, ...] = ()

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def write_end(self) -> int:
        return self.end if self.length is None else self.start + self.length


@dataclass(frozen=True)
class MemberLayout:
    """One member's regions at the cut, whether they are the default set, and (default
    set) every thread's registers and its kernel side saved at the cut; `force`: roll
    back although the kernel side differs (restore/kernel_check.py)."""

    member: str
    regions: tuple[RegionLayout, ...]
    explicit: bool = True
    threads: ThreadStates | None = None
    kernel: KernelState | None = None
    force: bool = False
    # Whole-memory members: every mapping at the cut (empty: not recorded; then a changed
    # layout is a misfit). A restore puts the layout back to it (restore/layout.py).
    cut_maps: tuple[MapFact, ...] = ()


@dataclass(frozen=True)
class RegionContents:
    """One region's pages at the cut: `data[i]` is page `pages[i]` (offset in pages from
    `start`, sorted, unique). A page not listed is written as zeros in a private
    mapping (it was absent at the cut) and left alone in a shared one (not captured)."""

    name: str
    start: int
    end: int
    pages: U64
    data: npt.NDArray[np.uint8]
    # The pages to write (sorted offsets, `pages` among them): a page of the scope not
    # listed is written as an absent one (zeros where present now), any other page is
    # left alone (it already holds the generation's bytes). None: every page.
    scope: U64 | None = None

    @property
    def size(self) -> int:
        return self.end - self.start

    @classmethod
    def from_captured(cls, r: CapturedRegion, copy: bool = True) -> RegionContents:
        """From a full capture (an incremental one lacks unchanged pages: refused).
        `copy=False` aliases the capture's staging buffer."""
        if r.pages.size != r.all_pages.size:
            raise ContentsInvalid("?", r.name, "an incremental capture lacks unchanged pages")
        data = np.array(r.data, copy=True) if copy else r.data
        return cls(r.name, r.start, r.end, np.array(r.pages, dtype=np.uint64), data)

    def relocated(self, start: int) -> RegionContents:
        return replace(self, start=start, end=start + self.size)

    def validate(self, member: str) -> None:
        def bad(why: str) -> ContentsInvalid:
            return ContentsInvalid(member, self.name, why)

        if self.start % PAGE_SIZE or self.end % PAGE_SIZE or self.end <= self.start:
            raise bad(f"bounds 0x{self.start:x}-0x{self.end:x} not page-aligned or empty")
        p = self.pages
        if p.ndim != 1 or p.dtype != np.uint64:
            raise bad("pages must be a 1-D uint64 array")
        if self.data.dtype != np.uint8 or self.data.shape != (p.size, PAGE_SIZE):
            raise bad(f"data must be ({p.size}, {PAGE_SIZE}) uint8, is {self.data.shape}")
        if p.size and (
            np.any(np.diff(p.astype(np.int64)) <= 0) or int(p[-1]) >= self.size >> PAGE_SHIFT
        ):
            raise bad("page offsets must be sorted, unique and inside the region")
        sc = self.scope
        if sc is not None:
            if sc.ndim != 1 or sc.dtype != np.uint64:
                raise bad("scope must be a 1-D uint64 array")
            if sc.size and (
                np.any(np.diff(sc.astype(np.int64)) <= 0) or int(sc[-1]) >= self.size >> PAGE_SHIFT
            ):
                raise bad("scope offsets must be sorted, unique and inside the region")
            if not in_sorted(p, sc).all():
                raise bad("a page to write lies outside the scope")


@dataclass(frozen=True)
class Fitted:
    """A member that passed the fit check: write() it while it stays frozen."""

    fp: FrozenProcess
    layout: MemberLayout
    maps: tuple[Mapping, ...]
    # What write() changes in the layout before the pages (None: nothing; layout.py).
    change: LayoutChange | None = None
    # How the kernel side differs from the cut without refusing (kernel_check.py): output
    # already made, state not compared, refusals --force overrode. Shown by the CLI.
    kernel_warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class RestoreStats:
    member: str
    pid: int
    regions: int
    data_pages: int  # pages written from the generation's data
    zero_bytes: int  # bytes written with zeros (zero or absent at the cut, present now)
    bytes_written: int
    writev_calls: int
    mem_bytes: int  # of those, written through /proc/PID/mem
    threads: int  # threads whose registers were put back
    seconds: float
    backup_bytes: int = 0  # read from the process first, to put back on a failure
    backup_fresh_bytes: int = 0  # of those, kept in memory mapped while frozen
    backup_live_bytes: int = 0  # backed up before the freeze instead (restore/livebackup.py)


def contents_for(
    layout: MemberLayout, contents: Iterable[RegionContents] | MappingABC[str, RegionContents]
) -> list[RegionContents]:
    """The contents of every region of the layout, in its order, each checked against
    its region (ContentsInvalid names what is wrong)."""
    items = list(contents.values() if isinstance(contents, MappingABC) else contents)
    by_name = {c.name: c for c in items}
    if len(by_name) != len(items):
        raise ContentsInvalid(layout.member, "?", "a region appears twice")
    want = {r.name for r in layout.regions}
    if set(by_name) != want:
        extra, missing = sorted(set(by_name) - want), sorted(want - set(by_name))
        raise ContentsInvalid(
            layout.member, (missing or extra)[0], f"missing {missing}, extra {extra}"
        )
    out = []
    for r in layout.regions:
        c = by_name[r.name]
        if (c.start, c.end) != (r.start, r.end):
            raise ContentsInvalid(layout.member, r.name, "bounds differ from the layout")
        c.validate(layout.member)
        out.append(c)
    return out
