"""The pre-copy plan's bookkeeping (nodeagent/capture/precopy.py), no process involved:
rows handed out to pages across live passes, which pages the cut must read frozen, and
the rows put in the cut's order after the thaw.

Each staging row is filled with its page's number (a live copy) or with the page number
plus a marker (a frozen read); after `settle`, row i must hold page taken[i]'s bytes, from
the frozen read exactly when the plan said so.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cpcoord.ranges import PAGE_SIZE
from nodeagent.capture.livecopy import LiveCopy
from nodeagent.proc.staging import Staging

FROZEN = 1 << 40


def _pages(draw: st.DrawFn, universe: int = 300) -> np.ndarray:
    xs = draw(st.sets(st.integers(0, universe), max_size=120))
    return np.array(sorted(xs), dtype=np.uint64)


def _fill(live: LiveCopy, pages: np.ndarray, rows: np.ndarray, marker: int = 0) -> None:
    words = live.staging.pages(0, live.capacity).view(np.uint64)
    words[rows.astype(np.intp), 0] = pages + np.uint64(marker)


@st.composite
def scenario(draw: st.DrawFn) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    passes = [_pages(draw) for _ in range(draw(st.integers(1, 4)))]
    stale = [_pages(draw) for _ in passes]
    return passes, stale, _pages(draw), _pages(draw)


@settings(max_examples=200, deadline=None)
@given(scenario())
def test_the_cut_reads_exactly_what_has_no_current_copy(
    sc: tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray],
) -> None:
    passes, stales, taken, changed = sc
    changed = np.intersect1d(changed, taken)
    staging = Staging()
    staging.reserve(2048 * PAGE_SIZE)
    live = LiveCopy(staging)
    for copied, stale in zip(passes, stales, strict=True):
        live.stale(stale)
        rows = live.rows_for(copied, grow=True)
        assert rows is not None
        _fill(live, copied, rows)
        live.ok[np.searchsorted(live.pages, copied)] = True
        # Rows are never shared between pages.
        assert np.unique(live.rows).size == live.rows.size == live.used
    current = live.valid()
    plan = live.plan(taken, changed)
    assert plan is not None
    want_read = np.union1d(changed, np.setdiff1d(taken, current))
    assert np.array_equal(plan.read, want_read)
    _fill(live, plan.read, plan.read_rows, FROZEN)
    plan.settle()
    got = staging.pages(0, max(1, int(taken.size))).view(np.uint64)[: taken.size, 0]
    fresh = np.isin(taken, want_read)
    want = taken + np.where(fresh, np.uint64(FROZEN), np.uint64(0))
    assert np.array_equal(got, want)
    staging.close()


def test_nothing_moves_when_no_page_appeared() -> None:
    staging = Staging()
    staging.reserve(64 * PAGE_SIZE)
    live = LiveCopy(staging)
    taken = np.arange(10, 30, dtype=np.uint64)
    live.rows_for(taken, grow=True)
    plan = live.plan(taken[2:], np.zeros(0, np.uint64))  # some vanished at the end...
    assert plan is not None and not plan.in_order  # ...the rows shift
    plan = live.plan(taken, taken[3:5])
    assert plan is not None and plan.in_order
    assert plan.read.tolist() == list(range(10, 30))  # nothing was copied live yet
    staging.close()


def test_pages_past_the_staging_make_no_plan() -> None:
    staging = Staging()
    staging.reserve(PAGE_SIZE)
    live = LiveCopy(staging)
    too_many = np.arange(live.capacity + 1, dtype=np.uint64)
    assert live.rows_for(too_many, grow=True) is None
    assert live.plan(too_many, np.zeros(0, np.uint64)) is None
    assert live.used == 0
    staging.close()
