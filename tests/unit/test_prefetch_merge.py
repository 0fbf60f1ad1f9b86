"""Merging a region's prefetched pages with pages fetched later, frozen
(nodeagent/daemon/prefetch.py `merge`): sorted, the first copy of a page kept, and
either side may hold no page at all (a region the generation has nothing of; pages
written since that the generation does not list). Both empty raised IndexError in the
agent (a rollback of tests/helpers/c/layout_mprotect.c failed with it, now and then)."""

from __future__ import annotations

import numpy as np

from cpcoord.ranges import PAGE_SIZE
from nodeagent.daemon.prefetch import merge
from nodeagent.restore.values import RegionContents


def _rc(pages: list[int], fill: int) -> RegionContents:
    p = np.array(pages, dtype=np.uint64)
    data = np.zeros((p.size, PAGE_SIZE), dtype=np.uint8)
    data[:, 0] = fill
    data[:, 1] = p.astype(np.uint8)
    return RegionContents("r", 0x10000, 0x10000 + 64 * PAGE_SIZE, p, data)


def test_pages_sorted_and_the_first_copy_kept() -> None:
    got = merge(_rc([1, 5, 9], 1), _rc([0, 5, 12], 2))
    assert got.pages.tolist() == [0, 1, 5, 9, 12]
    assert got.data[:, 0].tolist() == [2, 1, 1, 1, 2]
    assert got.data[:, 1].tolist() == [0, 1, 5, 9, 12]


def test_either_or_both_sides_empty() -> None:
    both = merge(_rc([], 1), _rc([], 2))
    assert both.pages.size == 0 and both.data.shape == (0, PAGE_SIZE)
    left = merge(_rc([], 1), _rc([3], 2))
    assert left.pages.tolist() == [3] and left.data[0, 0] == 2
    right = merge(_rc([4], 1), _rc([], 2))
    assert right.pages.tolist() == [4] and right.data[0, 0] == 1
