"""The capture engine: freeze a process, copy the selected pages into staging, thaw.

Owns the sequence of one capture and its result value (DESIGN.md, step 4):

1. *Prepare*, target running: read the maps, resolve regions, read pagemap, size and
   prefault the staging buffer from that estimate (first-touch faults on our side would
   otherwise land inside the frozen window).
2. *Frozen*: read the maps and pagemap again (authoritative: this is the cut), ask the
   hooks which pages changed (a tracker's ChangedSet restricts the copy), grow
   staging only if the estimate was short, copy with batched `process_vm_readv`, check
   the process is still alive, let the hooks re-arm, thaw.
3. After thaw: zero pages are detected (vectorised) and marked, and the result is built
   (nodeagent/capture/captured.py).

The result aliases the staging buffer: a later capture into the same Staging overwrites it.
With a Destination (`into=`: an image's own region files, cpcoord/image_files.py) the
pages land at their offset in their region's memory instead, reserved before the freeze
like staging, and the result aliases that memory.
A caller that already holds the freeze passes its FrozenProcess (`fp=`): then nothing is
frozen or thawed here, and several captures can share one cut (an incremental capture and
a full reference in the same frozen window: the incremental-chain tests).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from cpcoord.errors import NoSuchProcess, ProcessExited
from cpcoord.ranges import PAGE_SIZE, AddressRange
from nodeagent.capture import inplace
from nodeagent.capture.captured import Capture as Capture  # re-exported: the result values
from nodeagent.capture.captured import CapturedRegion as CapturedRegion
from nodeagent.capture.captured import CaptureTimings, build_regions, concat_parts
from nodeagent.capture.captured import zero_rows as zero_rows
from nodeagent.capture.changeset import pick
from nodeagent.capture.inplace import Destination as Destination  # re-exported
from nodeagent.capture.livecopy import LiveCopy, Plan
from nodeagent.capture.regions import resolve_regions
from nodeagent.capture.selection import select_pages as select_pages  # re-exported (copyout, tests)
from nodeagent.pages import PageNumbers
from nodeagent.proc.freeze import FrozenProcess, frozen
from nodeagent.proc.mapscache import read_maps_shared
from nodeagent.proc.pagemap import PagemapReader
from nodeagent.proc.procfs import Mapping, ProcessIdentity, check_alive
from nodeagent.proc.reader import MemoryReader, ReadvFn, sys_readv
from nodeagent.proc.shared import SharedObjects
from nodeagent.proc.staging import PARALLEL_MIN, Staging, copy_threads
from nodeagent.trackers.base import ChangedSet

log = logging.getLogger(__name__)

# Staging headroom over the pre-pass estimate, for pages that appear before the freeze.
SLACK_FRACTION = 1 / 16
SLACK_MIN = 64 * PAGE_SIZE


class CaptureHooks(Protocol):
    """Called on the freezing thread while the target is frozen (a tracker plugs in here)."""

    def changed(self, fp: FrozenProcess, maps: Sequence[Mapping]) -> ChangedSet | None:
        """Page numbers to copy (intersected with the pages taken by the rule); None
        copies every taken page (a full capture). Runs before the copy."""
        ...

    def after_copy(self, fp: FrozenProcess, maps: Sequence[Mapping]) -> None:
        """Runs after the copy, before the thaw: the place to arm or re-arm a tracker."""
        ...


class SelectionHooks(CaptureHooks, Protocol):
    """Hooks that also see the page selection (nodeagent.capture.incremental). `capture` calls
    `changed_among` instead of `changed`, and `expect` during the preparation."""

    def changed_among(
        self, fp: FrozenProcess, maps: Sequence[Mapping], taken: PageNumbers
    ) -> ChangedSet | None:
        """Like `changed`, given every page the rule takes at the cut (sorted)."""
        ...

    def expect(self, pid: int, maps: Sequence[Mapping], taken: PageNumbers) -> int | None:
        """Before the freeze: how many pages the capture will likely copy (sizes the
        staging buffer); None: all of `taken`."""
        ...


def capture(
    ident: ProcessIdentity,
    ranges: Sequence[AddressRange] | None = None,
    *,
    hooks: CaptureHooks | None = None,
    staging: Staging | None = None,
    freeze_timeout: float = 5.0,
    readv: ReadvFn = sys_readv,
    fp: FrozenProcess | None = None,
    into: Destination | None = None,
    precopied: LiveCopy | None = None,
) -> Capture:
    """Capture the process's regions (`ranges`, or the default set when None).

    With `fp`, the process is already frozen by the caller (on this thread), who also
    thaws it; otherwise it is frozen here for the copy only. With `into`, pages are
    copied there (in place) rather than into `staging`: meant for full captures, since
    it reserves every page taken before the freeze.

    With `precopied` (the live passes of nodeagent.capture.precopy, in this `staging`),
    a full capture reads frozen only the pages the hooks report as changed since
    (`precopy_changed`) and the pages with no current live copy; not with `into`.

    Raises NoSuchProcess / PidReused before anything happens, ProcessExited when it dies
    on the way, PermissionDenied, FreezeFailed, RangeUnmapped, RangesOverlap. The target
    is thawed on every path.
    """
    t0 = time.perf_counter()
    ident.check()
    check_alive(ident, "capture")
    if fp is not None and (fp.ident != ident or fp.thawed):
        raise ValueError("fp must be the caller's live freeze of this very process")
    if precopied is not None and (into is not None or precopied.staging is not staging):
        raise ValueError("a pre-copy lives in this capture's staging, never in place")
    plan: Plan | None = None
    # The leader, or a live thread while the leader is a zombie (nodeagent/proc/procfs.py).
    pid = fp.pid if fp is not None else ident.view("capture")
    staging = staging if staging is not None else Staging()
    objects = SharedObjects(pid)  # the cut's objects: selection and copy agree
    changed_among = getattr(hooks, "changed_among", None)
    expect = getattr(hooks, "expect", None)
    with PagemapReader(pid) as pm:
        try:
            # -- prepare (running, unless the caller froze it) -----------------------------
            maps0 = read_maps_shared(pid)  # the same list frozen, when nothing changed
            specs0 = resolve_regions(ranges, maps0, pid)
            with SharedObjects(pid) as pre:
                parts0 = select_pages(pm, specs0, maps0, pre)
                taken0 = concat_parts(parts0)
                if into is not None:  # holes of shared objects need no memory
                    into.reserve(
                        inplace.bounds_of(specs0),
                        inplace.without(parts0, inplace.hole_mask(taken0, maps0, pre)),
                    )
                holes0 = pre.hole_pages(maps0, taken0) * PAGE_SIZE  # need no memory
            guess = expect(pid, maps0, taken0) if expect is not None else None
            estimate = (taken0.size if guess is None else min(guess, taken0.size)) * PAGE_SIZE
            data = max(0, estimate - holes0)
            slack = max(SLACK_MIN, int(data * SLACK_FRACTION))
            if into is None and precopied is None:  # (growing would drop the live copy)
                staging.reserve(estimate + slack, populate=data + slack)
            elif estimate >= PARALLEL_MIN:
                copy_threads()  # started now, not in the frozen window (Staging does too)
            t1 = time.perf_counter()
            # -- frozen ----------------------------------------------------------------
            held = contextlib.nullcontext(fp) if fp is not None else frozen(ident, freeze_timeout)
            with held as fz:
                t2 = time.perf_counter()
                maps = read_maps_shared(pid)
                specs = resolve_regions(ranges, maps, pid)
                taken = select_pages(pm, specs, maps, objects)
                if hooks is None:
                    changed = None
                elif changed_among is not None:
                    changed = changed_among(fz, maps, concat_parts(taken))
                else:
                    changed = hooks.changed(fz, maps)
                if getattr(hooks, "layout_touched", False):
                    # A tracker's registration may have merged VMAs: the cut is the
                    # layout it left (region names and mapping facts follow the maps).
                    maps = read_maps_shared(pid)
                    specs = resolve_regions(ranges, maps, pid)
                    taken = select_pages(pm, specs, maps, objects)
                if changed is not None:
                    taken_now = concat_parts(taken)
                    copied = pick(taken, taken_now, changed.pages)[0]
                else:
                    copied = taken
                allp = concat_parts(copied)
                holes = None
                dirty = getattr(hooks, "precopy_changed", None)
                if precopied is not None and changed is None and dirty is not None:
                    plan = precopied.plan(allp, dirty)
                grown: int | bool = False
                if plan is not None:
                    pass  # staging holds the live copy and rows for every page
                elif into is not None:
                    holes = inplace.hole_mask(allp, maps, objects)
                    grown = into.reserve(inplace.bounds_of(specs), inplace.without(copied, holes))
                else:
                    grown = staging.reserve(
                        allp.size * PAGE_SIZE, populate=_data_bytes(allp, maps, objects)
                    )
                if grown:
                    log.warning(
                        "staging grown while frozen: pages appeared after the pre-pass",
                        extra={"fields": {"pid": pid, "estimate": estimate, "pages": allp.size}},
                    )
                t3 = time.perf_counter()
                reader = MemoryReader(pid, readv, objects=objects, maps=maps)
                try:
                    if plan is not None:
                        stats = reader.read_pages(plan.read, staging.rewrite(), plan.read_rows)
                    elif into is None:
                        stats = reader.read_pages(allp, staging.rewrite())
                    else:
                        stats = reader.read_pages(allp, 0, inplace.local_rows(specs, copied, into))
                finally:
                    reader.close()
                check_alive(ident, "capture")
                if hooks is not None:
                    hooks.after_copy(fz, maps)
                t4 = time.perf_counter()
            t5 = time.perf_counter()
        except NoSuchProcess:
            raise ProcessExited(pid, "capture") from None
        finally:
            objects.close()
    if plan is not None:
        plan.settle()  # rows into the cut's order: local memory, after the thaw
    report = None
    if precopied is not None:
        why = "" if plan is not None else "the cut's pages did not fit the live copy's staging"
        report = precopied.report(plan, why)
    regions = build_regions(specs, taken, copied, stats.unreadable, staging, into, holes)
    t6 = time.perf_counter()
    timings = CaptureTimings(
        prepare=t1 - t0,
        freeze=t2 - t1,
        select=t3 - t2,
        copy=t4 - t3,
        thaw=t5 - t4,
        frozen=t5 - t1,
        zero_scan=t6 - t5,
        total=t6 - t0,
    )
    result = Capture(
        ident=ident,
        maps=tuple(maps),
        regions=regions,
        timings=timings,
        incremental=changed is not None,
        readv_calls=stats.readv_calls,
        fallback_bytes=stats.fallback_bytes,
        unreadable_pages=int(stats.unreadable.size),
        staging=staging,
        shared_bytes=stats.shared_bytes,
        object_bytes=stats.object_bytes,
        precopy=report,
    )
    log.info(
        "captured",
        extra={
            "fields": {
                "pid": pid,
                "regions": len(regions),
                "pages": result.pages,
                "zero_pages": result.zero_pages,
                "unreadable": result.unreadable_pages,
                "prepare_ms": round(timings.prepare * 1e3, 3),
                "freeze_ms": round(timings.freeze * 1e3, 3),
                "select_ms": round(timings.select * 1e3, 3),
                "copy_ms": round(timings.copy * 1e3, 3),
                "thaw_ms": round(timings.thaw * 1e3, 3),
                "frozen_ms": round(timings.frozen * 1e3, 3),
            }
        },
    )
    return result


def _data_bytes(pages: PageNumbers, maps: Sequence[Mapping], objects: SharedObjects) -> int:
    """Bytes of staging the pages need populated: holes of shared objects need none."""
    return (int(pages.size) - objects.hole_pages(maps, pages)) * PAGE_SIZE
