"""A member's capture while it is frozen: the changed set, the copy, the tracker re-arm.

Owns the decisions of DESIGN.md step 4 for one member (the worker thread calls in with
the member frozen, and thaws it afterwards):
- *Full or incremental*: full when the coordinator asks (`Capture.full`), when no
  generation of this member is known to be committed (first capture, or the first one
  aborted), or when the tracker cannot answer (not armed, lost track). Otherwise the
  delivered set is tracker changes + pages of new or changed mappings + pages present
  now that the previous capture did not take + every pending set (captures not yet
  committed), intersected with the pages present now; a region
  whose name, start or end changed since the last committed capture is delivered whole
  (the coordinator inherits undelivered pages only from a region of the same layout).
- *Re-arm while frozen*: `collect` re-arms in the same call; without a working tracker
  a new one is armed (auto: uffd-wp, soft-dirty, hash, the first that arms on this
  process) *before* the copy, so whatever arming writes into the target is copied.
- *Pending*: what a capture delivers is recorded before the copy, since the tracker has
  already forgotten it: an abort after this point must not lose those pages.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cpcoord.errors import CpcoordError, TrackerFailed, TrackerUnavailable
from cpcoord.ranges import PAGE_SIZE
from nodeagent import copyout, metrics
from nodeagent.capture import restrict
from nodeagent.copyout import CopyResult
from nodeagent.freeze import FrozenProcess, frozen
from nodeagent.membership import HeldMember
from nodeagent.pagemap import PageNumbers, empty_pages
from nodeagent.procfs import Mapping, check_alive, read_maps
from nodeagent.reader import ReadvFn, Staging
from nodeagent.regions import RegionSpec, new_or_changed_pages
from nodeagent.trackers import registry
from nodeagent.trackers.base import ChangedSet
from nodeagent.upload import StagedMember

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Copied:
    result: CopyResult
    full: bool
    tracker: str  # tracker that produced the delivered set; "none" when full
    base_generation: int  # the committed generation it is relative to; 0 when full


def tracked_maps(specs: Sequence[RegionSpec], maps: Sequence[Mapping]) -> list[Mapping]:
    """The mappings that hold a region: what the tracker is armed on (the hash tracker
    would otherwise read every library). One step per mapping."""
    return [m for m in maps if any(m.start < s.end and s.start < m.end for s in specs)]


def _log(msg: str, m: HeldMember, e: BaseException) -> None:
    log.warning(msg, extra={"fields": {"job": m.job, "member": m.name, "error": str(e)}})


def collect(m: HeldMember, fp: FrozenProcess, tracked: list[Mapping]) -> PageNumbers | None:
    """Pages changed since the last capture (tracker, new or changed mappings, pending
    sets); None when the tracker cannot say: then the capture is full and re-arms."""
    if m.tracker is None or m.armed_maps is None:
        return None
    try:
        cs = m.tracker.collect(fp, tracked)  # re-arms in the same call
    except (TrackerFailed, TrackerUnavailable) as e:
        _log("tracker lost track: full capture", m, e)
        try:
            m.tracker.forget(fp)
        except CpcoordError as e2:
            _log("tracker forget failed", m, e2)
        m.forget_tracking()
        return None
    moved = new_or_changed_pages(m.armed_maps, tracked)
    return np.union1d(np.union1d(cs.pages, moved), m.pending_pages()).astype(np.uint64)


def arm(m: HeldMember, fp: FrozenProcess, tracked: list[Mapping]) -> None:
    """Arm a tracker (auto: the best one that arms on this process); none on failure,
    so the next capture is full and tries again."""
    tried: set[str] = set()
    while True:
        try:
            name = registry.choose(m.tracker_pref, frozenset(tried))
        except TrackerUnavailable as e:
            _log("tracker unavailable", m, e)
            return m.forget_tracking()
        t = registry.create(name)
        if t is None:
            return m.forget_tracking()
        try:
            t.arm(fp, tracked)
        except TrackerUnavailable as e:
            _log("tracker cannot serve this member", m, e)
            tried.add(name)
            if m.tracker_pref != registry.AUTO:
                return m.forget_tracking()
            continue
        except TrackerFailed as e:
            _log("tracker arm failed", m, e)
            return m.forget_tracking()
        m.tracker, m.tracker_name = t, name
        return None


def release(m: HeldMember, fp: FrozenProcess | None, freeze_timeout: float) -> None:
    """Disarm the member's tracker. uffd-wp closes its fd inside the target, which needs
    the target frozen: with `fp` None and the process alive, it is frozen briefly."""
    if m.tracker is None:
        return
    try:
        if fp is not None:
            m.tracker.forget(fp)
        elif m.alive and m.ident.alive():
            with frozen(m.ident, freeze_timeout) as fp2:
                m.tracker.forget(fp2)
        else:
            m.tracker.forget(None)
    except (CpcoordError, OSError) as e:
        _log("tracker release failed", m, e)
    m.forget_tracking()


def after_restore(m: HeldMember, fp: FrozenProcess | None, freeze_timeout: float) -> None:
    """The member's memory was rewritten in place: what the tracker saw and what earlier
    captures delivered describe another memory now, so its next capture is full. `fp`:
    the member frozen by this thread; None freezes it briefly to disarm (release)."""
    release(m, fp, freeze_timeout)
    m.committed = 0
    m.base_layout = None
    m.pending = {}
    m.layouts = {}
    m.last_taken = empty_pages()


def appeared(taken: PageNumbers, before: PageNumbers) -> PageNumbers:
    """Pages taken now that the previous capture did not take (both sorted, unique): a
    page can become present without a write the tracker sees (a read fault maps the zero
    page; soft-dirty does not mark it), so these always count as changed."""
    if taken.size == before.size and np.array_equal(taken, before):
        return empty_pages()  # the common case
    if before.size == 0 or taken.size == 0:
        return taken
    idx = np.searchsorted(before, taken)
    idx[idx == before.size] = before.size - 1
    return taken[before[idx] != taken]


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
    pid = m.ident.pid
    maps = read_maps(pid)
    tracked = tracked_maps(copyout.resolve(m.regions, maps), maps)
    changed = collect(m, fp, tracked)
    if changed is None:
        # Arm *before* the copy: arming may write to the target (uffd-wp injects system
        # calls and the kernel then updates the thread's rseq area); such writes must be
        # in this copy, not land between the copy and the write-protection unseen.
        arm(m, fp, tracked)
    m.armed_maps = tuple(tracked) if m.tracker is not None else None
    # The cut as copied: read after the tracker, whose injections may map and unmap.
    maps = read_maps(pid)
    specs = copyout.resolve(m.regions, maps)
    taken = copyout.select(pid, specs, maps)
    now = np.concatenate(taken) if taken else empty_pages()  # regions are sorted, disjoint
    full = force_full or m.committed == 0 or changed is None
    if full or changed is None:
        deliver = list(taken)
    else:
        changed = np.union1d(changed, appeared(now, m.last_taken)).astype(np.uint64)
        picked = restrict(taken, ChangedSet(changed))
        deliver = [p if m.stable(s) else t for s, t, p in zip(specs, taken, picked, strict=True)]
    delivered = np.concatenate(deliver) if deliver else empty_pages()
    # Recorded before the copy: the tracker has re-armed, so these pages must reach a
    # committed generation one way or another.
    m.record_capture(generation, delivered, {s.name: (s.start, s.end) for s in specs})
    m.last_taken = now
    res = copyout.copy(pid, specs, taken, deliver, staging, readv, maps)
    check_alive(m.ident, "capture")
    tracker = "none" if full else m.tracker_name
    return Copied(res, full, tracker, 0 if full else m.committed)


def handoff(
    m: HeldMember,
    staging: Staging,
    c: Copied,
    job: str,
    generation: int,
    node: str,
    cut_ns: int,
    frozen_s: float,
) -> StagedMember:
    """The thawed member's copy, for the uploader; its staging stays busy (a later
    capture gets a new one) until the upload calls `release` (idempotent)."""
    pages = c.result.pages
    metrics.FROZEN_SECONDS.observe(frozen_s)
    backend = m.tracker_name or registry.NONE  # the one in use, also for a full capture
    metrics.CAPTURES.labels(backend, "full" if c.full else "incremental").inc()
    metrics.PAGES_CAPTURED.inc(pages)
    metrics.PAGES_PRESENT.inc(sum(int(r.all_pages.size) for r in c.result.regions))
    held = pages * PAGE_SIZE
    metrics.STAGING_BYTES.inc(held)
    m.staging_busy = True
    released = threading.Event()

    def release() -> None:
        if released.is_set():  # the upload pool and a teardown may both call it
            return
        released.set()
        metrics.STAGING_BYTES.dec(held)
        if m.staging is staging:
            m.staging_busy = False

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
    )
