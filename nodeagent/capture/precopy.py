"""Pre-copy: copy a member's pages while it runs, so a full capture's freeze copies only
what was written since (live migration's pre-copy, for a checkpoint).

Owns the live passes and the plan of the frozen copy that ends them; both capture paths
use it (the CLI engine nodeagent/capture/process.py, the agent's nodeagent/daemon/tracking.py):

1. *Arm*, in a short freeze: the member's MemberTracker is armed (or, already armed,
   collected: that re-arms it). Every tracker call is made frozen (trackers/base.py:
   soft-dirty's read-then-clear is not atomic against a running writer).
2. *Live pass 1*, target running: every page the rule takes (nodeagent/capture/selection.py)
   is copied into staging, row k for the k-th page. Pages of shared mappings are left
   out: they count as changed at every capture (changeset.always_changed_runs).
3. *Live passes 2..N*: while the written set (estimated without re-arming,
   changeset.written_estimate) is above a small target and at most 3/4 of the last
   pass (a member writing faster than we copy gets no pass that saves little), and the rounds,
   bytes and time allow: a short freeze collects the tracker's changes (MemberTracker.changes:
   written pages, new/moved/grown mappings, pages that appeared), then they are copied
   live again into their rows (a new page gets the next free row).
4. *The cut* (the caller's freeze): the caller collects once more and asks `plan` which
   pages must be read frozen: the changes since the last collect, plus every page whose
   live copy is stale or missing. Pages that vanished are simply not in the cut's taken
   set. When the rows of the cut's pages are not 0..n-1 in order (pages appeared or
   vanished since pass 1), `Plan.settle` moves them into place after the thaw.

The result is a full capture equal to memory at the cut, like every capture: a page
written after its live copy is reported by the tracker and read again frozen. Staging is
never grown once live data is in it (growing remaps it): a plan that does not fit says
so, and the caller copies everything frozen.

The live copy's rows in staging, the cut's plan and the report are livecopy.py's.

`between`: a test hook called at fixed points of the live passes (after the arm, after
each live copy) to mutate the target deterministically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cpcoord.errors import TrackerFailed, TrackerUnavailable
from cpcoord.ranges import PAGE_SIZE
from nodeagent.capture.changeset import always_changed_runs, mark_runs, written_estimate
from nodeagent.capture.livecopy import LiveCopy, Pass
from nodeagent.capture.regions import RegionSpec
from nodeagent.capture.selection import select_pages
from nodeagent.capture.trackstate import MemberTracker, tracked_mappings
from nodeagent.pages import PageNumbers, empty_pages
from nodeagent.proc.freeze import FrozenProcess, frozen
from nodeagent.proc.mapscache import read_maps_shared
from nodeagent.proc.pagemap import PagemapReader
from nodeagent.proc.procfs import Mapping, ProcessIdentity
from nodeagent.proc.reader import ReadvFn, sys_readv
from nodeagent.proc.staging import Staging
from nodeagent.trackers.base import ChangedSet

log = logging.getLogger(__name__)

# Trackers pre-copy works with: hash reads every page to collect (a live pass would
# cost as much as it saves) and none cannot tell what was written.
TRACKERS = ("uffd-wp", "soft-dirty")
ROW_SLACK = 1 / 8  # staging rows beyond pass 1's pages, for pages that appear later
ROW_SLACK_MIN = 4096
KEPT_SLACK_MIN = 64  # prepared staging with this much room is not grown (live_passes)
# Another live pass only when the written set is at most 3/4 of the last pass: a member
# that writes faster than we copy would otherwise cost passes that save little.
SHRINK = 4 / 3

SpecsFn = Callable[[Sequence[Mapping]], Sequence[RegionSpec]]
Between = Callable[[int], None]


@dataclass(frozen=True)
class Limits:
    """Bounds of the live passes. `seconds`: wall time for all of them (None: none);
    `max_bytes`: bytes copied live in all passes (0: 4x pass 1's); `target_bytes`: stop
    once the written set is this small (the frozen copy is cheap then)."""

    rounds: int = 5
    seconds: float | None = None
    max_bytes: int = 0
    target_bytes: int = 4 << 20


def live_passes(
    ident: ProcessIdentity,
    track: MemberTracker,
    specs_of: SpecsFn,
    staging: Staging,
    limits: Limits,
    *,
    freeze_timeout: float = 5.0,
    readv: ReadvFn = sys_readv,
    between: Between | None = None,
) -> LiveCopy | None:
    """The live passes (module docstring, steps 1-3) with `track` (its tracker must be
    a pre-copy one or still to be chosen). None when its tracker cannot be armed or lost
    track on the way: the capture is then a plain full one (it arms again). Raises like a
    capture when the process goes away or cannot be frozen."""
    t_start = time.monotonic()
    deadline = None if limits.seconds is None else t_start + limits.seconds
    pid = ident.view("capture")
    tick = 0

    def hook() -> None:
        nonlocal tick
        if between is not None:
            between(tick)
        tick += 1

    # What the passes read, checked before anything is frozen (a caller without the
    # right gets the capture's own error, the target never stops).
    PagemapReader(pid).close()
    # -- 1. arm (or re-arm) in a short freeze --------------------------------------------
    t0 = time.monotonic()
    with frozen(ident, freeze_timeout) as fp:
        maps = read_maps_shared(pid)
        mine = tracked_mappings(specs_of(maps), maps)
        if not _arm(track, fp, mine, maps):
            return None
        if track.layout_touched:
            maps = read_maps_shared(pid)
            mine = tracked_mappings(specs_of(maps), maps)
    pause = time.monotonic() - t0
    hook()
    # -- 2. pass 1: every page taken now ---------------------------------------------------
    t1 = time.monotonic()
    taken = _select(pid, specs_of(maps), maps)
    live = LiveCopy(staging)
    # Staging prepared at attach (copyout.prepare) is kept when it holds pass 1 and the
    # estimate's own slack (1/16, at least 64 rows): growing it now would fault every
    # page in again, inside the checkpoint (0.2 s and more per 512 MiB in this VM).
    # Pages appearing past it still fall back to a frozen copy.
    n = int(taken.size)
    if staging.capacity < (n + max(KEPT_SLACK_MIN, n // 16)) * PAGE_SIZE:
        staging.reserve((n + max(ROW_SLACK_MIN, int(n * ROW_SLACK))) * PAGE_SIZE)
    # Rows for every page in order, shared ones too (the cut reads those frozen into
    # theirs): when nothing appears, the cut's rows are 0..n-1 and nothing moves.
    live.rows_for(taken, grow=True)
    n = live.copy(pid, _private(taken, maps), readv, deadline)
    track.settle(mine, live.valid())
    live.passes.append(Pass(n, time.monotonic() - t1, pause))
    budget = limits.max_bytes or 4 * max(1, n) * PAGE_SIZE
    hook()
    last = n
    # -- 3. further passes while the written set shrinks -----------------------------------
    while len(live.passes) < limits.rounds:
        if deadline is not None and time.monotonic() >= deadline:
            break
        tr = track.tracker
        est = written_estimate(tr, pid, mine) if tr is not None else None
        if est is None:
            break
        est += int(np.count_nonzero(~live.ok))
        if est * PAGE_SIZE <= limits.target_bytes or est * SHRINK > last:
            break
        if live.copied_bytes + est * PAGE_SIZE > budget:
            break
        t0 = time.monotonic()
        with frozen(ident, freeze_timeout) as fp:
            maps = read_maps_shared(pid)
            specs = specs_of(maps)
            mine = tracked_mappings(specs, maps)
            got = track.collect(fp, mine, maps)
            if not isinstance(got, ChangedSet):
                return None  # lost track (dropped): the capture arms again, full
            maps_c, mine_c = maps, mine
            if track.layout_touched:
                maps = read_maps_shared(pid)
                mine = tracked_mappings(specs_of(maps), maps)
        pause = time.monotonic() - t0
        t1 = time.monotonic()
        taken = _select(pid, specs_of(maps), maps)
        ch = track.changes(got, taken, maps_c, mine_c, empty_pages()).pages
        live.stale(ch)
        # Pages vanished since keep their rows (a later page may reappear there).
        n = live.copy(pid, _private(ch, maps), readv, deadline)
        live.rows_for(taken, grow=True)
        track.settle(mine, live.valid())
        live.passes.append(Pass(n, time.monotonic() - t1, pause))
        hook()
        last = n
    log.info(
        "pre-copied",
        extra={
            "fields": {
                "pid": pid,
                "rounds": len(live.passes),
                "bytes": live.copied_bytes,
                "ms": round((time.monotonic() - t_start) * 1e3, 3),
            }
        },
    )
    return live


def _arm(
    track: MemberTracker, fp: FrozenProcess, mine: list[Mapping], maps: Sequence[Mapping]
) -> bool:
    """Arm the tracker, or re-arm an armed one by collecting (what it reports is copied
    anyway: pass 1 copies everything). False when no tracker could be armed."""
    armed = track.armed and track.tracker is not None
    if armed and isinstance(track.collect(fp, mine, maps), ChangedSet):
        return True
    try:
        why = track.arm(fp, mine, maps)
    except (TrackerFailed, TrackerUnavailable) as e:
        why = str(e)
    if why or not track.armed or track.name not in TRACKERS:
        log.info("pre-copy skipped", extra={"fields": {"pid": fp.pid, "why": why or track.name}})
        return False
    return True


def _select(pid: int, specs: Sequence[RegionSpec], maps: Sequence[Mapping]) -> PageNumbers:
    if not specs:
        return empty_pages()
    with PagemapReader(pid) as pm:
        parts = select_pages(pm, specs, maps, None)
    return np.concatenate(parts) if parts else empty_pages()


def _private(pages: PageNumbers, maps: Sequence[Mapping]) -> PageNumbers:
    """The pages outside shared mappings (those are read frozen at every capture)."""
    runs = always_changed_runs(maps)
    if not runs.size or not pages.size:
        return pages
    mask = np.zeros(pages.size, np.bool_)
    mark_runs(pages, runs, mask)
    return pages[~mask]


def usable(tracker_pref: str | None) -> bool:
    """Whether pre-copy is on by default with this tracker preference (CLI/agent)."""
    return tracker_pref not in ("hash", "none")
