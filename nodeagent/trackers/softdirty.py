"""The soft-dirty tracker: `clear_refs` 4 to arm, pagemap bit 55 to collect.

Owns: arming (write "4" to /proc/PID/clear_refs), collecting (pagemap words of the
mappings read in a few large preads into NumPy, changed = soft-dirty and present or
swapped, all vectorised), re-arming in the same frozen window, and the kernel self-test
(`availability`) that proves bit 55 really follows writes here.

Kernel behaviour the changed set inherits (Documentation/admin-guide/mm/soft-dirty.rst,
pinned by tests/kernel/guest/):
- Precise per page for pages of VMAs that existed at the last clear: a page not written
  since is not reported, a written one always is (also after swap-out: the swap entry
  keeps the bit).
- A VMA created after the clear, or one that grew or merged with a new neighbour (mmap
  next to it, brk growth, mremap), carries VM_SOFTDIRTY: every present page of it is
  reported. A superset, never a miss.
- A write into a transparent huge page marks the whole huge page (512 pages on x86-64).
- clear_refs acts on the whole process, not on the given mappings: anything else using
  soft-dirty on the same process (CRIU, a second agent) loses its state, and we lose ours
  to it. One soft-dirty user per process.
- Pages that vanish (munmap, MADV_DONTNEED) are simply not present: the capture layer
  compares page sets and records them as gone.
"""

from __future__ import annotations

import ctypes
import errno
import gzip
import logging
import mmap
import os
import time
from collections.abc import Sequence
from functools import cache

import numpy as np
import numpy.typing as npt

from cpcoord.errors import (
    PermissionDenied,
    ProcessExited,
    TrackerFailed,
    TrackerUnavailable,
)
from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE
from nodeagent.pages import PageNumbers, empty_pages
from nodeagent.proc.freeze import FrozenProcess
from nodeagent.proc.pagemap import (
    CHUNK_PAGES,
    GAP_PAGES,
    PM_SOFT_DIRTY,
    PagemapReader,
    taken_mask,
)
from nodeagent.proc.procfs import Mapping, ProcessIdentity, open_proc
from nodeagent.trackers.base import Availability, ChangedSet

log = logging.getLogger(__name__)

NAME = "soft-dirty"
CLEAR_SOFT_DIRTY = b"4"


# -- pure, vectorised ---------------------------------------------------------------


def soft_dirty_mask(words: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
    """Changed pages among pagemap words: bit 55 set and the page present or swapped.

    Holes of a VM_SOFTDIRTY VMA report bit 55 without a page; they hold nothing to copy.
    """
    return ((words & PM_SOFT_DIRTY) != 0) & taken_mask(words)


def segments(mappings: Sequence[Mapping]) -> tuple[PageNumbers, PageNumbers]:
    """Sorted, disjoint page segments `[lo, hi)` covering the mappings (adjacent or
    overlapping ones merged), as two uint64 arrays."""
    if not mappings:
        return empty_pages(), empty_pages()
    lo = np.fromiter((m.start for m in mappings), dtype=np.uint64, count=len(mappings))
    hi = np.fromiter((m.end for m in mappings), dtype=np.uint64, count=len(mappings))
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order] >> np.uint64(PAGE_SHIFT), hi[order] >> np.uint64(PAGE_SHIFT)
    # Running maximum of the ends: a segment starts where its start exceeds every end
    # before it.
    reach = np.maximum.accumulate(hi)
    starts = np.concatenate(([True], lo[1:] > reach[:-1]))
    first = np.flatnonzero(starts)
    last = np.concatenate((first[1:], [lo.size])) - 1
    return lo[first], reach[last]


def windows(
    lo: PageNumbers, hi: PageNumbers, gap: int = GAP_PAGES
) -> tuple[PageNumbers, PageNumbers]:
    """Merge segments closer than `gap` pages into read windows: reading the gap's words
    costs less than another system call."""
    if lo.size == 0:
        return lo, hi
    brk = np.flatnonzero(lo[1:] - hi[:-1] > np.uint64(gap)) + 1
    return lo[np.concatenate(([0], brk))], hi[np.concatenate((brk - 1, [lo.size - 1]))]


def inside(pages: PageNumbers, lo: PageNumbers, hi: PageNumbers) -> PageNumbers:
    """The pages (sorted) that fall inside one of the segments `[lo[i], hi[i])`."""
    if pages.size == 0 or lo.size == 0:
        return empty_pages()
    k = np.searchsorted(lo, pages, side="right").astype(np.int64) - 1
    ok = k >= 0
    ok[ok] = pages[ok] < hi[k[ok]]
    return pages[ok]


# -- the kernel interface ------------------------------------------------------------


def clear_refs(pid: int) -> None:
    """Write "4" to /proc/PID/clear_refs: clear every soft-dirty bit of the process."""
    fd = open_proc(pid, "clear_refs", os.O_WRONLY, "clear soft-dirty bits of")
    try:
        os.write(fd, CLEAR_SOFT_DIRTY)
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise ProcessExited(pid, "soft-dirty clear_refs") from None
        if e.errno == errno.EINVAL:
            raise TrackerUnavailable(NAME, f"clear_refs refuses '4': {e.strerror}") from None
        raise TrackerFailed(NAME, pid, f"clear_refs: {e.strerror}") from None
    finally:
        os.close(fd)


def read_soft_dirty(pm: PagemapReader, lo: PageNumbers, hi: PageNumbers) -> PageNumbers:
    """Soft-dirty, present-or-swapped pages inside the segments `[lo, hi)`, sorted.

    One pread per window of nearby segments (at most CHUNK_PAGES words each); pages of
    the gaps between segments are masked out afterwards with one searchsorted.
    """
    wlo, whi = windows(lo, hi)
    parts: list[PageNumbers] = []
    for a, b in zip(wlo.tolist(), whi.tolist(), strict=True):
        for first in range(a, b, CHUNK_PAGES):
            n = min(CHUNK_PAGES, b - first)
            idx = np.flatnonzero(soft_dirty_mask(pm.words(first, n)))
            if idx.size:
                parts.append(idx.astype(np.uint64) + np.uint64(first))
    if not parts:
        return empty_pages()
    pages = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return pages if wlo.size == lo.size else inside(pages, lo, hi)


class SoftDirtyTracker:
    """One member's soft-dirty tracker. The record of writes lives in the target's page
    tables; the state here is which process is armed and an open pagemap reader whose
    word buffer, once grown and touched, is reused by every later collect (so a collect
    takes no first-touch faults of ours while the target is frozen)."""

    name = NAME

    def __init__(self) -> None:
        self._ident: ProcessIdentity | None = None
        self._pm: PagemapReader | None = None
        self.last_seconds = 0.0

    @property
    def armed(self) -> ProcessIdentity | None:
        return self._ident

    def adopt(self, ident: ProcessIdentity) -> None:
        """Go on tracking a process armed by an earlier agent process (a chain's saved
        state): the record of writes is in its page tables, so the process is all of it."""
        self._ident = ident

    def arm(
        self, fp: FrozenProcess, mappings: Sequence[Mapping], maps: Sequence[Mapping] | None = None
    ) -> None:
        avail = availability()
        if not avail.available:
            raise TrackerUnavailable(NAME, avail.reason)
        t0 = time.perf_counter()
        self.forget(None)
        pm = PagemapReader(fp.pid)
        try:
            clear_refs(fp.pid)
        except BaseException:
            pm.close()
            raise
        self._ident, self._pm = fp.ident, pm
        self.last_seconds = time.perf_counter() - t0
        log.info(
            "soft-dirty armed",
            extra={"fields": {"pid": fp.pid, "mappings": len(mappings)}},
        )

    def collect(
        self, fp: FrozenProcess, mappings: Sequence[Mapping], maps: Sequence[Mapping] | None = None
    ) -> ChangedSet:
        if self._ident != fp.ident or self._pm is None:
            why = "not armed" if self._ident is None else f"armed on pid {self._ident.pid}"
            raise TrackerFailed(NAME, fp.pid, why)
        t0 = time.perf_counter()
        lo, hi = segments(mappings)
        pages = read_soft_dirty(self._pm, lo, hi)
        # Re-arm while still frozen: no write can fall between the read and the clear.
        clear_refs(fp.pid)
        self.last_seconds = time.perf_counter() - t0
        log.info(
            "soft-dirty collected",
            extra={
                "fields": {
                    "pid": fp.pid,
                    "mappings": len(mappings),
                    "pages": int((hi - lo).sum()) if lo.size else 0,
                    "changed": int(pages.size),
                    "ms": round(self.last_seconds * 1e3, 3),
                }
            },
        )
        return ChangedSet(pages)

    def forget(self, fp: FrozenProcess | None) -> None:
        # Nothing lives in the target for us; its soft-dirty bits are harmless.
        if self._pm is not None:
            self._pm.close()
        self._ident, self._pm = None, None


# -- kernel self-test ----------------------------------------------------------------


def _config_hint() -> str:
    """What the running kernel's config says about CONFIG_MEM_SOFT_DIRTY, if readable."""
    release = os.uname().release
    sources = (("/proc/config.gz", True), (f"/boot/config-{release}", False))
    for path, gz in sources:
        try:
            with open(path, "rb") as f:
                raw = gzip.decompress(f.read()) if gz else f.read()
        except (OSError, EOFError):
            continue
        text = raw.decode(errors="replace")
        if "CONFIG_MEM_SOFT_DIRTY=y" in text:
            return f"CONFIG_MEM_SOFT_DIRTY=y in {path}"
        if "CONFIG_HAVE_ARCH_SOFT_DIRTY=y" not in text:
            return f"the architecture has no soft-dirty support ({path})"
        return f"CONFIG_MEM_SOFT_DIRTY is not set in {path}"
    return "kernel config not readable"


def self_test() -> str:
    """Write two pages of our own, clear, write one again: expect bit 55 on that one only.
    Returns "" on success, else what went wrong."""
    buf = mmap.mmap(-1, 2 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        buf[0:1] = buf[PAGE_SIZE : PAGE_SIZE + 1] = b"\1"
        first = addr >> PAGE_SHIFT
        with PagemapReader(os.getpid()) as pm:
            clear_refs(os.getpid())
            before = pm.words(first, 2).copy()
            buf[PAGE_SIZE : PAGE_SIZE + 1] = b"\2"
            after = pm.words(first, 2).copy()
    finally:
        buf.close()
    sd = np.uint64(PM_SOFT_DIRTY)
    if (before & sd).any():
        return "pagemap bit 55 stays set after clear_refs 4"
    if not after[1] & sd:
        return "a write after clear_refs 4 does not set pagemap bit 55"
    if after[0] & sd:
        return "pagemap bit 55 set on a page that was not written"
    return ""


@cache
def availability() -> Availability:
    """Whether soft-dirty tracking works on this kernel (cached: the kernel won't change)."""
    for f in ("clear_refs", "pagemap"):
        if not os.path.exists(f"/proc/self/{f}"):
            return Availability(NAME, False, f"/proc/self/{f} does not exist")
    try:
        why = self_test()
    except TrackerUnavailable as e:
        return Availability(NAME, False, str(e.args[1]))
    except (OSError, PermissionDenied, TrackerFailed) as e:
        return Availability(NAME, False, f"self-test failed: {e}")
    if why:
        return Availability(NAME, False, f"{why} ({_config_hint()})")
    return Availability(NAME, True, "clear_refs 4 clears and a write sets pagemap bit 55")
