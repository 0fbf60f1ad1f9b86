"""Bulk reads of /proc/PID/pagemap and the vectorised page arithmetic built on them.

Owns: the pagemap bit layout, reading pagemap words for a page range in large `preadv`
calls straight into a reusable NumPy uint64 buffer, the seed's "present or swapped" mask,
the same selection through the `PAGEMAP_SCAN` ioctl (Linux >= 6.7: the kernel returns
runs of present/swapped pages instead of a word per page, ~20x cheaper on big resident
mappings). Page numbers and runs, and the conversions between them, are in `pages`.

Every function works on whole arrays: a Python loop per page is a bug here
(DESIGN.md, Trackers).
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from cpcoord.closing import Closing
from cpcoord.errors import PermissionDenied, ProcessExited, ReadFailed
from cpcoord.ranges import PAGE_SHIFT
from nodeagent.pages import PageNumbers, empty_pages, pages_of_ranges
from nodeagent.proc.procfs import open_proc

if TYPE_CHECKING:
    from nodeagent.proc.uffd import PagemapScanner


# Bits of a pagemap word (Documentation/admin-guide/mm/pagemap.rst).
PM_PRESENT = np.uint64(1 << 63)
PM_SWAPPED = np.uint64(1 << 62)
PM_FILE_SHARED = np.uint64(1 << 61)
PM_GUARD_REGION = np.uint64(1 << 58)  # MADV_GUARD_INSTALL marker (Linux >= 6.15)
PM_UFFD_WP = np.uint64(1 << 57)
PM_EXCLUSIVE = np.uint64(1 << 56)
PM_SOFT_DIRTY = np.uint64(1 << 55)
PM_TAKEN = PM_PRESENT | PM_SWAPPED
# A swapped word's low bits are swap type | offset << 5, shown only with CAP_SYS_ADMIN.
# Type 31 (the last of 1 << MAX_SWAPFILES_SHIFT) is SWP_PTE_MARKER: a PTE marker (uffd-wp
# on a never-touched page, guard, poison) that holds no data. Without the capability the
# bits are 0 and a marker looks like swap: it is then read (as zeros), still correct.
SWP_TYPE_MASK = np.uint64(0x1F)
SWP_PTE_MARKER = np.uint64(0x1F)

WORD = 8
# Pages read per preadv: 1 Mi pages = 8 MiB of words = 4 GiB of address space. Bounds the
# buffer for huge sparse mappings while keeping the syscall count tiny for real ones.
CHUNK_PAGES = 1 << 20
# Segments closer than this are read in one window; reading the gap's words costs less
# than another syscall (4096 pages of gap = 32 KiB of words).
GAP_PAGES = 4096
# Pages asked for by number (words_of) closer than this share one read.
WORD_GAP = 512
# Segments closer than this are walked by one PAGEMAP_SCAN and the runs it returns cut
# back to the segments: walking what lies between (holes, guard pages, at most 64 MiB of
# other mappings' page tables) costs less than a system call per segment, and a process
# with 20 000 small mappings is then one walk, not 20 000.
SCAN_GAP_PAGES = 16384


class PagemapReader(Closing):
    """An open /proc/PID/pagemap with a reusable word buffer (prefaulted on first use)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = open_proc(pid, "pagemap", os.O_RDONLY, "read pagemap of")
        self._buf = np.empty(0, dtype=np.uint64)
        self._scanner: PagemapScanner | None = None
        self._scan_ok = True  # until the kernel refuses PAGEMAP_SCAN

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._scanner is not None:
            self._scanner.close()
            self._scanner = None

    def _buffer(self, npages: int) -> npt.NDArray[np.uint64]:
        if self._buf.size < npages:
            self._buf = np.empty(max(npages, min(CHUNK_PAGES, 1 << 16)), dtype=np.uint64)
            self._buf.fill(0)  # touch it now, not while the target is frozen
        return self._buf[:npages]

    def words(self, first_page: int, npages: int) -> npt.NDArray[np.uint64]:
        """Pagemap words of pages `[first_page, first_page + npages)`, npages <= CHUNK_PAGES.

        The returned array is a view of the reader's buffer, valid until the next call.
        """
        out = self._buffer(npages)
        view = out.data.cast("B")
        want = npages * WORD
        done = 0
        while done < want:
            try:
                got = os.preadv(self._fd, [view[done:]], first_page * WORD + done)
            except OSError as e:
                if e.errno == errno.ESRCH:
                    raise ProcessExited(self.pid, "capture") from None
                if e.errno in (errno.EPERM, errno.EACCES):
                    raise PermissionDenied("read pagemap of", self.pid, e.strerror) from None
                raise ReadFailed(self.pid, f"pagemap page 0x{first_page:x}", e.strerror) from None
            if got == 0:
                # The kernel returns 0 once the mm is gone: the process exited.
                raise ProcessExited(self.pid, "capture")
            done += got
        return out

    def words_of(self, pages: PageNumbers) -> npt.NDArray[np.uint64]:
        """Pagemap words of sorted, unique page numbers (a new array), for a cost that
        follows the pages asked for: pages closer than WORD_GAP share one preadv (at most
        CHUNK_PAGES words), the words of the gaps are read and dropped."""
        out = np.empty(pages.size, dtype=np.uint64)
        if pages.size == 0:
            return out
        brk = np.flatnonzero(np.diff(pages) > np.uint64(WORD_GAP)) + 1
        firsts = np.concatenate(([0], brk)).tolist()
        lasts = np.concatenate((brk, [pages.size])).tolist()
        for i, j in zip(firsts, lasts, strict=True):
            while i < j:  # one window, in reads of at most CHUNK_PAGES words
                first = int(pages[i])
                k = i + int(np.searchsorted(pages[i:j], np.uint64(first + CHUNK_PAGES)))
                w = self.words(first, int(pages[k - 1]) - first + 1)
                out[i:k] = w[(pages[i:k] - np.uint64(first)).astype(np.intp)]
                i = k
        return out

    def taken(self, start: int, end: int) -> PageNumbers:
        """Page numbers in `[start, end)` (page-aligned addresses) that are present or
        swapped, sorted."""
        return self.taken_pages(start >> PAGE_SHIFT, end >> PAGE_SHIFT)

    def taken_pages(self, first: int, last: int) -> PageNumbers:
        """Present-or-swapped page numbers in pages `[first, last)`, sorted."""
        parts: list[PageNumbers] = []
        for lo in range(first, last, CHUNK_PAGES):
            n = min(CHUNK_PAGES, last - lo)
            w = self.words(lo, n)
            idx = np.flatnonzero(taken_mask(w))
            if idx.size:
                parts.append(idx.astype(np.uint64) + np.uint64(lo))
        if not parts:
            return empty_pages()
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def scanned_pages(
        self,
        first: int,
        last: int,
        seg_lo: PageNumbers | None = None,
        seg_hi: PageNumbers | None = None,
    ) -> PageNumbers | None:
        """`taken_pages` through PAGEMAP_SCAN: the kernel hands back runs of present or
        swapped pages, so resident memory costs a page-table walk, not a word per page.
        None when this kernel lacks the ioctl (the caller reads words instead). With
        `seg_lo`/`seg_hi` (sorted, disjoint page segments inside `[first, last)`) only
        the pages inside them are returned: the runs are cut before they are expanded.

        Swapped runs are checked against their pagemap words: PTE markers (guard pages,
        uffd-wp markers on never-touched pages) are reported as swapped by the scan too,
        and only the words tell them apart (taken_mask). VM_PFNMAP mappings are skipped
        by the scan: callers must not use it for them (regions.scan_safe).
        """
        if not self._scan_ok:
            return None
        from nodeagent.proc import uffd  # lazily: uffd pulls in the tracker modules

        if self._scanner is None:
            self._scanner = uffd.PagemapScanner(self.pid, vec_len=1 << 12)
        sc = self._scanner
        sc.reset()
        try:
            regs = sc.scan(
                first << PAGE_SHIFT,
                last << PAGE_SHIFT,
                anyof=uffd.PAGE_TAKEN,
                returns=uffd.PAGE_TAKEN,
            )
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                self._scan_ok = False
                return None
            if e.errno in (errno.EPERM, errno.EACCES):
                raise PermissionDenied("scan pagemap of", self.pid, e.strerror) from None
            raise ReadFailed(self.pid, f"PAGEMAP_SCAN 0x{first:x}", e.strerror) from None
        if seg_lo is not None and seg_hi is not None:
            regs = clip_regions(
                regs, seg_lo << np.uint64(PAGE_SHIFT), seg_hi << np.uint64(PAGE_SHIFT)
            )
        if regs.shape[0] == 0:
            return empty_pages()
        swapped = (regs[:, 2] & np.uint64(uffd.PAGE_IS_SWAPPED)) != 0
        if not swapped.any():
            return pages_of_ranges(regs[:, 0], regs[:, 1])
        # Rare (swap, guard pages, markers): decide swapped runs on their words.
        present = regs[~swapped]
        parts = [pages_of_ranges(present[:, 0], present[:, 1])]
        for lo, hi in (regs[swapped, :2] >> np.uint64(PAGE_SHIFT)).tolist():
            parts.append(self.taken_pages(lo, hi))
        out = np.concatenate(parts)
        out.sort()
        return out


def taken_in(
    pm: PagemapReader, lo: PageNumbers, hi: PageNumbers, *, scan: bool = False
) -> PageNumbers:
    """Present-or-swapped pages inside the sorted, disjoint segments `[lo[i], hi[i])`.

    Segments closer than GAP_PAGES are read as one window (one preadv instead of one per
    mapping: a process has hundreds of small mappings side by side); pages that fall in
    the gaps are then masked out with one searchsorted. With `scan`, PAGEMAP_SCAN is
    used where the kernel has it (only for segments of mappings the scan walks:
    regions.scan_safe), one call per run of touching segments: a call costs microseconds,
    while masking a window's pages costs a pass over all of them.
    """
    if lo.size == 0:
        return empty_pages()
    if scan:
        got = _scan_in(pm, lo, hi)
        if got is not None:
            return got
    brk = np.flatnonzero(lo[1:] - hi[:-1] > np.uint64(GAP_PAGES)) + 1
    wlo = lo[np.concatenate(([0], brk))]
    whi = hi[np.concatenate((brk - 1, [lo.size - 1]))]
    parts = [pm.taken_pages(a, b) for a, b in zip(wlo.tolist(), whi.tolist(), strict=True)]
    pages = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if len(parts) == lo.size:  # no window spans a gap: nothing to mask
        return pages
    k = np.searchsorted(lo, pages, side="right") - 1
    return pages[pages < hi[k]]


def _scan_in(pm: PagemapReader, lo: PageNumbers, hi: PageNumbers) -> PageNumbers | None:
    """taken_in through PAGEMAP_SCAN, or None where the kernel lacks it: one walk per
    window of segments closer than SCAN_GAP_PAGES, cut back to the segments."""
    brk = np.flatnonzero(lo[1:] - hi[:-1] > np.uint64(SCAN_GAP_PAGES)) + 1
    first = np.concatenate(([0], brk))
    last = np.concatenate((brk, [lo.size]))
    parts = []
    for i, j in zip(first.tolist(), last.tolist(), strict=True):
        touching = bool(np.all(lo[i + 1 : j] == hi[i : j - 1]))  # nothing to cut away
        sl, sh = (None, None) if touching else (lo[i:j], hi[i:j])
        got = pm.scanned_pages(int(lo[i]), int(hi[j - 1]), sl, sh)
        if got is None:
            return None
        parts.append(got)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def clip_regions(
    regs: npt.NDArray[np.uint64], seg_lo: npt.NDArray[np.uint64], seg_hi: npt.NDArray[np.uint64]
) -> npt.NDArray[np.uint64]:
    """PAGEMAP_SCAN regions `(n, 3)` [start, end, categories] cut to the segments
    `[seg_lo, seg_hi)` (bytes; both sorted and disjoint): every (region, segment)
    overlap, found with two binary searches and expanded at once."""
    if regs.shape[0] == 0 or seg_lo.size == 0:
        return np.zeros((0, 3), dtype=np.uint64)
    i0 = np.searchsorted(seg_hi, regs[:, 0], side="right")
    i1 = np.searchsorted(seg_lo, regs[:, 1], side="left")
    counts = np.maximum(i1.astype(np.int64) - i0.astype(np.int64), 0)
    total = int(counts.sum())
    out = np.empty((total, 3), dtype=np.uint64)
    if total == 0:
        return out
    ridx = np.repeat(np.arange(regs.shape[0]), counts)
    firsts = np.cumsum(counts) - counts
    sidx = i0[ridx] + (np.arange(total) - firsts[ridx])
    out[:, 0] = np.maximum(regs[ridx, 0], seg_lo[sidx])
    out[:, 1] = np.minimum(regs[ridx, 1], seg_hi[sidx])
    out[:, 2] = regs[ridx, 2]
    return out


def taken_mask(words: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
    """The seed's rule on pagemap words: present (bit 63) or swapped (bit 62).

    PTE markers are reported as swapped but hold nothing: guard pages of
    MADV_GUARD_INSTALL (also bit 58) and userfaultfd write-protect markers on pages never
    touched (uffd-wp with WP_UNPOPULATED). They are left out, recognised by bit 58 or by
    their swap type (SWP_PTE_MARKER) when the kernel shows it.
    """
    present = (words & PM_PRESENT) != 0
    swapped = (words & PM_SWAPPED) != 0
    marker = ((words & PM_GUARD_REGION) != 0) | ((words & SWP_TYPE_MASK) == SWP_PTE_MARKER)
    return present | (swapped & ~marker)
