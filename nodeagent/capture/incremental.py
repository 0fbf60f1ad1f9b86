"""Incremental captures of one member: the CLI chain's layer between the capture engine
and the member's MemberTracker (nodeagent/capture/trackstate.py, shared with the agent).

Owns, for one process and its regions, the sequence of captures that makes a chain
(DESIGN.md, step 4): when a capture is full, the pending set, commit/abort, and the
state a later process resumes from. Everything below happens in the frozen window of
each capture, on the freezing thread:

- The first capture of a member is full; so is every capture after the tracker lost
  track (TrackerFailed, UffdLost: the tracker is armed again), after an aborted full
  capture, and every capture with no tracker (`none`).
- Otherwise the pages to copy are those MemberTracker.changes counts as changed, with
  the *pending* set: pages copied by captures aborted since the last committed one.
- Pages that were taken before and are not now are gone: the image's `all_pages` says
  so (the capture engine fills it; nothing is carried here).
- A full capture arms the tracker before its copy (trackstate); an incremental one
  collects, which re-arms, before its copy.
- `commit()` after the capture is stored clears the pending set; `abort()` keeps it (an
  aborted capture re-armed the tracker, so its pages must go into the next one). A
  capture neither committed nor aborted counts as aborted; so does one that raised.

State that must outlive the process (the `cpcoord capture --parent` chain) is exported as
a MemberState and written by nodeagent/capture/chain.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from cpcoord.ranges import AddressRange
from nodeagent.capture import precopy as precopy_mod
from nodeagent.capture.inplace import Destination
from nodeagent.capture.process import Capture, capture
from nodeagent.capture.regions import RegionSpec, resolve_regions
from nodeagent.capture.trackstate import ChangeCounts, MemberTracker, tracked_mappings
from nodeagent.pages import PageNumbers, empty_pages
from nodeagent.proc.freeze import FrozenProcess
from nodeagent.proc.mapscache import read_maps_shared
from nodeagent.proc.procfs import Mapping, ProcessIdentity
from nodeagent.proc.reader import ReadvFn, sys_readv
from nodeagent.proc.staging import Staging
from nodeagent.trackers import persist, registry
from nodeagent.trackers.base import ChangedSet, Tracker

log = logging.getLogger(__name__)

FIRST = "first capture of this member"
NO_TRACKER = "no tracker: every capture is full"


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
    """What a later process needs to go on with a member's chain (nodeagent/capture/chain.py)."""

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

    `tracker`: a registry name (`auto`, `uffd-wp`, `soft-dirty`, `hash`, `none`); its
    arming rules (the `auto` fallback) are MemberTracker.arm's. A named one that cannot
    be armed is reported (TrackedResult.arm_error) and the member stays on full captures.
    """

    def __init__(
        self,
        ident: ProcessIdentity,
        ranges: Sequence[AddressRange] | None = None,
        tracker: str | None = registry.AUTO,
        *,
        staging: Staging | None = None,
        freeze_timeout: float = 5.0,
    ) -> None:
        self.ident = ident
        self.ranges = list(ranges) if ranges is not None else None
        self.staging = staging if staging is not None else Staging()
        self.freeze_timeout = freeze_timeout
        self.track = MemberTracker(tracker or registry.NONE, {"pid": ident.pid})
        self.track.create()  # a named backend that is not available here fails now
        self._pending: PageNumbers = empty_pages()
        self._need_full = FIRST if self.track.tracker is not None else NO_TRACKER
        self._inflight: str | PageNumbers = _IDLE
        self._live: precopy_mod.LiveCopy | None = None  # live passes for the next capture

    @property
    def tracker(self) -> Tracker | None:
        return self.track.tracker

    @property
    def tracker_name(self) -> str:
        return self.track.name

    @property
    def touched(self) -> bool:
        """Whether a capture got as far as the tracker (its state in the target moved on)."""
        return self.track.touched

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
        precopy: precopy_mod.Limits | None = None,
        between: precopy_mod.Between | None = None,
    ) -> TrackedResult:
        """One capture (in the caller's freeze `fp`, or in its own). Then `commit()` once
        it is stored, or `abort()`. `into`: copy in place (nodeagent.capture.process.capture);
        for a capture that will be full (`next_is_full`). `precopy`: when the capture
        will be full, run `precopy()` first (not with `fp`: call it before freezing;
        not with `into`); `between`: its test hook."""
        if self._inflight is not _IDLE:
            self.abort()
        hooks = _Hooks(self)
        if precopy is not None and fp is None and self._live is None:
            self.precopy(precopy, readv=readv, between=between)
        live, self._live = self._live, None
        if live is not None and (into is not None or not self._need_full):
            live = None  # (the capture will not be full, or copies in place)
        hooks.live = live is not None
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
                precopied=live,
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

    def precopy_applies(self) -> bool:
        """Whether a pre-copy would run for the next capture: it is full and the tracker
        is one pre-copy works with (or still `auto`)."""
        if not self._need_full:
            return False
        name = self.track.name if self.track.tracker is not None else self.track.pref
        return name in (*precopy_mod.TRACKERS, registry.AUTO)

    def precopy(
        self,
        limits: precopy_mod.Limits,
        *,
        readv: ReadvFn = sys_readv,
        between: precopy_mod.Between | None = None,
    ) -> precopy_mod.LiveCopy | None:
        """The live passes for the next capture (nodeagent.capture.precopy), when it will
        be full; the next `capture` (in its own freeze or the caller's) then reads frozen
        only what changed since. Runs with the process running; None when it does not
        apply or the tracker cannot be armed."""
        self._live = None
        if not self.precopy_applies():
            return None
        try:
            self._live = precopy_mod.live_passes(
                self.ident,
                self.track,
                self._specs,
                self.staging,
                limits,
                freeze_timeout=self.freeze_timeout,
                readv=readv,
                between=between,
            )
        except BaseException:
            self.abort()
            raise
        return self._live

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
                if self.track.tracker is not None:
                    self._need_full = "the last full capture was aborted"
            return
        self._pending = inflight
        log.info(
            "capture aborted: pages kept pending",
            extra={"fields": {"pid": self.ident.pid, "pending": int(inflight.size)}},
        )

    def forget(self, fp: FrozenProcess | None = None) -> None:
        """Stop tracking (releases what the target holds for us, e.g. its uffd)."""
        self.track.forget(fp)
        self._need_full = "tracker forgotten"
        self._pending = empty_pages()

    # -- persistence -------------------------------------------------------------------

    def export_state(self, *, committed: bool = False) -> MemberState:
        """The chain's state for a later process: as it is now (after commit() or
        abort()), or with `committed` as it will be once the capture in flight is
        committed (written next to the image before the image itself is)."""
        meta: dict[str, Any] = {}
        arrays: dict[str, npt.NDArray[Any]] = {}
        if self.track.tracker is not None:
            meta, arrays = persist.save(self.track.tracker)
        return MemberState(
            tracker=self.tracker_name,
            ident=self.ident,
            armed_maps=self.track.armed_maps,
            taken=self.track.taken,
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
        t = tc.track
        t.armed_maps = tuple(state.armed_maps)
        t.taken = state.taken
        tc._pending = state.pending
        tc._need_full = state.need_full
        if t.tracker is not None and not state.need_full:
            lost = persist.load(t.tracker, state.ident, state.backend, state.arrays)
            if lost:
                tc._need_full = f"tracker state lost: {lost}"
        t.armed = t.tracker is not None and not tc._need_full
        return tc

    def _specs(self, maps: Sequence[Mapping]) -> list[RegionSpec]:
        return resolve_regions(self.ranges, maps, self.ident.pid)


class _Hooks:
    """One capture's hooks (nodeagent.capture.process.SelectionHooks) over a TrackedCapture."""

    def __init__(self, owner: TrackedCapture) -> None:
        self.o = owner
        self.full_reason = owner._need_full
        self.used = owner.tracker_name
        self.inflight: str | PageNumbers = _IDLE
        self.counts = ChangeCounts()
        self.arm_error = ""
        self.live = False  # a pre-copy ran: a full capture collects instead of arming
        self.precopy_changed: PageNumbers | None = None  # its changes since the last pass

    def expect(self, pid: int, maps: Sequence[Mapping], taken: PageNumbers) -> int | None:
        o = self.o
        if self.full_reason:
            return None
        mine = tracked_mappings(o._specs(maps), maps)
        return o.track.expect(pid, maps, mine, taken, o._pending)

    @property
    def layout_touched(self) -> bool:
        """The tracker registered mappings in this capture (the VMAs may have merged)."""
        return self.o.track.layout_touched

    def changed(self, fp: FrozenProcess, maps: Sequence[Mapping]) -> ChangedSet | None:
        raise AssertionError("capture() calls changed_among on these hooks")

    def changed_among(
        self, fp: FrozenProcess, maps: Sequence[Mapping], taken: PageNumbers
    ) -> ChangedSet | None:
        o, t = self.o, self.o.track
        mine = tracked_mappings(o._specs(maps), maps)
        pre = self.live and bool(self.full_reason) and t.armed
        got = t.collect_or_arm(fp, mine, maps, incremental=not self.full_reason or pre)
        if pre and isinstance(got, ChangedSet):
            # Pre-copied: the capture is full, but only what changed since the last live
            # pass (and what has no current live copy) is read frozen.
            self.precopy_changed = t.changes(got, taken, maps, mine, empty_pages()).pages
            got = ""
        elif isinstance(got, ChangedSet):
            ch = t.changes(got, taken, maps, mine, o._pending)
            # Stashed before the copy: if anything after this fails, these pages stay
            # pending.
            self.inflight = ch.pages
            self.counts = ch.counts
            self._settle(fp, mine, taken)
            return ChangedSet(ch.pages)
        self.full_reason = got or self.full_reason or "tracker not armed"
        self.inflight = _FULL
        self.arm_error = t.arm_error
        self.used = t.name
        self.counts = ChangeCounts(collect_seconds=t.seconds)
        if self.arm_error:
            o._need_full = f"tracker not armed: {self.arm_error}"
        else:
            o._need_full = "" if t.armed else NO_TRACKER
        self._settle(fp, mine, taken)
        return None

    def _settle(self, fp: FrozenProcess, mine: Sequence[Mapping], taken: PageNumbers) -> None:
        """The baseline of the next capture: the tracked mappings as the tracker left
        them (read again when it may have changed them) and the taken pages at this cut."""
        o = self.o
        if o.track.layout_touched:
            maps = read_maps_shared(fp.pid)
            mine = tracked_mappings(o._specs(maps), maps)
        o.track.settle(mine, taken)

    def after_copy(self, fp: FrozenProcess, maps: Sequence[Mapping]) -> None:
        """Nothing: collect re-armed and arm ran before the copy (see changed_among)."""
