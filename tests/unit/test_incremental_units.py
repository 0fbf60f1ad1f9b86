"""Pure logic of incremental captures: the set arithmetic of nodeagent.capture.incremental
(against naive Python sets), and the pending-set rules of TrackedCapture driven through
fake hooks calls (no process)."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cpcoord.ranges import AddressRange
from nodeagent.capture.captured import concat_parts
from nodeagent.capture.changeset import (
    mark_appeared,
    mark_pages,
    mark_runs,
    pick,
    ranges_runs,
)
from nodeagent.capture.regions import RegionSpec, new_or_changed_runs
from nodeagent.capture.trackstate import tracked_mappings
from nodeagent.proc.procfs import Mapping

page_sets = st.lists(st.integers(0, 3000), max_size=200, unique=True).map(
    lambda xs: np.array(sorted(xs), dtype=np.uint64)
)
runs_lists = st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 300)), max_size=12)


@settings(max_examples=200, deadline=None)
@given(page_sets, page_sets)
def test_mark_pages_is_membership(taken: np.ndarray, pages: np.ndarray) -> None:
    mask = np.zeros(taken.size, dtype=bool)
    n = mark_pages(taken, pages, mask)
    want = [p in set(pages.tolist()) for p in taken.tolist()]
    assert mask.tolist() == want and n == sum(want)


@settings(max_examples=200, deadline=None)
@given(page_sets, runs_lists)
def test_mark_runs_is_inside_any_run(taken: np.ndarray, runs: list[tuple[int, int]]) -> None:
    mask = np.zeros(taken.size, dtype=bool)
    arr = np.array(runs, dtype=np.uint64).reshape(-1, 2)
    n = mark_runs(taken, arr, mask)
    want = [any(a <= p < a + c for a, c in runs) for p in taken.tolist()]
    assert mask.tolist() == want and n == sum(want)


@settings(max_examples=200, deadline=None)
@given(page_sets, page_sets)
def test_mark_appeared_is_difference(taken: np.ndarray, previous: np.ndarray) -> None:
    mask = np.zeros(taken.size, dtype=bool)
    n = mark_appeared(taken, previous, mask)
    want = [p not in set(previous.tolist()) for p in taken.tolist()]
    assert mask.tolist() == want and n == sum(want)
    same = np.zeros(taken.size, dtype=bool)
    assert mark_appeared(taken, taken.copy(), same) == 0 and not same.any()


def test_marks_accumulate() -> None:
    taken = np.arange(10, 20, dtype=np.uint64)
    mask = np.zeros(taken.size, dtype=bool)
    mark_pages(taken, np.array([11, 30], dtype=np.uint64), mask)
    mark_runs(taken, np.array([[15, 2]], dtype=np.uint64), mask)
    assert np.flatnonzero(mask).tolist() == [1, 5, 6]


def test_ranges_runs_cover_whole_pages() -> None:
    r = ranges_runs([AddressRange(0x5000, 0x7000), AddressRange(0x1000, 0x1800)])
    assert r.tolist() == [[1, 1], [5, 2]]


def _m(start: int, end: int, perms: str = "rw-p", path: str = "") -> Mapping:
    return Mapping(start, end, perms, 0, "00:00", 0, path)


def test_tracked_mappings_overlap_regions() -> None:
    maps = [
        _m(0x1000, 0x3000),
        _m(0x3000, 0x4000, "r--p"),
        _m(0x8000, 0x9000),
        _m(0xA000, 0xB000, "---p"),
    ]
    specs = [RegionSpec("x", 0x2000, 0x3800), RegionSpec("y", 0xA000, 0xB000)]
    assert [m.start for m in tracked_mappings(specs, maps)] == [0x1000, 0x3000]


def test_mapping_changes_count_as_changed() -> None:
    armed = [_m(0x1000, 0x3000), _m(0x5000, 0x6000), _m(0x8000, 0x9000, "rw-p", "[heap]")]
    now = [
        _m(0x1000, 0x3000),  # unchanged
        _m(0x5000, 0x6000, "r--p"),  # mprotect'ed
        _m(0x8000, 0xA000, "rw-p", "[heap]"),  # grown: only the tail
        _m(0xC000, 0xD000),  # new
    ]
    runs = new_or_changed_runs(armed, now).tolist()
    assert runs == [[5, 1], [9, 1], [12, 1]]


@settings(max_examples=100, deadline=None)
@given(page_sets, page_sets, st.lists(st.integers(0, 3000), max_size=6))
def test_pick_and_concat_of_region_slices(
    taken: np.ndarray, changed: np.ndarray, cuts: list[int]
) -> None:
    """changeset.pick = per-region membership; captured.concat_parts of select_pages-like
    slices (consecutive views of one array) is that array, without a copy."""
    bounds = sorted({0, taken.size, *(min(c, taken.size) for c in cuts)})
    parts = [taken[a:b] for a, b in itertools.pairwise(bounds)]
    got = pick(parts, concat_parts(parts), changed)[0]
    assert [g.tolist() for g in got] == [
        [p for p in part.tolist() if p in set(changed.tolist())] for part in parts
    ]
    whole = concat_parts(parts)
    assert whole.dtype == np.uint64 and whole.tolist() == taken.tolist()
    if len([p for p in parts if p.size]) > 1:
        assert whole.base is not None  # a view, not a copy
    other = np.array([7], dtype=np.uint64)
    assert concat_parts([*parts, other]).tolist() == [*taken.tolist(), 7]
