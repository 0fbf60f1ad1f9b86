"""A member's tracker and what it last saw: the one tracking model of both capture paths.

Owns, for one member, the rules of DESIGN.md step 4 that the agent (nodeagent/daemon/tracking.py)
and the CLI chain (nodeagent/capture/incremental.py) share; each side keeps only its own account
of pending pages (per generation / per capture) and its own I/O (staging + upload / image):
- *Which mappings are tracked* (`tracked_mappings`): the readable ones that overlap a
  region; the tracker is armed on those (the hash tracker would otherwise read every
  library).
- *Which pages count as changed* (`MemberTracker.changes`), among the pages taken now:
  the tracker's report (`collect`, which re-arms in the same call), every page of a
  mapping that is new, grown, moved or mprotect'ed since the last arm/collect, of a
  mapping the tracker could not register (uffd-wp `untracked`), of a shared mapping
  (changeset.always_changed_runs), every page the last capture did not take (a page can
  become present without a write the tracker sees: a read fault maps the zero page), and
  the caller's pending pages (captures not yet committed).
- *Arming* (`arm`), called by both paths before their copy (arming may write to the
  target: uffd-wp injects system calls and the kernel then updates the thread's rseq
  area; such writes must be in this copy). `auto` tries the backends in
  registry.AUTO_ORDER, skipping for this arm each one that cannot be armed on this process
  (unavailable or failing); a named one that cannot be armed leaves the member untracked
  (full captures) and is tried again at the next capture.
- *The baseline of the next capture* (`settle`): the tracked mappings as the tracker left
  them (registering may merge or split VMAs: `layout_touched` tells the caller to read the
  maps again for its cut) and the pages taken at this cut.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cpcoord.errors import CpcoordError, ProcessExited, TrackerFailed, TrackerUnavailable
from nodeagent.capture.changeset import (
    always_changed_runs,
    mark_appeared,
    mark_pages,
    mark_runs,
    ranges_runs,
    written_estimate,
)
from nodeagent.capture.regions import RegionSpec, new_or_changed_runs
from nodeagent.pages import PageNumbers, empty_pages
from nodeagent.proc.freeze import FrozenProcess
from nodeagent.proc.mapscache import derived
from nodeagent.proc.procfs import Mapping
from nodeagent.trackers import registry
from nodeagent.trackers.base import ChangedSet, Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChangeCounts:
    """Why pages were copied (a page may count under several headings)."""

    tracker: int = 0  # reported by the tracker
    mappings: int = 0  # in a new, grown, moved or changed mapping
    appeared: int = 0  # not taken by the last capture
    untracked: int = 0  # in a mapping the tracker could not register
    pending: int = 0  # carried over from captures not (yet) committed
    collect_seconds: float = 0.0  # the tracker's collect (or arm, after a full capture)
    shared: int = 0  # in a shared mapping: changed at every capture (always_changed_runs)


@dataclass(frozen=True)
class Changes:
    pages: PageNumbers  # the taken pages that count as changed (sorted)
    counts: ChangeCounts


@derived
def tracked_mappings(specs: Sequence[RegionSpec], maps: Sequence[Mapping]) -> list[Mapping]:
    """The readable mappings that overlap a region (regions sorted and disjoint): what
    the tracker is armed on. One binary search per mapping, never a scan of the regions
    (20 000 regions of 20 000 mappings made that 4e8 steps, seconds in the frozen window)."""
    if not specs or not maps:
        return []
    starts = np.fromiter((s.start for s in specs), dtype=np.uint64, count=len(specs))
    ends = np.fromiter((s.end for s in specs), dtype=np.uint64, count=len(specs))
    ms = np.fromiter((m.start for m in maps), dtype=np.uint64, count=len(maps))
    me = np.fromiter((m.end for m in maps), dtype=np.uint64, count=len(maps))
    # The last region starting before the mapping's end; it overlaps iff it ends after
    # the mapping's start (a later one starts too late, an earlier one ends before it).
    i = np.searchsorted(starts, me, side="left") - 1
    ok = i >= 0
    ok[ok] = ends[i[ok]] > ms[ok]
    return [maps[k] for k in np.flatnonzero(ok).tolist() if maps[k].readable]


class MemberTracker:
    """One member's tracker state (module docstring). Used on the thread that freezes
    the member, with it frozen, except `expect` (running) and `forget(None)`.

    `pref`: a registry name (`auto`, a backend, `none`). `context`: log fields naming
    the member."""

    def __init__(self, pref: str = registry.AUTO, context: dict[str, Any] | None = None) -> None:
        self.pref = registry.canonical(pref)
        self.context = dict(context or {})
        self.tracker: Tracker | None = None
        self.armed = False  # the tracker answers for writes since the last arm/collect
        self.armed_maps: tuple[Mapping, ...] = ()  # the tracked mappings it was armed on
        self.taken: PageNumbers = empty_pages()  # pages the last capture took
        # Whether a capture got as far as the tracker (collect or arm): from then on the
        # tracker's state in the target has moved on, whatever happens to the capture.
        self.touched = False
        self.arm_error = ""  # why the last collect_or_arm could not arm a tracker
        self.seconds = 0.0  # how long the last collect or arm took

    @property
    def name(self) -> str:
        return self.tracker.name if self.tracker is not None else registry.NONE

    @property
    def layout_touched(self) -> bool:
        """Whether the last arm/collect may have changed the maps (uffd-wp registering a
        range can merge or split VMAs): then the cut is the maps read again."""
        return bool(getattr(self.tracker, "layout_touched", False))

    def create(self) -> None:
        """Make the preferred backend's instance now, unarmed (TrackerUnavailable for a
        named one that is not available here)."""
        self.tracker = registry.create(registry.choose(self.pref))

    def _warn(self, msg: str, e: BaseException) -> None:
        fields = {**self.context, "tracker": self.name, "error": str(e)}
        log.warning(msg, extra={"fields": fields})

    # -- in the frozen window, in this order -------------------------------------------

    def collect(
        self, fp: FrozenProcess, mine: Sequence[Mapping], maps: Sequence[Mapping]
    ) -> ChangedSet | str:
        """The tracker's changed set since the last arm/collect (re-armed in the same
        call); or why it lost track: then it is dropped, and the capture is full and arms."""
        assert self.tracker is not None and self.armed
        self.touched = True
        t0 = time.perf_counter()
        try:
            cs = self.tracker.collect(fp, mine, maps)
        except (TrackerFailed, TrackerUnavailable) as e:
            self._warn("tracker lost track: full capture", e)
            self.drop(fp)
            return f"tracker lost: {e}"
        self.seconds = time.perf_counter() - t0
        return cs

    def collect_or_arm(
        self, fp: FrozenProcess, mine: Sequence[Mapping], maps: Sequence[Mapping], incremental: bool
    ) -> ChangedSet | str:
        """The first step of every capture, before its copy: the tracker's changed set
        (`collect`, which re-arms), when `incremental` and armed; otherwise, or when it
        lost track, a tracker armed (`arm`; its error in `arm_error`) and why the capture
        is full ("" when the caller already knows)."""
        why = ""
        self.arm_error = ""
        if incremental and self.armed:
            got = self.collect(fp, mine, maps)
            if isinstance(got, ChangedSet):
                return got
            why = got
        self.arm_error = self.arm(fp, mine, maps)
        return why

    def changes(
        self,
        reported: ChangedSet,
        taken: PageNumbers,
        maps: Sequence[Mapping],
        mine: Sequence[Mapping],
        pending: PageNumbers,
    ) -> Changes:
        """The pages of `taken` (sorted, unique) that count as changed (module docstring).
        `maps`, `mine`: as given to `collect`. Before `settle`."""
        mask = np.zeros(taken.size, dtype=np.bool_)
        n_tracker = mark_pages(taken, reported.pages, mask)
        n_maps = mark_runs(taken, new_or_changed_runs(self.armed_maps, mine), mask)
        untracked = getattr(self.tracker, "untracked", None) or {}
        n_untracked = mark_runs(taken, ranges_runs(list(untracked)), mask)
        n_shared = mark_runs(taken, always_changed_runs(maps), mask)
        n_appeared = mark_appeared(taken, self.taken, mask)
        n_pending = mark_pages(taken, pending, mask)
        counts = ChangeCounts(
            n_tracker, n_maps, n_appeared, n_untracked, n_pending, self.seconds, n_shared
        )
        return Changes(taken[mask], counts)

    def arm(self, fp: FrozenProcess, mine: Sequence[Mapping], maps: Sequence[Mapping]) -> str:
        """Arm a tracker (module docstring: the `auto` fallback); "" or why it is not
        armed. Before the copy."""
        self.armed = False
        t0 = time.perf_counter()
        tried: set[str] = set()
        why = ""
        while True:
            if self.tracker is None:
                try:
                    name = registry.choose(self.pref, frozenset(tried))
                except TrackerUnavailable as e:
                    self._warn("tracker unavailable", e)
                    return str(e)
                self.tracker = registry.create(name)
                if self.tracker is None:
                    break  # `none`, or no backend left to try
            t = self.tracker
            self.touched = True
            try:
                t.arm(fp, mine, maps)
                self.armed = True
                break
            except (TrackerUnavailable, TrackerFailed) as e:
                # A process that died under the arm is the capture's error, not a
                # tracker's: no warning, and no other tracker tried on a corpse.
                if fp is not None and not fp.ident.alive():
                    raise ProcessExited(fp.ident.pid, "arm the tracker") from e
                self._warn("tracker cannot be armed", e)
                if self.pref != registry.AUTO:
                    why = f"{t.name}: {e}"
                    break
                tried.add(t.name)
                self.tracker = None
        self.seconds = time.perf_counter() - t0
        return why

    def settle(self, mine: Sequence[Mapping], taken: PageNumbers) -> None:
        """The baseline of the next capture: the tracked mappings of the cut (read again
        after `layout_touched`) and the pages taken."""
        self.armed_maps = tuple(mine) if self.armed else ()
        self.taken = taken

    # -- outside a capture -----------------------------------------------------------------

    def expect(
        self,
        pid: int,
        maps: Sequence[Mapping],
        mine: Sequence[Mapping],
        taken: PageNumbers,
        pending: PageNumbers,
    ) -> int | None:
        """Before the freeze: how many of `taken` the next incremental capture will likely
        copy (sizes staging); None when only a full read would tell."""
        if self.tracker is None or not self.armed:
            return None
        guess = written_estimate(self.tracker, pid, mine)
        if guess is None:
            return None
        mask = np.zeros(taken.size, dtype=np.bool_)
        mark_runs(taken, new_or_changed_runs(self.armed_maps, mine), mask)
        mark_runs(taken, always_changed_runs(maps), mask)
        mark_appeared(taken, self.taken, mask)
        mark_pages(taken, pending, mask)
        n = guess + int(np.count_nonzero(mask))
        return n + n // 4 + 256  # writes keep coming until the freeze

    def forget(self, fp: FrozenProcess | None) -> None:
        """Stop tracking: release what the target holds for us (e.g. its uffd; needs the
        target frozen in `fp`, None when it is gone). Errors are the caller's."""
        t, self.tracker, self.armed = self.tracker, None, False
        if t is not None:
            t.forget(fp)

    def drop(self, fp: FrozenProcess | None) -> None:
        """`forget`, an error only logged: the next capture is full and arms again."""
        try:
            self.forget(fp)
        except (CpcoordError, OSError) as e:
            self._warn("tracker release failed", e)

    def reset(self) -> None:
        """What the tracker saw describes another memory now (restored in place)."""
        self.armed_maps = ()
        self.taken = empty_pages()
