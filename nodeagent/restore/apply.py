"""Restore: write a generation's pages back into a frozen process, in place or into a new one.

Owns the fit check, the write plan and the two-phase sequence (DESIGN.md, Restore):

1. `check_fit(fp, layout)` for every member (frozen): the process's mappings still hold
   each region as at the cut (every byte mapped with the permissions and backing it had
   then, restore_fit.py), and a default-set member has registers saved at the cut and
   the same threads as then. A misfit raises RegionMismatch naming member, region and
   what changed, RestoreRefused for threads or registers; nothing is written.
2. `write(fitted, contents)` for every member: each region gets its pages back (rows of
   `contents`), every other page of a private mapping becomes zeros (absent at the cut:
   "write all pages, including zero pages and pages written since"), then the
   registers of a default-set member. A page of a shared mapping that the generation
   does not list was never captured and is never written. Pages of private mappings
   that are absent now
   already read as they did at the cut and are left alone, so a sparse region costs no
   memory; in a private *file* mapping a page absent at the cut read as the file, so
   where it is present now it gets the file's bytes back, not zeros (restore_plan.py).
   All or nothing per member (restore_undo.py): what the write overwrites is backed up
   first (on a second thread, a step ahead), and a failure part-way puts back every
   byte written, and the registers, before it raises RestoreUndone.

Explicit regions (given ranges, the client library) are restored alone: the process
vouches for them. The default whole-memory set only with every thread's registers.

`restore_into(pid, {name: (addr, size)}, contents)` maps regions by name and size onto
wherever a new process keeps them now (size in bytes; the region at the cut is that size
rounded up to pages, and only `size` bytes are written, so a neighbour sharing the last
page is never touched).

Plans are built with NumPy over runs, never per page; writes go through nodeagent.proc.writer.
The values (layouts, contents, stats) are in restore_values and re-exported here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Mapping as MappingABC

import numpy as np
import numpy.typing as npt

from cpcoord.errors import (
    CpcoordError,
    NoSuchProcess,
    ProcessExited,
    RegionMismatch,
    RestoreRefused,
    RestoreUndoFailed,
)
from cpcoord.ranges import PAGE_SIZE
from nodeagent.proc.freeze import FrozenProcess, frozen
from nodeagent.proc.pagemap import PagemapReader, taken_in
from nodeagent.proc.procfs import Mapping, ProcessIdentity, read_maps
from nodeagent.proc.registers import (
    ThreadStates,
    check_threads,
    restore_thread_state,
    save_thread_state,
)
from nodeagent.proc.staging import Staging
from nodeagent.proc.writer import WritevFn, sys_writev
from nodeagent.restore import kernel_check
from nodeagent.restore.fit import check_layout, fit_region
from nodeagent.restore.layout import layout_applied
from nodeagent.restore.layout import plan as plan_layout
from nodeagent.restore.livebackup import LiveBackup
from nodeagent.restore.plan import build_plan
from nodeagent.restore.undo import Ahead, AllOrNothing
from nodeagent.restore.values import (
    Fitted,
    MemberLayout,
    RegionContents,
    RegionLayout,
    RestoreStats,
    contents_for,
    page_up,
)

__all__ = [
    "Fitted",
    "MemberLayout",
    "RegionContents",
    "RegionLayout",
    "RestoreStats",
    "ThreadStates",
    "check_fit",
    "restore_into",
    "restore_members",
    "restore_thread_state",
    "save_thread_state",
    "write",
]

log = logging.getLogger(__name__)
U64 = npt.NDArray[np.uint64]


# -- fit --------------------------------------------------------------------------------


def check_fit(fp: FrozenProcess, layout: MemberLayout, parked: tuple[int, int] = (0, 0)) -> Fitted:
    """Check that the frozen process can take the layout's regions back; write nothing.
    `parked`: [start, length) of the area a layout change parks mappings in (ignored)."""
    check_layout(layout)
    try:
        maps = tuple(read_maps(fp.pid))
    except NoSuchProcess:
        raise ProcessExited(fp.pid, "restore") from None
    if not layout.explicit:
        # Threads first: a process with other threads never takes its memory back, and
        # that is the reason to report even when its mappings changed as well.
        if layout.threads is None:
            raise RestoreRefused(
                layout.member,
                "it uses the whole-memory region set, which is restored only together with "
                "every thread's registers saved at the cut, and the generation has none",
            )
        check_threads(layout.member, fp, layout.threads)
    change = None
    if parked[1]:
        maps = tuple(m for m in maps if not parked[0] <= m.start < parked[0] + parked[1])
    seen = maps
    if not layout.explicit and layout.cut_maps:  # the layout goes back first (layout.py)
        change = plan_layout(layout.member, fp.pid, layout.cut_maps, maps)
        seen = change.expected
    starts = [m.start for m in seen]
    for r in layout.regions:
        fit_region(layout.member, r, seen, layout.explicit, starts)
    warnings: tuple[str, ...] = ()
    if not layout.explicit:  # last: memory that fits, with a kernel side that agrees
        v = kernel_check.check(layout.member, fp.pid, layout.kernel, layout.force)
        warnings = (*v.refusals, *v.warnings)  # refusals left only when forced
    change = None if change is None or change.empty else change
    return Fitted(fp, layout, maps, change, warnings)


# -- write ------------------------------------------------------------------------------


def _file_reader(pid: int) -> Callable[[Mapping, int, int], bytes | None]:
    """The file bytes behind a private file mapping of `pid` (through its map_files
    link, so a renamed or replaced path still reads the mapped file); zeros past the
    end of the file, as the mapping shows them; None when it cannot be read."""

    def read(m: Mapping, addr: int, n: int) -> bytes | None:
        path = f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                got = os.pread(fd, n, m.offset + (addr - m.start))
            finally:
                os.close(fd)
        except OSError as e:
            fields = {"pid": pid, "mapping": f"{m.start:x}-{m.end:x}", "error": e.strerror}
            log.warning("file of a mapping unreadable: zeros", extra={"fields": fields})
            return None
        return got + bytes(n - len(got))

    return read


def write(
    fitted: Fitted,
    contents: Iterable[RegionContents] | MappingABC[str, RegionContents],
    *,
    writev: WritevFn = sys_writev,
    staging: Staging | None = None,
    live: LiveBackup | None = None,
    ahead: Ahead | None = None,
) -> RestoreStats:
    """Write a fitted member's regions (and registers, default set), all or nothing.
    Call on the thread that froze it, before the thaw. Raises ContentsInvalid before
    writing anything; a failure part-way puts back every byte written (RestoreUndone;
    restore_undo.py). `staging`: a prefaulted buffer for the backup (else mapped here).
    `live`: what was backed up before the freeze, its stale pages marked
    (restore/livebackup.py); used only when no layout change comes first and the
    mappings it lay in are the same now. `ahead`: called on the backup thread with each
    step's pieces before they are written (restore_live.Unprotect)."""
    t0 = time.perf_counter()
    regions = contents_for(fitted.layout, contents)  # ContentsInvalid before any change
    if live is not None and (fitted.change is not None or not live.holds_with(fitted.maps)):
        fields = {"member": fitted.layout.member}
        log.info("live backup unused: the layout changed", extra={"fields": fields})
        live = None
    with layout_applied(fitted.fp, fitted.change, fitted.layout.member) as txn:
        area = txn.area if txn else (0, 0)
        return _write(fitted, regions, writev, staging, t0, area, live, ahead)


def _write(
    fitted: Fitted,
    regions: list[RegionContents],
    writev: WritevFn,
    staging: Staging | None,
    t0: float,
    parked: tuple[int, int],
    live: LiveBackup | None = None,
    ahead: Ahead | None = None,
) -> RestoreStats:
    fp, layout = fitted.fp, fitted.layout
    try:
        maps = tuple(read_maps(fp.pid))
    except NoSuchProcess:
        raise ProcessExited(fp.pid, "restore") from None
    if maps != fitted.maps:  # frozen: an exit, a stale Fitted, or the layout put back
        live = None
        fitted = check_fit(fp, layout, parked)
        if fitted.change is not None:
            left = fitted.change.summary()
            why = f"its layout is not as at the cut after putting it back ({left})"
            raise RestoreRefused(layout.member, why)
    order = sorted(range(len(regions)), key=lambda i: regions[i].start)
    ordered = [(regions[i], layout.regions[i].write_end) for i in order]
    with PagemapReader(fp.pid) as pm:
        plan = build_plan(
            ordered,
            maps,
            lambda lo, hi: taken_in(pm, lo, hi),
            layout.member,
            file_bytes=_file_reader(fp.pid),
        )
    # Registers as they are now, to put back if setting the cut's fails half-way.
    whole = not layout.explicit and layout.threads is not None
    before = save_thread_state(fp) if whole else None
    threads = 0
    with AllOrNothing(
        fp.pid, layout.member, plan, maps, writev=writev, staging=staging, live=live, ahead=ahead
    ) as tx:
        got = tx.write()
        if whole:
            assert layout.threads is not None and before is not None
            try:
                threads = restore_thread_state(fp, layout.threads, layout.member)
            except ProcessExited:
                raise
            except CpcoordError as e:
                _put_back_registers(fp, before, layout.member, e)
                tx.undo(e)
    stats = got.stats
    result = RestoreStats(
        member=layout.member,
        pid=fp.pid,
        regions=len(regions),
        data_pages=sum(int(c.pages.size) for c in regions),
        zero_bytes=plan.zero_bytes,
        bytes_written=plan.total_bytes,
        writev_calls=stats.writev_calls,
        mem_bytes=stats.mem_bytes,
        threads=threads,
        seconds=time.perf_counter() - t0,
        backup_bytes=got.backed_up,
        backup_fresh_bytes=got.fresh,
        backup_live_bytes=got.live,
    )
    log.info(
        "restored",
        extra={
            "fields": {
                "member": result.member,
                "pid": result.pid,
                "regions": result.regions,
                "bytes": result.bytes_written,
                "zero_bytes": result.zero_bytes,
                "mem_bytes": result.mem_bytes,
                "backup_bytes": result.backup_bytes,
                "backup_fresh_bytes": result.backup_fresh_bytes,
                "backup_live_bytes": result.backup_live_bytes,
                "threads": threads,
                "ms": round(result.seconds * 1e3, 3),
            }
        },
    )
    return result


def _put_back_registers(
    fp: FrozenProcess, before: ThreadStates, member: str, cause: CpcoordError
) -> None:
    try:
        restore_thread_state(fp, before, member, exact=True)
    except ProcessExited:
        raise
    except CpcoordError as e:
        raise RestoreUndoFailed(member, str(cause), f"registers: {e}") from cause


def restore_members(
    members: Sequence[tuple[FrozenProcess, MemberLayout, Iterable[RegionContents]]],
) -> list[RestoreStats]:
    """Check every member, then write every member: one misfit writes nothing anywhere."""
    fitted = [check_fit(fp, layout) for fp, layout, _ in members]
    return [write(f, c) for f, (_, _, c) in zip(fitted, members, strict=True)]


def restore_into(
    target: int | ProcessIdentity,
    regions_now: MappingABC[str, tuple[int, int]],
    contents: Iterable[RegionContents] | MappingABC[str, RegionContents],
    *,
    member: str = "",
    fp: FrozenProcess | None = None,
    freeze_timeout: float = 5.0,
) -> RestoreStats:
    """Write the named regions into a (new) process at the addresses they have now.

    `regions_now[name] = (address, size)`: page-aligned address, `size` bytes with
    `page_up(size)` equal to the region's size at the cut. Every name must be in
    `contents`; regions of `contents` not named are not written. Freezes the process for
    the write unless `fp` (already frozen by this thread) is given.
    """
    ident = target if isinstance(target, ProcessIdentity) else ProcessIdentity.of(target)
    name = member or str(ident.pid)
    items = contents.values() if isinstance(contents, MappingABC) else contents
    by_name = {c.name: c for c in items}
    layouts: list[RegionLayout] = []
    moved: list[RegionContents] = []
    for rname, (addr, size) in regions_now.items():
        c = by_name.get(rname)
        if c is None:
            raise RegionMismatch(name, rname, "is not in the generation")
        if addr % PAGE_SIZE:
            raise RegionMismatch(name, rname, f"starts at 0x{addr:x} now: not page-aligned")
        if size <= 0 or page_up(size) != c.size:
            raise RegionMismatch(name, rname, f"is {size} bytes now, {c.size} at the cut")
        layouts.append(RegionLayout(rname, addr, addr + c.size, None if size == c.size else size))
        moved.append(c.relocated(addr))
    layout = MemberLayout(name, tuple(layouts), explicit=True)
    if fp is not None:
        return write(check_fit(fp, layout), moved)
    with frozen(ident, freeze_timeout) as held:
        return write(check_fit(held, layout), moved)
