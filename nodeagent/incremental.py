"""Incremental captures of one member: the layer between the capture engine and a tracker.

Owns, for one process and its regions, the sequence of captures that makes a chain
(DESIGN.md, step 4; issue 3). Everything below happens in the frozen window of each
capture, on the freezing thread:

- The first capture of a member is full; so is every capture after the tracker lost
  track (TrackerFailed, UffdLost: the tracker is armed again), after an aborted full
  capture, and every capture with no tracker (`none`).
- Otherwise the pages to copy are, among the pages the rule takes now (`taken`):
  the tracker's changed set (collect, which re-arms it in the same call), every page of a
  mapping that is new, grown, moved or mprotect'ed since the last capture (maps compared
  with those at the last arm/collect), every page that was not taken by the last capture
  (newly present, or newly inside a region: a tracker need not report a page that
  became present by a read, e.g. the shared zero page under soft-dirty), every page of a
  mapping the tracker could not register (uffd-wp `untracked`), every page of a shared
  mapping (trackers are per address space: changeset.always_changed_runs), and the
  *pending* set: pages copied by captures that were aborted since the last committed one.
- Pages that were taken before and are not now are gone: the image's `all_pages` says
  so (the capture engine fills it; nothing is carried here).
- A full capture arms the tracker before its copy (arming may write to the target: see
  _Hooks.changed_among); an incremental one collects, which re-arms, before its copy.
- `commit()` after the capture is stored clears the pending set; `abort()` keeps it (an
  aborted capture re-armed the tracker, so its pages must go into the next one). A
  capture neither committed nor aborted counts as aborted; so does one that raised.

State that must outlive the process (the `cpcoord capture --parent` chain) is exported as
a MemberState and written by nodeagent/chain.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cpcoord.errors import TrackerFailed, TrackerUnavailable
from cpcoord.ranges import AddressRange
from nodeagent.capture import Capture, capture
from nodeagent.changeset import (
    always_changed_runs,
    mark_appeared,
    mark_pages,
    mark_runs,
    ranges_runs,
    tracked_mappings,
    written_estimate,
)
from nodeagent.freeze import FrozenProcess
from nodeagent.inplace import Destination
from nodeagent.pages import PageNumbers, empty_pages
from nodeagent.procfs import Mapping, ProcessIdentity, read_maps
from nodeagent.reader import ReadvFn, sys_readv
from nodeagent.regions import RegionSpec, new_or_changed_runs, resolve_regions
from nodeagent.staging import Staging
from nodeagent.trackers import persist, registry
from nodeagent.trackers.base import ChangedSet, Tracker

log = logging.getLogger(__name__)

FIRST = "first capture of this member"
NO_TRACKER = "no tracker: every capture is full"


@dataclass(frozen=True)
class ChangeCounts:
    """Why pages were copied (a page may count under several headings)."""

    tracker: int = 0  # reported by the tracker
    mappings: int = 0  # in a new, grown, moved or changed mapping
    appeared: int = 0  # not taken by the last capture
    untracked: int = 0  # in a mapping the tracker could not register
    pending: int = 0  # carried over from aborted captures
    collect_seconds: float = 0.0  # the tracker's collect (or arm, after a full capture)
    shared: int = 0  # in a shared mapping: changed at every capture (always_changed_runs)


@dataclass(frozen=True)
class TrackedResult:
    capture: Capture
    tracker: str  # the backend that selected the pages ("none": no tracker)
    full: bool  # every taken page was copied
    reason: str  # why it was full ("" when incremental)
    counts: ChangeCounts
    arm_error: str = ""  # the tracker could not be armed after this capture


@dataclass(frozen=True)
class MemberState:
    """What a later process needs to go on with a member's chain (nodeagent/chain.py)."""

    tracker: str
    ident: ProcessIdentity
    armed_maps: tuple[Mapping, ...]
    taken: PageNumbers  # pages taken by the last capture
    pending: PageNumbers
    need_full: str  # "" or why the next capture must be full
    backend: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, npt.NDArray[Any]] = field(default_factory=dict)


# -- the member's chain ----------------------------------------------------------------

_IDLE = "idle"  # no capture in flight
_FULL = "full"  # a full capture in flight


class TrackedCapture:
    """Incremental captures of one member (see the module docstring).

    `tracker`: a registry name (`auto`, `uffd-wp`, `soft-dirty`, `hash`, `none`) or a
    Tracker instance. With `auto`, a backend that cannot be armed on this process is
    replaced by the next one in registry.AUTO_ORDER; a named one that cannot is reported
    (TrackedResult.arm_error) and the member stays on full captures.
    """

    def __init__(
        self,
        ident: ProcessIdentity,
        ranges: Sequence[AddressRange] | None = None,
        tracker: str | Tracker | None = registry.AUTO,
        *,
        staging: Staging | None = None,
        freeze_timeout: float = 5.0,
    ) -> None:
        self.ident = ident
        self.ranges = list(ranges) if ranges is not None else None
        self.staging = staging if staging is not None else Staging()
        self.freeze_timeout = freeze_timeout
        self._auto = tracker == registry.AUTO
        self._excluded: set[str] = set()
        if tracker is None or isinstance(tracker, str):
            self.tracker = registry.create(registry.choose(tracker or registry.NONE))
        else:
            self.tracker = tracker
        self._armed_maps: tuple[Mapping, ...] = ()
        self._taken: PageNumbers = empty_pages()
        self._pending: PageNumbers = empty_pages()
        self._need_full = FIRST if self.tracker is not None else NO_TRACKER
        self._inflight: str | PageNumbers = _IDLE
        # Whether a capture got as far as the tracker (collect or arm): from then on the
        # tracker's state in the target has moved on, whatever happens to the capture.
        self.touched = False

    @property
    def tracker_name(self) -> str:
        return self.tracker.name if self.tracker is not None else registry.NONE

    @property
    def pending(self) -> PageNumbers:
        """Pages of aborted captures that the next capture copies whatever the tracker says."""
        return self._pending

    @property
    def next_is_full(self) -> str:
        """Why the next capture will be full, or "" when it will be incremental."""
        return self._need_full

    # -- one capture -------------------------------------------------------------------

    def capture(
        self,
        fp: FrozenProcess | None = None,
        *,
        readv: ReadvFn = sys_readv,
        into: Destination | None = None,
    ) -> TrackedResult:
        """One capture (in the caller's freeze `fp`, or in its own). Then `commit()` once
        it is stored, or `abort()`. `into`: copy in place (nodeagent.capture.capture);
        for a capture that will be full (`next_is_full`)."""
        if self._inflight is not _IDLE:
            self.abort()
        hooks = _Hooks(self)
        try:
            cap = capture(
                self.ident,
                self.ranges,
                hooks=hooks,
                staging=self.staging,
                freeze_timeout=self.freeze_timeout,
                readv=readv,
                fp=fp,
                into=into,
            )
        except BaseException:
            self._inflight = hooks.inflight
            self.abort()
            raise
        self._inflight = hooks.inflight
        return TrackedResult(
            capture=cap,
            tracker=hooks.used,
            full=hooks.full_reason != "",
            reason=hooks.full_reason,
            counts=hooks.counts,
            arm_error=hooks.arm_error,
        )

    def commit(self) -> None:
        """The last capture is stored: its pages need not be copied again."""
        if self._inflight is not _IDLE:
            self._pending = empty_pages()
        self._inflight = _IDLE

    def abort(self) -> None:
        """The last capture is dropped: its pages go into the next capture."""
        inflight, self._inflight = self._inflight, _IDLE
        if isinstance(inflight, str):
            if inflight == _FULL:
                self._pending = empty_pages()
                if self.tracker is not None:
                    self._need_full = "the last full capture was aborted"
            return
        self._pending = inflight
        log.info(
            "capture aborted: pages kept pending",
            extra={"fields": {"pid": self.ident.pid, "pending": int(inflight.size)}},
        )

    def forget(self, fp: FrozenProcess | None = None) -> None:
        """Stop tracking (releases what the target holds for us, e.g. its uffd)."""
        if self.tracker is not None:
            self.tracker.forget(fp)
        self._need_full = "tracker forgotten"
        self._pending = empty_pages()

    # -- persistence -------------------------------------------------------------------

    def export_state(self, *, committed: bool = False) -> MemberState:
        """The chain's state for a later process: as it is now (after commit() or
        abort()), or with `committed` as it will be once the capture in flight is
        committed (written next to the image before the image itself is)."""
        meta: dict[str, Any] = {}
        arrays: dict[str, npt.NDArray[Any]] = {}
        if self.tracker is not None:
            meta, arrays = persist.save(self.tracker)
        return MemberState(
            tracker=self.tracker_name,
            ident=self.ident,
            armed_maps=self._armed_maps,
            taken=self._taken,
            pending=empty_pages() if committed else self._pending,
            need_full=self._need_full,
            backend=meta,
            arrays=arrays,
        )

    @classmethod
    def resume(
        cls,
        state: MemberState,
        ranges: Sequence[AddressRange] | None = None,
        *,
        staging: Staging | None = None,
        freeze_timeout: float = 5.0,
    ) -> TrackedCapture:
        """A member's chain from an exported state. A backend whose hold on the process
        is gone (a closed uffd) makes the next capture full, it is not an error."""
        tc = cls(state.ident, ranges, state.tracker, staging=staging, freeze_timeout=freeze_timeout)
        tc._armed_maps = tuple(state.armed_maps)
        tc._taken = state.taken
        tc._pending = state.pending
        tc._need_full = state.need_full
        if tc.tracker is not None and not state.need_full:
            lost = persist.load(tc.tracker, state.ident, state.backend, state.arrays)
            if lost:
                tc._need_full = f"tracker state lost: {lost}"
        return tc

    # -- used by the hooks, while frozen -------------------------------------------------

    def _specs(self, maps: Sequence[Mapping]) -> list[RegionSpec]:
        return resolve_regions(self.ranges, maps, self.ident.pid)

    def _arm(self, fp: FrozenProcess, mine: Sequence[Mapping], maps: Sequence[Mapping]) -> str:
        """Arm the tracker (falling back along AUTO_ORDER under `auto`); "" or why not."""
        while self.tracker is not None:
            try:
                self.tracker.arm(fp, mine, maps)
                return ""
            except (TrackerUnavailable, TrackerFailed) as e:
                why = f"{self.tracker.name}: {e}"
                log.warning(
                    "tracker cannot be armed",
                    extra={
                        "fields": {"pid": fp.pid, "tracker": self.tracker.name, "error": str(e)}
                    },
                )
                if not self._auto:
                    return why
                self._excluded.add(self.tracker.name)
                self.tracker = registry.create(
                    registry.choose(registry.AUTO, frozenset(self._excluded))
                )
        return ""


class _Hooks:
    """One capture's hooks (nodeagent.capture.SelectionHooks) over a TrackedCapture."""

    def __init__(self, owner: TrackedCapture) -> None:
        self.o = owner
        self.full_reason = owner._need_full
        self.used = owner.tracker_name
        self.inflight: str | PageNumbers = _IDLE
        self.counts = ChangeCounts()
        self.arm_error = ""

    def expect(self, pid: int, maps: Sequence[Mapping], taken: PageNumbers) -> int | None:
        o = self.o
        if self.full_reason or o.tracker is None:
            return None
        guess = written_estimate(o.tracker, pid, tracked_mappings(o._specs(maps), maps))
        if guess is None:
            return None
        mask = np.zeros(taken.size, dtype=np.bool_)
        mark_runs(taken, new_or_changed_runs(o._armed_maps, maps), mask)
        mark_runs(taken, always_changed_runs(maps), mask)
        mark_appeared(taken, o._taken, mask)
        mark_pages(taken, o._pending, mask)
        n = guess + int(np.count_nonzero(mask))
        return n + n // 4 + 256  # writes keep coming until the freeze

    @property
    def layout_touched(self) -> bool:
        """The tracker registered mappings in this capture (the VMAs may have merged)."""
        return bool(getattr(self.o.tracker, "layout_touched", False))

    def changed(self, fp: FrozenProcess, maps: Sequence[Mapping]) -> ChangedSet | None:
        raise AssertionError("capture() calls changed_among on these hooks")

    def changed_among(
        self, fp: FrozenProcess, maps: Sequence[Mapping], taken: PageNumbers
    ) -> ChangedSet | None:
        o = self.o
        mine = tracked_mappings(o._specs(maps), maps)
        if not self.full_reason and o.tracker is not None:
            changed = self._collect(fp, maps, mine, taken)
            if changed is not None:
                # Only registering new mappings (uffd-wp) can change the maps here.
                touched = getattr(o.tracker, "layout_touched", False)
                self._settle(fp, taken, None if touched else maps)
                return changed
        # Full: arm *before* the copy. Arming may itself write to the target (uffd-wp
        # injects system calls, and the kernel then updates the thread's rseq area):
        # such writes must land before the pages are copied, not between the copy and
        # the write-protection, where no tracker would ever see them.
        self.inflight = _FULL
        if o.tracker is not None:
            t0 = time.perf_counter()
            o.touched = True
            self.arm_error = o._arm(fp, mine, maps)
            self.used = o.tracker_name
            self.counts = ChangeCounts(collect_seconds=time.perf_counter() - t0)
            o._need_full = (
                f"tracker not armed: {self.arm_error}"
                if self.arm_error
                else ("" if o.tracker is not None else NO_TRACKER)
            )
        self._settle(fp, taken, None)
        return None

    def _collect(
        self,
        fp: FrozenProcess,
        maps: Sequence[Mapping],
        mine: Sequence[Mapping],
        taken: PageNumbers,
    ) -> ChangedSet | None:
        """The incremental set, or None when the tracker lost track (then: full)."""
        o = self.o
        assert o.tracker is not None
        t0 = time.perf_counter()
        o.touched = True
        try:
            reported = o.tracker.collect(fp, mine, maps)
        except (TrackerFailed, TrackerUnavailable) as e:
            self.full_reason = f"tracker lost: {e}"
            log.warning(
                "tracker failed: full capture",
                extra={"fields": {"pid": fp.pid, "tracker": o.tracker.name, "error": str(e)}},
            )
            return None
        t1 = time.perf_counter()
        mask = np.zeros(taken.size, dtype=np.bool_)
        n_tracker = mark_pages(taken, reported.pages, mask)
        n_maps = mark_runs(taken, new_or_changed_runs(o._armed_maps, maps), mask)
        untracked = getattr(o.tracker, "untracked", None) or {}
        n_untracked = mark_runs(taken, ranges_runs(list(untracked)), mask)
        n_shared = mark_runs(taken, always_changed_runs(maps), mask)
        n_appeared = mark_appeared(taken, o._taken, mask)
        n_pending = mark_pages(taken, o._pending, mask)
        copy = taken[mask]
        # Stashed before the copy: if anything after this fails, these pages stay pending.
        self.inflight = copy
        self.counts = ChangeCounts(
            n_tracker, n_maps, n_appeared, n_untracked, n_pending, t1 - t0, n_shared
        )
        return ChangedSet(copy)

    def _settle(
        self, fp: FrozenProcess, taken: PageNumbers, maps: Sequence[Mapping] | None
    ) -> None:
        """The baseline of the next capture: the maps as the tracker left them (`maps`
        when it cannot have changed them, else read again: registering may merge or
        split VMAs) and the taken pages at this cut."""
        self.o._armed_maps = tuple(maps) if maps is not None else tuple(read_maps(fp.pid))
        self.o._taken = taken

    def after_copy(self, fp: FrozenProcess, maps: Sequence[Mapping]) -> None:
        """Nothing: collect re-armed and arm ran before the copy (see changed_among)."""
