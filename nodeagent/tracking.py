"""A member's capture while it is frozen: the changed set, the copy, the tracker re-arm.

Owns the decisions of DESIGN.md step 4 for one member (the worker thread calls in with
the member frozen, and thaws it afterwards):
- *Full or incremental*: full when the coordinator asks (`Capture.full`), when no
  generation of this member is known to be committed (first capture, or the first one
  aborted), or when the tracker cannot answer (not armed, lost track). Otherwise the
  delivered set is tracker changes + pages of new or changed mappings + pages present
  now that the previous capture did not take + every page of a shared mapping
  (changeset.always_changed_runs) + every pending set (captures not yet committed),
  intersected with the pages taken now; a region
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
import numpy.typing as npt

from cpcoord.errors import CpcoordError, TrackerFailed, TrackerUnavailable
from cpcoord.ranges import PAGE_SIZE
from nodeagent import copyout
from nodeagent.changeset import always_changed_runs, mark_pages, mark_runs
from nodeagent.copyout import CopyResult
from nodeagent.freeze import FrozenProcess, frozen
from nodeagent.mapscache import derived, read_maps_shared
from nodeagent.membership import HeldMember
from nodeagent.metrics import AgentMetrics
from nodeagent.pages import PageNumbers, empty_pages
from nodeagent.procfs import Mapping, check_alive
from nodeagent.reader import ReadvFn
from nodeagent.regions import RegionSpec, new_or_changed_pages
from nodeagent.shared import SharedObjects
from nodeagent.staging import Staging
from nodeagent.trackers import registry
from nodeagent.upload import StagedMember

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Copied:
    result: CopyResult
    full: bool
    tracker: str  # tracker that produced the delivered set; "none" when full
    base_generation: int  # the committed generation it is relative to; 0 when full


@derived
def tracked_maps(specs: Sequence[RegionSpec], maps: Sequence[Mapping]) -> list[Mapping]:
    """The mappings that hold a region: what the tracker is armed on (the hash tracker
    would otherwise read every library). Regions are sorted and disjoint: one binary
    search per mapping, never a scan of the regions (20 000 default regions of 20 000
    mappings made that 4e8 steps, seconds in the frozen window)."""
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
    return [maps[k] for k in np.flatnonzero(ok).tolist()]


def _layout_touched(t: object | None) -> bool:
    """Whether the tracker's last arm/collect may have changed the maps (uffd-wp
    registering a range can merge or split VMAs)."""
    return bool(getattr(t, "layout_touched", False))


def _log(msg: str, m: HeldMember, e: BaseException) -> None:
    log.warning(msg, extra={"fields": {"job": m.job, "member": m.name, "error": str(e)}})


def collect(
    m: HeldMember, fp: FrozenProcess, tracked: list[Mapping], maps: Sequence[Mapping]
) -> PageNumbers | None:
    """Pages changed since the last capture (tracker, new or changed mappings, pending
    sets); None when the tracker cannot say: then the capture is full and re-arms."""
    if m.tracker is None or m.armed_maps is None:
        return None
    try:
        cs = m.tracker.collect(fp, tracked, maps)  # re-arms in the same call
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


def arm(m: HeldMember, fp: FrozenProcess, tracked: list[Mapping], maps: Sequence[Mapping]) -> None:
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
            t.arm(fp, tracked, maps)
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


@derived
def _layout(specs: Sequence[RegionSpec]) -> dict[str, tuple[int, int]]:
    return {s.name: (s.start, s.end) for s in specs}


def _deliver(
    taken: Sequence[PageNumbers],
    now: PageNumbers,
    changed: PageNumbers,
    whole: npt.NDArray[np.bool_],
) -> tuple[list[PageNumbers], PageNumbers]:
    """Per region, the taken pages to copy: the changed ones, or all of a region that
    must be delivered whole; and all of them at once. Bulk operations over the
    concatenated pages (`now`), then one slice per region."""
    sizes = np.fromiter((t.size for t in taken), dtype=np.int64, count=len(taken))
    mask = np.zeros(now.size, dtype=np.bool_)
    mark_pages(now, changed, mask)
    if whole.any():
        mask |= np.repeat(whole, sizes)
    delivered = now[mask]
    kept = np.concatenate(([0], np.cumsum(mask, dtype=np.int64)))  # delivered before page i
    out, a = [], 0
    for b in kept[np.cumsum(sizes)].tolist():
        out.append(delivered[a:b])
        a = b
    return out, delivered


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
    maps = read_maps_shared(pid)  # the list of the staging estimate when nothing changed
    specs = copyout.resolve(m.regions, maps)
    tracked = tracked_maps(specs, maps)
    changed = collect(m, fp, tracked, maps)
    if changed is None:
        # Arm *before* the copy: arming may write to the target (uffd-wp injects system
        # calls and the kernel then updates the thread's rseq area); such writes must be
        # in this copy, not land between the copy and the write-protection unseen.
        arm(m, fp, tracked, maps)
    if _layout_touched(m.tracker):
        # The cut as copied: the maps as the tracker left them (a registration may have
        # merged VMAs); read again only then, 20 000 lines cost tens of milliseconds.
        maps = read_maps_shared(pid)
        specs = copyout.resolve(m.regions, maps)
        tracked = tracked_maps(specs, maps)
    m.armed_maps = tuple(tracked) if m.tracker is not None else None
    with SharedObjects(pid) as objects:  # what is selected is what is read
        taken = copyout.select(pid, specs, maps, objects)
        now = np.concatenate(taken) if taken else empty_pages()  # regions: sorted, disjoint
        full = force_full or m.committed == 0 or changed is None
        layout = _layout(specs)
        if full or changed is None:
            deliver = list(taken)
            delivered = now
        else:
            # Shared mappings count as changed at every capture: another process may have
            # written them, which no tracker of this address space sees.
            shared = np.zeros(now.size, dtype=np.bool_)
            mark_runs(now, always_changed_runs(maps), shared)
            extra = np.union1d(appeared(now, m.last_taken), now[shared])
            changed = np.union1d(changed, extra).astype(np.uint64)
            deliver, delivered = _deliver(taken, now, changed, m.unstable(specs, layout))
        # Recorded before the copy: the tracker has re-armed, so these pages must reach a
        # committed generation one way or another.
        m.record_capture(generation, delivered, layout)
        m.last_taken = now
        res = copyout.copy(pid, specs, taken, deliver, staging, readv, objects=objects, maps=maps)
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
    )
