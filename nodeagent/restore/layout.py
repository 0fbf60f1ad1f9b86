"""A whole-memory member's layout at the cut, and putting it back in a restore in place.

Owns:
- `cut_layout(pid, maps)`: every mapping at the cut as mapping facts, file mappings with
  the file's size and mtime (stat of the path through /proc/PID/root, kept only when it
  is still the mapped inode); recorded with each capture of a whole-memory member
  (ManifestMember.layout).
- `LayoutTxn`: makes the change `layout_plan.plan_layout` computed, in the frozen window
  before the page writes, through syscall injection (nodeagent/proc/inject.py, one session
  for all the calls): park (mremap into a reserved area, pages and all), brk, mmap
  (MAP_FIXED_NOREPLACE), mprotect. Every step is recorded; `undo()` takes them back in
  reverse (unmap what was mapped, brk back to its exact value read with brk(0), move the
  parked mappings back, protections back), `commit()` unmaps the parked area. A session
  never stays open across the page writes: the registers of the cut are set there, and
  an injection session would put its own thread's back.
- `layout_applied(fp, change, member)`: the context manager apply.write uses: apply, run
  the writes, commit; on a failure (a restore undone), undo the layout too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Sequence

from cpcoord.errors import (
    CpcoordError,
    InjectionFailed,
    NoSuchProcess,
    ProcessExited,
    RestoreRefused,
    RestoreUndoFailed,
)
from cpcoord.mapfacts import MapFact, fact_of
from cpcoord.ranges import PAGE_SIZE
from nodeagent.proc.freeze import FrozenProcess
from nodeagent.proc.inject import Injector
from nodeagent.proc.procfs import Mapping, read_maps
from nodeagent.restore.layout_plan import FileCheck, LayoutChange, plan_layout

log = logging.getLogger(__name__)

SYS_MMAP, SYS_MPROTECT, SYS_MUNMAP, SYS_BRK, SYS_MREMAP, SYS_CLOSE = 9, 10, 11, 12, 25, 3
SYS_OPENAT = 257
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 0x01, 0x02, 0x20, 0x4000
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
AT_FDCWD = -100
O_RDONLY, O_RDWR, O_CLOEXEC = 0, 2, 0o2000000
TOP = 0x7FFF_FFFF_F000  # the top of the x86-64 user address space (47 bits)


# -- at the cut ---------------------------------------------------------------------------


def _dev_of(st: os.stat_result) -> str:
    return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"


def _same_dev(a: str, b: str) -> bool:
    try:
        return tuple(int(x, 16) for x in a.split(":")) == tuple(int(x, 16) for x in b.split(":"))
    except ValueError:
        return False


def file_stat(pid: int, f: MapFact | Mapping) -> os.stat_result | None:
    """stat of the file a mapping names, as the process sees its path; None when that
    path no longer names the mapped inode (deleted, replaced, unreachable)."""
    if not f.path.startswith("/") or f.path.endswith(" (deleted)"):
        return None
    try:
        st = os.stat(f"/proc/{pid}/root{f.path}")
    except OSError:
        return None
    if st.st_ino != f.inode or not _same_dev(_dev_of(st), f.dev):
        return None
    return st


def cut_layout(pid: int, maps: Sequence[Mapping]) -> tuple[MapFact, ...]:
    """Every mapping of `maps` (the cut's) as a fact; file ones with size and mtime
    (one stat per file, not per mapping)."""
    stats: dict[tuple[str, int], os.stat_result | None] = {}
    out = []
    for m in maps:
        f = fact_of(m, m.start, m.end)
        if m.is_regular_file and not m.deleted:
            key = (m.dev, m.inode)
            if key not in stats:
                stats[key] = file_stat(pid, m)
            st = stats[key]
            if st is not None:
                f = dataclasses.replace(f, file_size=st.st_size, file_mtime_ns=st.st_mtime_ns)
        out.append(f)
    return tuple(out)


def file_check(pid: int) -> FileCheck:
    """The FileCheck of plan_layout for process `pid`: the file behind a cut's mapping
    is the same, unchanged (device, inode, size, mtime)."""

    def check(f: MapFact) -> str:
        if not f.file_mtime_ns:
            return f"the file {f.path} was not recorded at the cut (deleted or replaced then)"
        st = file_stat(pid, f)
        if st is None:
            return f"the file {f.path} is not the one mapped at the cut (deleted or replaced)"
        if (st.st_size, st.st_mtime_ns) != (f.file_size, f.file_mtime_ns):
            return (
                f"the file {f.path} changed since the cut (size {f.file_size} -> "
                f"{st.st_size}, mtime {f.file_mtime_ns} -> {st.st_mtime_ns})"
            )
        return ""

    return check


def start_brk(pid: int) -> int:
    """The start of the process's brk area (/proc/PID/stat field 47)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            rest = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessExited(pid, "restore") from None
    return int(rest[44])


def plan(member: str, pid: int, cut: Sequence[MapFact], now: Sequence[Mapping]) -> LayoutChange:
    """plan_layout for a live process (its start brk and files)."""
    check = file_check(pid)
    return plan_layout(member, cut, now, start_brk(pid), check)


# -- the change -----------------------------------------------------------------------------


def _page_up(n: int) -> int:
    return (n + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


def prot_of(perms: str) -> int:
    return (
        (PROT_READ if perms[0] == "r" else 0)
        | (PROT_WRITE if perms[1] == "w" else 0)
        | (PROT_EXEC if perms[2] == "x" else 0)
    )


def _free_gap(size: int, taken: Sequence[tuple[int, int]]) -> int:
    """The highest address where `size` bytes (and a guard page either side) are free
    of every range in `taken`."""
    spans = sorted(s for s in taken if s[0] < TOP)
    hi = TOP
    for a, b in reversed(spans):
        if hi - max(b, 1 << 32) >= size + 2 * PAGE_SIZE:
            return hi - PAGE_SIZE - size
        hi = min(hi, a)
    raise RestoreRefused("?", f"no {size} bytes of free address space to park mappings in")


class LayoutTxn:
    """One member's layout change (module docstring). `apply()`, then `commit()` or
    `undo(cause)`; each opens its own injection session."""

    def __init__(self, fp: FrozenProcess, change: LayoutChange, member: str) -> None:
        self.fp, self.change, self.member = fp, change, member
        self.done: list[tuple[str, tuple[int, ...]]] = []  # steps taken, for the undo
        self.area = (0, 0)
        self.calls = 0

    def _session(self) -> Injector:
        return Injector(self.fp)

    def apply(self) -> None:
        ch = self.change
        park_bytes = sum(b - a for a, b in ch.park)
        try:
            now = read_maps(self.fp.pid)
        except NoSuchProcess:
            raise ProcessExited(self.fp.pid, "restore") from None
        taken = [(m.start, m.end) for m in now] + [(m.start, m.end) for m in ch.expected]
        size = park_bytes + PAGE_SIZE  # a first page for the paths of files to open
        with self._session() as inj:
            try:
                self._apply(inj, ch, _free_gap(size, taken), size)
            finally:
                self.calls += inj.calls

    def _apply(self, inj: Injector, ch: LayoutChange, area: int, size: int) -> None:
        if any(a <= inj.site < b for a, b in ch.park):
            why = "the syscall site lies in a mapping to park"
            raise InjectionFailed(self.fp.pid, "layout", why)
        brk_now = inj.syscall(SYS_BRK, 0)
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE
        got = inj.check("mmap", SYS_MMAP, area, size, PROT_READ | PROT_WRITE, flags, -1, 0)
        if got != area:
            inj.syscall(SYS_MUNMAP, got, size)
            raise InjectionFailed(self.fp.pid, "mmap", f"area at 0x{got:x}, not 0x{area:x}")
        self.area = (area, size)
        at = area + PAGE_SIZE
        for a, b in ch.park:
            n = b - a
            got = inj.check("mremap", SYS_MREMAP, a, n, n, MREMAP_MAYMOVE | MREMAP_FIXED, at)
            self.done.append(("parked", (a, n, at)))
            at += n
        if ch.brk_to is not None:
            self._brk(inj, brk_now, ch.brk_to)
        for f in ch.create:
            self._create(inj, f, area)
        for p in ch.protect:
            inj.check("mprotect", SYS_MPROTECT, p.start, p.end - p.start, prot_of(p.cut))
            self.done.append(("protected", (p.start, p.end - p.start, prot_of(p.now))))

    def _brk(self, inj: Injector, now: int, to: int) -> None:
        """brk(to). Lowering it, the kernel unmaps [to, now) (page-aligned) and refuses
        when nothing is mapped there: the heap above `to` is parked, so a placeholder
        holds the place for brk to unmap."""
        lo, hi = _page_up(to), _page_up(now)
        hold = lo < hi
        if hold:
            flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE
            got = inj.check("mmap", SYS_MMAP, lo, hi - lo, 0, flags, -1, 0)
            if got != lo:
                inj.syscall(SYS_MUNMAP, got, hi - lo)
                raise InjectionFailed(self.fp.pid, "mmap", f"placeholder at 0x{got:x}")
        got = inj.syscall(SYS_BRK, to)
        if got != to:
            if hold:
                inj.syscall(SYS_MUNMAP, lo, hi - lo)
            raise InjectionFailed(self.fp.pid, "brk", f"brk is 0x{got:x}, not 0x{to:x}")
        self.done.append(("brk", (now,)))

    def _create(self, inj: Injector, f: MapFact, area: int) -> None:
        n = f.end - f.start
        prot = prot_of(f.perms)
        if f.anonymous:
            flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
            got = inj.check("mmap", SYS_MMAP, f.start, n, prot, flags, -1, 0)
        else:
            inj.write(area, f.path.encode() + b"\0")
            mode = O_RDWR if f.shared and "w" in f.perms else O_RDONLY
            fd = inj.check("openat", SYS_OPENAT, AT_FDCWD, area, mode | O_CLOEXEC, 0)
            try:
                flags = (MAP_SHARED if f.shared else MAP_PRIVATE) | MAP_FIXED_NOREPLACE
                got = inj.check("mmap", SYS_MMAP, f.start, n, prot, flags, fd, f.offset)
            finally:
                inj.syscall(SYS_CLOSE, fd)
        if got != f.start:
            inj.syscall(SYS_MUNMAP, got, n)
            raise InjectionFailed(self.fp.pid, "mmap", f"mapped at 0x{got:x}, not 0x{f.start:x}")
        self.done.append(("created", (f.start, n)))

    def commit(self) -> None:
        """Unmap the parked mappings (and the area); a failure only leaks the area."""
        if not self.area[1]:
            return
        try:
            with self._session() as inj:
                inj.check("munmap", SYS_MUNMAP, *self.area)
        except (CpcoordError, OSError) as e:
            fields = {"member": self.member, "pid": self.fp.pid, "error": str(e)}
            log.warning("parked mappings not unmapped", extra={"fields": fields})
        self.area = (0, 0)

    def undo(self, cause: CpcoordError) -> None:
        """Take every step back, newest first; RestoreUndoFailed when one cannot be."""
        if not self.done and not self.area[1]:
            return
        try:
            with self._session() as inj:
                for kind, args in reversed(self.done):
                    if kind == "protected":
                        inj.check("mprotect", SYS_MPROTECT, *args)
                    elif kind == "created":
                        inj.check("munmap", SYS_MUNMAP, *args)
                    elif kind == "brk":
                        got = inj.syscall(SYS_BRK, args[0])
                        if got != args[0]:
                            raise InjectionFailed(self.fp.pid, "brk", f"brk stays 0x{got:x}")
                    else:
                        a, n, at = args
                        flags = MREMAP_MAYMOVE | MREMAP_FIXED
                        inj.check("mremap", SYS_MREMAP, at, n, n, flags, a)
                self.done.clear()
                if self.area[1]:
                    inj.check("munmap", SYS_MUNMAP, *self.area)
                    self.area = (0, 0)
        except ProcessExited:
            raise
        except CpcoordError as e:
            fields = {"member": self.member, "pid": self.fp.pid, "error": str(e)}
            log.error("layout not put back", extra={"fields": fields})
            raise RestoreUndoFailed(self.member, str(cause), f"layout: {e}") from cause


@contextlib.contextmanager
def layout_applied(
    fp: FrozenProcess, change: LayoutChange | None, member: str
) -> Iterator[LayoutTxn | None]:
    """Apply `change` (None or empty: nothing), run the body, commit; a CpcoordError
    from the body (or from applying) takes the layout back before it goes on."""
    if change is None or change.empty:
        yield None
        return
    txn = LayoutTxn(fp, change, member)
    fields = {"member": member, "pid": fp.pid, "change": change.summary()}
    t0 = time.perf_counter()
    try:
        txn.apply()
    except ProcessExited:
        raise
    except CpcoordError as e:
        txn.undo(e)
        raise RestoreRefused(member, f"its memory layout could not be put back: {e}") from e
    ms = round((time.perf_counter() - t0) * 1e3, 3)
    log.info(
        "layout put back as at the cut", extra={"fields": {**fields, "calls": txn.calls, "ms": ms}}
    )
    try:
        yield txn
    except ProcessExited:
        raise
    except CpcoordError as e:
        txn.undo(e)
        raise
    txn.commit()
