"""The PAGEMAP_SCAN walks the uffd-wp tracker makes over its spans, in the agent.

Owns: one scan with its error mapped (UffdScanFailed), the cheap probe of whether every
VMA of a range is async-WP registered, the parts of spans that are not,
write-protecting every present or swapped page of spans, and the non-clearing peek at
the pages written since the last protect (`peek_written`: a restore's prefetch; the
protection stays as it is), and the collect's walk of the written pages (`written`).
Registration and the sequence of a collect are `uffdwp`'s business.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

import numpy as np

from cpcoord.errors import UffdScanFailed
from nodeagent.pages import PageNumbers, pages_of_ranges
from nodeagent.proc import uffd
from nodeagent.proc.procfs import Mapping
from nodeagent.trackers.uffd_spans import Spans, clip


def scan(scanner: uffd.PagemapScanner, start: int, end: int, **kw: int) -> uffd.Regions:
    try:
        return scanner.scan(start, end, **kw)
    except OSError as e:
        raise UffdScanFailed(scanner.pid, f"0x{start:x}-0x{end:x}", e.strerror) from None


def all_registered(scanner: uffd.PagemapScanner, start: int, end: int) -> bool:
    """One cheap walk: registered VMAs are skipped whole; EPERM names a VMA that is
    not async-WP registered (including PFN maps, which the scan never reports)."""
    try:
        scanner.scan(
            start,
            end,
            flags=uffd.PM_SCAN_CHECK_WPASYNC,
            mask=uffd.PAGE_IS_WPALLOWED,
            inverted=uffd.PAGE_IS_WPALLOWED,
            returns=uffd.PAGE_IS_WPALLOWED,
        )
    except OSError as e:
        if e.errno == errno.EPERM:
            return False
        raise UffdScanFailed(scanner.pid, f"0x{start:x}-0x{end:x}", e.strerror) from None
    return True


def unregistered(scanner: uffd.PagemapScanner, sp: Spans) -> list[tuple[int, int]]:
    """The parts of the spans whose VMAs are not async-WP registered (whole VMAs:
    the probe reports holes in them too)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sp.pairs():
        if all_registered(scanner, lo, hi):
            continue
        regs = scan(
            scanner,
            lo,
            hi,
            mask=uffd.PAGE_IS_WPALLOWED,
            inverted=uffd.PAGE_IS_WPALLOWED,
            returns=uffd.PAGE_IS_WPALLOWED,
        )
        out.extend(clip(regs[:, 0], regs[:, 1], lo, hi))
    return out


def peek_written(pid: int, ranges: Sequence[tuple[int, int]]) -> PageNumbers:
    """Present-or-swapped pages of `ranges` (sorted, disjoint) written since they were
    last protected, without protecting anything again (no PM_SCAN_WP_MATCHING). A page
    of a VMA that is not registered has no protection to lose: it reads as written."""
    sc = uffd.PagemapScanner(pid)
    try:
        for lo, hi in ranges:
            try:
                sc.scan(
                    lo,
                    hi,
                    mask=uffd.PAGE_IS_WRITTEN,
                    anyof=uffd.PAGE_TAKEN,
                    returns=uffd.PAGE_IS_WRITTEN | uffd.PAGE_TAKEN,
                )
            except OSError as e:
                raise UffdScanFailed(pid, f"0x{lo:x}-0x{hi:x}", e.strerror) from None
        regs = sc.buf[: sc.used]
        return pages_of_ranges(regs[:, 0], regs[:, 1])
    finally:
        sc.close()


def protect(scanner: uffd.PagemapScanner, sp: Spans) -> None:
    """Write-protect every present or swapped page of the spans."""
    flags = uffd.PM_SCAN_WP_MATCHING | uffd.PM_SCAN_CHECK_WPASYNC
    for lo, hi in sp.pairs():
        scan(scanner, lo, hi, flags=flags, anyof=uffd.PAGE_TAKEN, returns=uffd.PAGE_TAKEN)


def written(
    scanner: uffd.PagemapScanner, pairs: Sequence[tuple[int, int]], always: Sequence[Mapping]
) -> PageNumbers:
    """The pages written in the spans `pairs` since the last protect (protected again in
    the same walk), plus every present page of the `always` mappings (untracked, counted
    as changed); sorted. Every scan appends to the scanner's buffer (growing it keeps
    what is there): the changed regions are one slice of it, with no copy per span."""
    lo_row = scanner.used
    flags = uffd.PM_SCAN_WP_MATCHING | uffd.PM_SCAN_CHECK_WPASYNC
    for s, e in pairs:
        scan(
            scanner,
            s,
            e,
            flags=flags,
            mask=uffd.PAGE_IS_WRITTEN,
            anyof=uffd.PAGE_TAKEN,
            returns=uffd.PAGE_IS_WRITTEN | uffd.PAGE_TAKEN,
        )
    for m in always:
        scan(scanner, m.start, m.end, anyof=uffd.PAGE_TAKEN, returns=uffd.PAGE_TAKEN)
    regions = scanner.buf[lo_row : scanner.used]
    if always:  # they interleave with the spans
        regions = regions[np.argsort(regions[:, 0], kind="stable")]
    return pages_of_ranges(regions[:, 0], regions[:, 1])
