"""What a restore in place must change in a whole-memory member's layout (pure logic).

Owns `plan_layout`: the member's mappings now against every mapping at the cut
(`MemberLayout.cut_maps`, ManifestMember.layout) give a `LayoutChange`, or a refusal
(RestoreRefused) when the change cannot be made and undone (docs/decisions.md, "Restore"):
- bytes mapped now and not at the cut, or mapped now with another backing (anonymous,
  another file or offset, private <-> shared): *parked* (moved away whole with mremap,
  so an undo moves them back with their pages; the commit unmaps them);
- bytes mapped at the cut and not now (or parked): *re-created* at the same address.
  Private anonymous memory with mmap (its pages then read as zeros; the generation's
  pages of it are written afterwards); a file mapping only from the same file, unchanged
  (device, inode, size, mtime as recorded at the cut); anything else is refused: shared
  anonymous memory, memfd, SysV shm and deleted files (their object is gone or shared),
  readable but not writable private anonymous memory (its bytes were never captured),
  kernel mappings ([vdso], [vvar], ...);
- the heap: brk is set back to the end of the [heap] mapping at the cut (the start brk
  when there was none); heap bytes above it now are parked first, bytes below it that
  are gone come back through brk;
- the same backing with other permissions: mprotect back;
- a [stack] grown below its start at the cut is left as it is: those bytes lie below the
  stack pointer of every register set at the cut, the kernel would grow the stack into
  them again, and nothing of the cut is lost by keeping them.
Linear in the number of mappings; unchanged maps (the usual case) cost one comparison a line.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cpcoord.errors import RestoreRefused
from cpcoord.mapfacts import MapFact, fact_of
from nodeagent.proc.procfs import Mapping

KERNEL_MAPPINGS = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]", "[sigpage]")
# a file mapping of the cut -> why it cannot be re-mapped from its file ("": it can)
FileCheck = Callable[[MapFact], str]


@dataclass(frozen=True)
class Reprotect:
    start: int
    end: int
    cut: str  # perms at the cut ("r--p")
    now: str  # perms now, for the undo


@dataclass(frozen=True)
class LayoutChange:
    """What to do, in this order: park, brk, create, protect (layout.py)."""

    park: tuple[tuple[int, int], ...] = ()  # [start, end), each inside one mapping now
    brk_to: int | None = None  # set brk to this (None: leave it)
    create: tuple[MapFact, ...] = ()  # the cut's facts (clipped) to map again
    protect: tuple[Reprotect, ...] = ()
    expected: tuple[Mapping, ...] = field(default=(), compare=False)  # the maps afterwards

    @property
    def empty(self) -> bool:
        return not (self.park or self.create or self.protect) and self.brk_to is None

    def summary(self) -> str:
        return (
            f"{len(self.park)} parked, {len(self.create)} re-created, "
            f"{len(self.protect)} re-protected, brk {'kept' if self.brk_to is None else 'set'}"
        )


def _same_backing(c: MapFact, n: MapFact) -> bool:
    if c.shared != n.shared:
        return False
    if c.anonymous or n.anonymous:
        return c.anonymous and n.anonymous
    return (c.dev, c.inode, c.offset) == (n.dev, n.inode, n.offset)


def _kernel(path: str) -> bool:
    return path in KERNEL_MAPPINGS


def _unchanged(cut: Sequence[MapFact], now: Sequence[Mapping]) -> bool:
    if len(cut) != len(now):
        return False
    return all(
        (c.start, c.end, c.perms, c.dev, c.inode, c.offset)
        == (m.start, m.end, m.perms, m.dev, m.inode, m.offset)
        for c, m in zip(cut, now, strict=True)
    )


def _heap_end(maps: Sequence[MapFact] | Sequence[Mapping]) -> int | None:
    ends = [m.end for m in maps if m.path == "[heap]"]
    return max(ends) if ends else None


def _why_not_create(f: MapFact, files: FileCheck) -> str:
    """Why the cut's mapping `f` cannot be mapped again ("" : it can)."""
    if _kernel(f.path):
        return f"the kernel mapping {f.path} moved"
    if f.anonymous:
        if f.shared:
            return "shared anonymous memory cannot be re-created in place"
        if f.perms[0] == "r" and f.perms[1] != "w":
            return "read-only anonymous memory was not captured, its bytes are unknown"
        return ""
    if f.path.startswith(("/memfd:", "/SYSV", "/dev/zero")) or f.path.endswith(" (deleted)"):
        return f"its object ({f.path or 'unnamed'}) cannot be opened again"
    if not f.path.startswith("/"):
        return f"{f.backing()} cannot be re-created"
    return files(f)


def plan_layout(
    member: str,
    cut: Sequence[MapFact],
    now: Sequence[Mapping],
    start_brk: int,
    files: FileCheck,
) -> LayoutChange:
    """The change that puts `now` back to `cut` (module docstring); RestoreRefused names
    the first mapping that cannot be put back, before anything is changed."""
    cut = [f for f in cut if f.end < 1 << 62]  # [vsyscall] is nobody's to change
    now = [m for m in now if m.end < 1 << 62]
    if _unchanged(cut, now):
        return LayoutChange(expected=tuple(now))
    cut_heap, now_heap = _heap_end(cut), _heap_end(now)
    brk_to = None if cut_heap == now_heap else (cut_heap if cut_heap is not None else start_brk)
    # Bytes brk itself brings back: [from, to) when brk grows.
    brk_lo = now_heap if now_heap is not None else start_brk
    grown = (brk_lo, cut_heap) if cut_heap is not None and cut_heap > brk_lo else (0, 0)
    cut_stack = next((f for f in cut if f.path == "[stack]"), None)

    park: list[tuple[int, int]] = []
    create: list[MapFact] = []
    protect: list[Reprotect] = []
    kept_stack: tuple[int, int] | None = None

    def refuse(why: str) -> RestoreRefused:
        return RestoreRefused(member, f"its memory layout changed since the cut: {why}")

    def add_park(a: int, b: int, m: Mapping) -> None:
        if _kernel(m.path):
            raise refuse(f"the kernel mapping {m.path} at 0x{m.start:x} is new")
        if park and park[-1][1] == a and _within(m, park[-1][0]):
            park[-1] = (park[-1][0], b)
        else:
            park.append((a, b))

    def add_create(f: MapFact) -> None:
        a, b = f.start, f.end
        lo, hi = max(a, grown[0]), min(b, grown[1])
        if f.path == "[heap]" and lo < hi:  # brk brings [lo, hi) back, rw-p
            if f.perms[:3] != "rw-":
                protect.append(Reprotect(lo, hi, f.perms, "rw-p"))
            for x, y in ((a, lo), (hi, b)):
                if x < y:
                    add_create(f.clipped(x, y))
            return
        if why := _why_not_create(f, files):
            raise refuse(
                f"0x{a:x}-0x{b:x} ({f.perms} {f.backing()}) was mapped at the cut "
                f"and is not now, and {why}"
            )
        create.append(f)

    edges = {x for f in cut for x in (f.start, f.end)} | {x for m in now for x in (m.start, m.end)}
    bounds = sorted(edges)
    i = j = 0
    for a, b in itertools.pairwise(bounds):
        while i < len(cut) and cut[i].end <= a:
            i += 1
        while j < len(now) and now[j].end <= a:
            j += 1
        c = cut[i] if i < len(cut) and cut[i].start <= a else None
        m = now[j] if j < len(now) and now[j].start <= a else None
        if c is None and m is None:
            continue
        if c is None:
            assert m is not None
            if (
                m.path == "[stack]"
                and cut_stack is not None
                and b <= cut_stack.start
                and m.end > cut_stack.start
            ):
                kept_stack = (m.start, cut_stack.start)  # grown since the cut: kept
                continue
            add_park(a, b, m)
            continue
        cf = c.clipped(a, b)
        if m is None:
            add_create(cf)
            continue
        nf = fact_of(m, a, b)
        if _same_backing(cf, nf):
            if cf.perms[:3] != nf.perms[:3]:
                if _kernel(m.path):
                    raise refuse(f"the kernel mapping {m.path} changed permissions")
                protect.append(Reprotect(a, b, cf.perms, nf.perms))
            continue
        add_park(a, b, m)
        add_create(cf)
    expected = _expected(cut, kept_stack)
    return LayoutChange(
        park=tuple(park),
        brk_to=brk_to,
        create=tuple(_merge(create)),
        protect=tuple(protect),
        expected=expected,
    )


def _within(m: Mapping, addr: int) -> bool:
    return m.start <= addr < m.end


def _merge(facts: list[MapFact]) -> list[MapFact]:
    """Adjacent pieces of one mapping of the cut (split by the sweep) as one."""
    out: list[MapFact] = []
    for f in facts:
        p = out[-1] if out else None
        if (
            p is not None
            and p.end == f.start
            and (p.perms, p.dev, p.inode, p.path) == (f.perms, f.dev, f.inode, f.path)
            and (p.anonymous or p.offset + (p.end - p.start) == f.offset)
        ):
            out[-1] = dataclasses.replace(p, end=f.end)
        else:
            out.append(f)
    return out


def _expected(cut: Sequence[MapFact], kept_stack: tuple[int, int] | None) -> tuple[Mapping, ...]:
    """The maps as the fit check should see them after the change."""
    out = []
    for f in cut:
        start = f.start
        if kept_stack is not None and f.path == "[stack]" and f.start == kept_stack[1]:
            start = kept_stack[0]
        out.append(Mapping(start, f.end, f.perms, f.offset, f.dev, f.inode, f.path))
    return tuple(out)
