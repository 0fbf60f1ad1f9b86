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

Plans are built with NumPy over runs, never per page; writes go through nodeagent.writer.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from cpcoord.errors import (
    ContentsInvalid,
    CpcoordError,
    NoSuchProcess,
    ProcessExited,
    RegionMismatch,
    RestoreRefused,
    RestoreUndoFailed,
)
from cpcoord.mapfacts import MapFact
from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE
from nodeagent.capture import CapturedRegion
from nodeagent.freeze import FrozenProcess, frozen
from nodeagent.pagemap import PagemapReader, taken_in
from nodeagent.procfs import Mapping, ProcessIdentity, read_maps
from nodeagent.registers import (
    ThreadStateHooks,
    ThreadStates,
    check_threads,
    restore_thread_state,
    save_thread_state,
)
from nodeagent.restore_fit import check_layout, fit_region
from nodeagent.restore_plan import build_plan
from nodeagent.restore_undo import AllOrNothing
from nodeagent.staging import Staging
from nodeagent.writer import WritevFn, sys_writev

__all__ = [
    "Fitted",
    "MemberLayout",
    "RegionContents",
    "RegionLayout",
    "RestoreStats",
    "ThreadStateHooks",
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
    set) every thread's registers saved at the cut."""

    member: str
    regions: tuple[RegionLayout, ...]
    explicit: bool = True
    threads: ThreadStates | None = None


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


@dataclass(frozen=True)
class Fitted:
    """A member that passed the fit check: write() it while it stays frozen."""

    fp: FrozenProcess
    layout: MemberLayout
    maps: tuple[Mapping, ...]


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


# -- fit --------------------------------------------------------------------------------


def check_fit(fp: FrozenProcess, layout: MemberLayout) -> Fitted:
    """Check that the frozen process can take the layout's regions back; write nothing."""
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
    starts = [m.start for m in maps]
    for r in layout.regions:
        fit_region(layout.member, r, maps, layout.explicit, starts)
    return Fitted(fp, layout, maps)


# -- write ------------------------------------------------------------------------------


def _contents_for(
    layout: MemberLayout, contents: Iterable[RegionContents] | MappingABC[str, RegionContents]
) -> list[RegionContents]:
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
) -> RestoreStats:
    """Write a fitted member's regions (and registers, default set), all or nothing.
    Call on the thread that froze it, before the thaw. Raises ContentsInvalid before
    writing anything; a failure part-way puts back every byte written (RestoreUndone;
    restore_undo.py). `staging`: a prefaulted buffer for the backup (else mapped here)."""
    t0 = time.perf_counter()
    fp, layout = fitted.fp, fitted.layout
    regions = _contents_for(layout, contents)
    try:
        maps = tuple(read_maps(fp.pid))
    except NoSuchProcess:
        raise ProcessExited(fp.pid, "restore") from None
    if maps != fitted.maps:  # frozen, so only an exit or a stale Fitted gets here
        fitted = check_fit(fp, layout)
        maps = fitted.maps
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
    with AllOrNothing(fp.pid, layout.member, plan, maps, writev=writev, staging=staging) as tx:
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
