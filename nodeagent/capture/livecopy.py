"""A member's pages copied live into staging, for pre-copy (precopy.py drives the
passes): which staging row holds which page and whether its copy is still current
(`LiveCopy`), the cut's frozen copy and the reordering after the thaw (`Plan`), and what
pre-copy did (`Pass`, `Report`). Everything here that runs frozen is vectorised and
searches only the few changed pages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from cpcoord.ranges import PAGE_SIZE
from nodeagent.pages import PageNumbers, empty_pages
from nodeagent.proc.reader import MemoryReader, ReadvFn
from nodeagent.proc.staging import Staging

CHUNK_PAGES = 16384  # a live copy checks its deadline every 64 MiB


@dataclass(frozen=True)
class Pass:
    """One live pass: pages copied while the member ran, how long that took, and the
    short freeze before it (pass 1: the arm; later passes: the collect)."""

    pages: int
    seconds: float
    pause_seconds: float

    @property
    def nbytes(self) -> int:
        return self.pages * PAGE_SIZE


@dataclass(frozen=True)
class Report:
    """What pre-copy did for one capture (for --json, metrics, progress)."""

    passes: tuple[Pass, ...] = ()
    frozen_pages: int = 0  # read in the cut's freeze
    reused_pages: int = 0  # taken at the cut from a live copy
    fallback: str = ""  # why the cut copied everything after all ("" when it did not)
    reordered: bool = False  # rows were moved after the thaw (pages appeared/vanished)

    @property
    def rounds(self) -> int:
        return len(self.passes)

    def as_json(self) -> dict[str, object]:
        return {
            "rounds": self.rounds,
            "passes": [
                {
                    "pages": p.pages,
                    "bytes": p.nbytes,
                    "seconds": round(p.seconds, 6),
                    "pause_seconds": round(p.pause_seconds, 6),
                }
                for p in self.passes
            ],
            "live_bytes": sum(p.nbytes for p in self.passes),
            "frozen_pages": self.frozen_pages,
            "frozen_bytes": self.frozen_pages * PAGE_SIZE,
            "reused_pages": self.reused_pages,
            "fallback": self.fallback,
            "reordered": self.reordered,
        }


@dataclass(frozen=True)
class Plan:
    """The cut's frozen copy: read `read` (sorted) into staging rows `read_rows`; then,
    after the thaw, `settle` puts the cut's pages at rows 0..n-1 in order."""

    read: PageNumbers
    read_rows: npt.NDArray[np.uint64]
    final_rows: npt.NDArray[np.uint64]  # per page of the cut, where its bytes are now
    staging: Staging = field(repr=False)

    @property
    def in_order(self) -> bool:
        # Every row, not only the ends: a page that vanished and one that appeared can
        # leave the first and last rows in place with others moved (hypothesis found it).
        # One vectorised compare, after the thaw.
        n = self.final_rows.size
        return bool(np.array_equal(self.final_rows, np.arange(n, dtype=np.uint64)))

    def settle(self) -> None:
        """Move the rows into the order of the cut's pages (after the thaw: local memory
        only). The common case, no page appeared or vanished, moves nothing."""
        if self.in_order:
            return
        n = int(self.final_rows.size)
        span = int(self.final_rows.max()) + 1
        rows = self.staging.pages(0, max(span, n))
        tmp = rows[self.final_rows.astype(np.intp)]
        rows[:n] = tmp


class LiveCopy:
    """A member's pages copied live into `staging`: `pages` (sorted) at rows `rows`;
    `ok` says whose copy is current as far as the tracker has reported (precopy.py)."""

    def __init__(self, staging: Staging) -> None:
        self.staging = staging
        self.pages: PageNumbers = empty_pages()
        self.rows: npt.NDArray[np.uint64] = np.zeros(0, np.uint64)
        self.ok: npt.NDArray[np.bool_] = np.zeros(0, np.bool_)
        self.used = 0  # rows handed out
        self.passes: list[Pass] = []
        self.copied_bytes = 0

    @property
    def capacity(self) -> int:
        return self.staging.capacity // PAGE_SIZE

    def valid(self) -> PageNumbers:
        return self.pages[self.ok]

    def stale(self, pages: PageNumbers) -> None:
        """These pages' copies are out of date (written since)."""
        if pages.size and self.pages.size:
            i = np.searchsorted(self.pages, pages)
            i[i == self.pages.size] = 0
            hit = self.pages[i] == pages
            self.ok[i[hit]] = False

    def rows_for(self, pages: PageNumbers, *, grow: bool) -> npt.NDArray[np.uint64] | None:
        """Rows of the sorted `pages`; new ones get the next free rows when `grow`
        (None when they would not fit in staging)."""
        return self._locate(pages, grow)[0]

    def _locate(
        self, pages: PageNumbers, grow: bool
    ) -> tuple[npt.NDArray[np.uint64] | None, npt.NDArray[np.intp] | None]:
        """(rows of `pages`, their indices in `self.pages` after any growth, None when
        `pages` equals `self.pages`). The common case, the same pages as the last pass,
        is one comparison: this runs in the frozen window."""
        if pages.size == self.pages.size and np.array_equal(pages, self.pages):
            return self.rows, None
        if self.pages.size:
            i = np.searchsorted(self.pages, pages)
            i[i == self.pages.size] = 0
            known = self.pages[i] == pages
        else:
            i = np.zeros(pages.size, np.intp)
            known = np.zeros(pages.size, np.bool_)
        out = np.empty(pages.size, np.uint64)
        out[known] = self.rows[i[known]]
        new = pages[~known]
        if new.size:
            if not grow or self.used + new.size > self.capacity:
                return None, None
            nr = np.arange(self.used, self.used + new.size, dtype=np.uint64)
            self.used += int(new.size)
            out[~known] = nr
            allp = np.concatenate([self.pages, new])
            order = np.argsort(allp, kind="stable")
            self.pages = allp[order]
            self.rows = np.concatenate([self.rows, nr])[order]
            self.ok = np.concatenate([self.ok, np.zeros(new.size, np.bool_)])[order]
            i = np.searchsorted(self.pages, pages)
        return out, i

    def copy(self, pid: int, pages: PageNumbers, readv: ReadvFn, deadline: float | None) -> int:
        """Copy `pages` (sorted) live into their rows, in chunks until `deadline`; return
        how many were copied. Pages not copied stay stale; unreadable ones too."""
        rows = self.rows_for(pages, grow=True)
        if rows is None:
            return 0
        done = 0
        reader = MemoryReader(pid, readv)
        try:
            for a in range(0, int(pages.size), CHUNK_PAGES):
                if deadline is not None and time.monotonic() >= deadline:
                    break
                p, r = pages[a : a + CHUNK_PAGES], rows[a : a + CHUNK_PAGES]
                stats = reader.read_pages(p, self.staging.rewrite(), r)
                good = p if not stats.unreadable.size else np.setdiff1d(p, stats.unreadable)
                i = np.searchsorted(self.pages, good)
                self.ok[i] = True
                done += int(p.size)
        finally:
            reader.close()
        self.copied_bytes += done * PAGE_SIZE
        return done

    def plan(self, taken: PageNumbers, changed: PageNumbers) -> Plan | None:
        """The cut's frozen copy (precopy.py's header, step 4): `taken`, the cut's pages
        (sorted); `changed`, the tracker's changes since the last collect (sorted).
        None when the pages new since the live passes do not fit in staging. Runs
        frozen: only the few changed pages are searched for, never all against all."""
        rows, i = self._locate(taken, grow=True)
        if rows is None:
            return None
        good = self.ok.copy() if i is None else self.ok[i]
        if changed.size and taken.size:
            j = np.searchsorted(taken, changed)
            inside = j < taken.size
            j, c = j[inside], changed[inside]
            good[j[taken[j] == c]] = False
        need = ~good
        return Plan(taken[need], rows[need], rows, self.staging)

    def report(self, plan: Plan | None, fallback: str = "") -> Report:
        frozen_pages = int(plan.read.size) if plan is not None else 0
        reused = int(plan.final_rows.size) - frozen_pages if plan is not None else 0
        moved = plan is not None and not plan.in_order
        return Report(tuple(self.passes), frozen_pages, reused, fallback, moved)
