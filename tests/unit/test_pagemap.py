"""Pure logic of nodeagent.proc.pagemap: the selection mask, runs, and windowed selection.

The windowed reader is checked against a fake pagemap (an array of words indexed by page
number) and a naive per-page reference, over random segment layouts.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.pages import pages_from_runs, runs_from_list, runs_from_pages, runs_to_list
from nodeagent.proc import pagemap as pm
from nodeagent.proc.pagemap import (
    PM_EXCLUSIVE,
    PM_FILE_SHARED,
    PM_GUARD_REGION,
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PM_SWAPPED,
    PM_UFFD_WP,
    clip_regions,
    taken_in,
    taken_mask,
)

sorted_pages = st.lists(st.integers(0, 5000), max_size=300, unique=True).map(
    lambda xs: np.array(sorted(xs), dtype=np.uint64)
)


def test_taken_mask_follows_the_seed_rule() -> None:
    words = np.array(
        [
            0,  # not present, not swapped
            PM_PRESENT | np.uint64(1234),
            PM_SWAPPED,
            PM_PRESENT | PM_SOFT_DIRTY | PM_EXCLUSIVE,
            PM_FILE_SHARED,  # page-cache flag alone: not mapped here
            PM_UFFD_WP,  # write-protect marker without a page
            PM_SWAPPED | PM_GUARD_REGION,  # MADV_GUARD_INSTALL marker
            PM_SWAPPED | PM_UFFD_WP | np.uint64(0x3F),  # uffd-wp PTE marker (type 31)
            PM_SWAPPED | PM_UFFD_WP | np.uint64(0x20),  # swapped to device 0, write-protected
            PM_SWAPPED | np.uint64(0x1D | 0x400),  # migration entry (type 29): a real page
            PM_PRESENT | np.uint64(0x1F),  # present; the PFN's low bits mean nothing here
        ],
        dtype=np.uint64,
    )
    assert taken_mask(words).tolist() == [
        *(False, True, True, True, False, False, False),
        *(False, True, True, True),
    ]


@given(sorted_pages)
def test_runs_roundtrip(pages: np.ndarray) -> None:
    runs = runs_from_pages(pages)
    assert runs.shape[1] == 2
    assert np.array_equal(pages_from_runs(runs), pages)
    if runs.shape[0]:
        assert np.all(runs[:, 1] >= 1)
        # maximal: consecutive runs never touch
        assert np.all(runs[1:, 0] > runs[:-1, 0] + runs[:-1, 1])
    assert np.array_equal(runs_from_list(runs_to_list(runs)), runs)


def test_runs_examples() -> None:
    assert runs_to_list(runs_from_pages(np.array([3, 4, 5, 9, 11, 12], dtype=np.uint64))) == [
        [3, 3],
        [9, 1],
        [11, 2],
    ]
    assert runs_to_list(runs_from_pages(np.zeros(0, dtype=np.uint64))) == []
    assert pages_from_runs(np.array([[7, 2], [20, 1]], dtype=np.uint64)).tolist() == [7, 8, 20]


@pytest.mark.parametrize(
    "bad",
    [
        "x",
        [[1]],
        [[1, 2, 3]],
        [[0, 0]],
        [[-1, 2]],
        [[0, 2], [1, 1]],  # overlap
        [[5, 1], [0, 1]],  # unsorted
        [[0.5, 1]],
        [[0, 1], [2]],
    ],
)
def test_runs_from_list_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        runs_from_list(bad)


class FakePagemap:
    """Words by page number; counts reads so the windowing is visible."""

    def __init__(self, words: np.ndarray) -> None:
        self.w = words
        self.reads = 0

    def taken_pages(self, first: int, last: int) -> np.ndarray:
        self.reads += 1
        idx = np.flatnonzero(taken_mask(self.w[first:last]))
        return idx.astype(np.uint64) + np.uint64(first)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = 40000
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    words = np.where(rng.random(n) < 0.5, PM_PRESENT, np.uint64(0)).astype(np.uint64)
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=0, max_size=30, unique=True)))
    cuts = cuts[: len(cuts) // 2 * 2]
    lo = np.array(cuts[0::2], dtype=np.uint64)
    hi = np.array(cuts[1::2], dtype=np.uint64)
    keep = hi > lo
    return words, lo[keep], hi[keep]


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_taken_in_equals_per_page_reference(
    layout: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    words, lo, hi = layout
    fake = FakePagemap(words)
    got = taken_in(fake, lo, hi)  # type: ignore[arg-type]
    inside = np.zeros(words.size, dtype=bool)
    for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
        inside[a:b] = True
    want = np.flatnonzero(inside & taken_mask(words)).astype(np.uint64)
    assert np.array_equal(got, want)
    assert fake.reads <= max(1, lo.size)


def test_taken_in_merges_close_segments_into_one_read() -> None:
    words = np.full(10000, PM_PRESENT, dtype=np.uint64)
    lo = np.array([0, 100, 200], dtype=np.uint64)
    hi = np.array([50, 150, 250], dtype=np.uint64)
    fake = FakePagemap(words)
    got = taken_in(fake, lo, hi)  # type: ignore[arg-type]
    assert fake.reads == 1
    assert got.size == 150 and got[50] == 100
    far = np.array([0, pm.GAP_PAGES + 1000], dtype=np.uint64)
    fake2 = FakePagemap(np.full(2 * pm.GAP_PAGES + 2000, PM_PRESENT, dtype=np.uint64))
    taken_in(fake2, far, far + np.uint64(10))  # type: ignore[arg-type]
    assert fake2.reads == 2


@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(1, 6)), max_size=12),
    st.lists(st.tuples(st.integers(0, 6), st.integers(1, 6)), max_size=12),
)
def test_clip_regions_equals_the_naive_intersection(
    regs: list[tuple[int, int]], segs: list[tuple[int, int]]
) -> None:
    """Scan regions cut back to the segments a window was walked for: exactly the pieces
    that lie in both, each keeping its region's categories."""

    def lay(items: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out, pos = [], 0
        for gap, size in items:
            pos += gap
            out.append((pos, pos + size))
            pos += size
        return out

    r, s = lay(regs), lay(segs)
    arr = np.array([[a, b, i] for i, (a, b) in enumerate(r)], dtype=np.uint64).reshape(-1, 3)
    lo = np.array([a for a, _ in s], dtype=np.uint64)
    hi = np.array([b for _, b in s], dtype=np.uint64)
    got = clip_regions(arr, lo, hi).tolist()
    want = [
        [max(a, c), min(b, d), i]
        for i, (a, b) in enumerate(r)
        for c, d in s
        if max(a, c) < min(b, d)
    ]
    assert got == want
