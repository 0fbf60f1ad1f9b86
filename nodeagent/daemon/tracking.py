"""A member's capture while it is frozen: full or incremental, the copy, the pending sets.

Owns the agent's side of DESIGN.md step 4 for one member (the worker thread calls in
with the member frozen, and thaws it afterwards); the tracking rules themselves (which
pages count as changed, arming before the copy with the `auto` fallback, the layout read
again after a registration) are the member's MemberTracker (nodeagent/capture/trackstate.py),
shared with the CLI chain:
- *Full or incremental*: full when the coordinator asks (`Capture.full`), when no
  generation of this member is known to be committed (first capture, or the first one
  aborted), or when the tracker cannot answer (not armed, lost track). Otherwise the
  delivered set is the tracker's changes (trackstate) with every pending set (captures
  not yet committed); a region whose name, start or end changed since the last committed
  capture is delivered whole (the coordinator inherits undelivered pages only from a
  region of the same layout).
- *Pending*: what a capture delivers is recorded before the copy, since the tracker has
  already forgotten it: an abort after this point must not lose those pages.
- *Pre-copy* (`precopy`, at the Freeze, member running): the live passes of
  nodeagent/capture/precopy.py for a member that will be captured in full; its Capture then
  reads frozen only what was written since. A tracker armed before them has re-armed
  in them: every page they saw is recorded as pending for the generation first, so an
  abort before the Capture loses nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cpcoord.errors import CpcoordError, TrackerFailed
from cpcoord.ranges import PAGE_SIZE
from nodeagent.capture import copyout, livecopy, precopy
from nodeagent.capture.changeset import pick
from nodeagent.capture.copyout import CopyResult
from nodeagent.capture.regions import RegionSpec
from nodeagent.capture.trackstate import tracked_mappings
from nodeagent.daemon.membership import HeldMember
from nodeagent.daemon.metrics import AgentMetrics
from nodeagent.pages import empty_pages
from nodeagent.proc.freeze import FrozenProcess, frozen
from nodeagent.proc.mapscache import derived, read_maps_shared
from nodeagent.proc.procfs import Mapping, check_alive
from nodeagent.proc.reader import ReadvFn
from nodeagent.proc.shared import SharedObjects
from nodeagent.proc.staging import Staging
from nodeagent.restore.layout import cut_layout
from nodeagent.trackers import leftovers, registry
from nodeagent.trackers.base import ChangedSet
from nodeagent.upload.recent import RecentChunks
from nodeagent.upload.stream import StagedMember

log = logging.getLogger(__name__)
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Copied:
    result: CopyResult
    full: bool
    tracker: str  # tracker that produced the delivered set; "none" when full
    base_generation: int  # the committed generation it is relative to; 0 when full
    plan: livecopy.Plan | None = None  # pre-copied: `settle()` after the thaw
    precopy: livecopy.Report | None = None
    maps: tuple[Mapping, ...] = ()  # the cut's (a whole-memory member's layout is made of it)

    def settle(self) -> None:
        """After the thaw, before anything reads the staged rows."""
        if self.plan is not None:
            self.plan.settle()


def will_be_full(m: HeldMember, force_full: bool) -> bool:
    return force_full or m.committed == 0 or not m.track.armed


def precopy_member(
    m: HeldMember,
    generation: int,
    force_full: bool,
    staging: Staging,
    seconds: float,
    freeze_timeout: float,
) -> livecopy.Report | None:
    """The live passes for the member's next Capture, when it will be full (module
    docstring); the member runs. None when pre-copy does not apply here."""
    m.precopied = None
    t = m.track
    name = t.name if t.tracker is not None else t.pref
    if not will_be_full(m, force_full) or name not in (*precopy.TRACKERS, registry.AUTO):
        return None
    if seconds <= 0:
        return None  # the Freeze's time for live passes went to other members
    was_armed = t.armed

    def specs_of(maps: Sequence[Mapping]) -> Sequence[RegionSpec]:
        return copyout.resolve(m.regions, maps)

    limits = precopy.Limits(seconds=max(0.0, seconds))
    live = precopy.live_passes(m.ident, t, specs_of, staging, limits, freeze_timeout=freeze_timeout)
    if was_armed:
        # Re-armed here: what it had seen since the last capture is owed until this
        # generation commits (every page the passes saw; later writes: the Capture's).
        maps = read_maps_shared(m.ident.view("capture"))
        seen = live.pages if live is not None else empty_pages()
        m.record_capture(generation, np.union1d(seen, t.taken), _layout(specs_of(maps)))
    if live is None:
        return None
    m.precopied = (generation, live)
    return live.report(None)


def release(m: HeldMember, fp: FrozenProcess | None, freeze_timeout: float) -> CpcoordError | None:
    """Disarm the member's tracker. uffd-wp closes its fd inside the target, which needs
    the target frozen: with `fp` None and the process alive, it is frozen briefly. The
    error when it could not (logged; the record of the fd stays, so a later sweep,
    nodeagent/trackers/leftovers.py, closes it), else None."""
    t = m.track
    if t.tracker is None:
        leftovers.done(m.ident)
        return None
    try:
        if fp is not None:
            t.forget(fp)
        elif m.alive and m.ident.alive():
            with frozen(m.ident, freeze_timeout) as fp2:
                t.forget(fp2)
        else:
            t.forget(None)
    except (CpcoordError, OSError) as e:
        fields = {"job": m.job, "member": m.name, "error": str(e)}
        log.warning("tracker release failed", extra={"fields": fields})
        return (
            e if isinstance(e, CpcoordError) else TrackerFailed(m.tracker_name, m.ident.pid, str(e))
        )
    leftovers.done(m.ident)
    return None


def after_restore(m: HeldMember, fp: FrozenProcess | None, freeze_timeout: float) -> None:
    """The member's memory was rewritten in place: what the tracker saw and what earlier
    captures delivered describe another memory now, so its next capture is full. `fp`:
    the member frozen by this thread; None freezes it briefly to disarm (release)."""
    release(m, fp, freeze_timeout)
    m.track.reset()
    m.committed = 0
    m.base_layout = None
    m.pending = {}
    m.layouts = {}


@derived
def _layout(specs: Sequence[RegionSpec]) -> dict[str, tuple[int, int]]:
    return {s.name: (s.start, s.end) for s in specs}


def capture_frozen(
    m: HeldMember,
    fp: FrozenProcess,
    generation: int,
    force_full: bool,
    staging: Staging,
    readv: ReadvFn,
) -> Copied:
    """Capture a frozen member into staging (module docstring). Raises ProcessExited and
    friends when it dies, other CpcoordErrors when reading fails; never thaws."""
    pid = fp.pid  # the leader, or a live thread while the leader is a zombie
    t = m.track
    maps = read_maps_shared(pid)  # the list of the staging estimate when nothing changed
    specs = copyout.resolve(m.regions, maps)
    mine = tracked_mappings(specs, maps)
    live = m.precopied[1] if m.precopied and m.precopied[0] == generation else None
    m.precopied = None
    if live is not None and live.staging is not staging:
        live = None  # (staging was replaced: an upload still reads the old one)
    reported = t.collect_or_arm(fp, mine, maps, incremental=True)
    leftovers.note(m.ident, t.tracker)  # a file write only when it armed anew
    maps0, mine0 = maps, mine  # what the tracker answered for
    if t.layout_touched:
        # The cut as copied: the maps as the tracker left them (a registration may have
        # merged VMAs); read again only then, 20 000 lines cost tens of milliseconds.
        maps = read_maps_shared(pid)
        specs = copyout.resolve(m.regions, maps)
        mine = tracked_mappings(specs, maps)
    with SharedObjects(pid) as objects:  # what is selected is what is read
        taken = copyout.select(pid, specs, maps, objects)
        now = np.concatenate(taken) if taken else empty_pages()  # regions: sorted, disjoint
        full = force_full or m.committed == 0 or not isinstance(reported, ChangedSet)
        layout = _layout(specs)
        if full or not isinstance(reported, ChangedSet):
            deliver = list(taken)
            delivered = now
        else:
            changed = t.changes(reported, now, maps0, mine0, m.pending_pages()).pages
            deliver, delivered = pick(taken, now, changed, m.unstable(specs, layout))
        plan = None
        if live is not None and full and isinstance(reported, ChangedSet):
            dirty = t.changes(reported, now, maps0, mine0, empty_pages()).pages
            plan = live.plan(now, dirty)
        t.settle(mine, now)
        # Recorded before the copy: the tracker has re-armed, so these pages must reach a
        # committed generation one way or another.
        m.record_capture(generation, delivered, layout)
        if plan is not None:
            res = copyout.copy_planned(pid, specs, taken, plan, readv, objects=objects, maps=maps)
        else:
            res = copyout.copy(
                pid, specs, taken, deliver, staging, readv, objects=objects, maps=maps
            )
    check_alive(m.ident, "capture")
    tracker = "none" if full else m.tracker_name
    report = None
    if live is not None:
        why = "" if plan is not None else "the cut did not fit the live copy (or lost track)"
        report = live.report(plan, why)
    whole = tuple(maps) if m.regions is None else ()
    return Copied(res, full, tracker, 0 if full else m.committed, plan, report, whole)


def _row_in(staging: Staging, rows: npt.NDArray[np.uint8] | None) -> int | None:
    """The staging row where `rows` starts; None when they are not staging's memory
    (an in-place capture) or not all of it."""
    if rows is None or not staging.capacity:
        return None
    off = int(rows.ctypes.data) - staging.address
    if off < 0 or off % PAGE_SIZE or off + rows.nbytes > staging.capacity:
        return None
    return off // PAGE_SIZE


def handoff(
    m: HeldMember,
    staging: Staging,
    c: Copied,
    job: str,
    generation: int,
    node: str,
    cut_ns: int,
    frozen_s: float,
    metrics: AgentMetrics,
) -> StagedMember:
    """The thawed member's copy, for the uploader; its staging stays busy (a later
    capture gets a new one) until the upload calls `release` (idempotent)."""
    pages = c.result.pages
    metrics.frozen_seconds.observe(frozen_s)
    backend = m.tracker_name or registry.NONE  # the one in use, also for a full capture
    metrics.captures.labels(backend, "full" if c.full else "incremental").inc()
    metrics.pages_captured.inc(pages)
    metrics.pages_present.inc(sum(int(r.all_pages.size) for r in c.result.regions))
    held = pages * PAGE_SIZE
    metrics.staging_bytes.inc(held)
    m.staging_busy = True
    released = threading.Event()

    def release() -> None:
        if released.is_set():  # the upload pool and a teardown may both call it
            return
        released.set()
        metrics.staging_bytes.dec(held)
        if m.staging is staging:
            m.staging_busy = False

    version = staging.version  # what the capture wrote: the upload's chunks
    row0 = _row_in(staging, c.result.rows)

    def uploaded(ids: npt.NDArray[np.uint8], rows: I64, counts: I64) -> None:
        if row0 is not None and m.staging is staging:
            m.recent = RecentChunks.of(staging, version, ids, rows + row0, counts)

    return StagedMember(
        job=job,
        generation=generation,
        member=m.name,
        node=node,
        ident=m.ident,
        regions=c.result.regions,
        tracker=c.tracker,
        full=c.full,
        base_generation=c.base_generation,
        cut_unix_ns=cut_ns,
        frozen_seconds=frozen_s,
        release=release,
        rows=c.result.rows,
        uploaded=uploaded,
        layout=cut_layout(m.ident.pid, c.maps) if c.maps else (),
    )
