"""The soft-dirty tracker's vectorised page logic, against brute force over fake pagemaps.

The kernel side (clear_refs, real bit 55) is tested in a qemu guest: tests/kernel/."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpcoord.ranges import PAGE_SHIFT
from nodeagent.proc.pagemap import PM_GUARD_REGION, PM_PRESENT, PM_SOFT_DIRTY, PM_SWAPPED
from nodeagent.proc.procfs import Mapping
from nodeagent.trackers import softdirty

SD, PRESENT, SWAPPED, GUARD = (
    int(x) for x in (PM_SOFT_DIRTY, PM_PRESENT, PM_SWAPPED, PM_GUARD_REGION)
)


def mapping(first: int, last: int) -> Mapping:
    return Mapping(first << PAGE_SHIFT, last << PAGE_SHIFT, "rw-p", 0, "00:00", 0, "")


class FakePagemap:
    """Pagemap words of pages [0, n) from an array; counts reads like preadv calls."""

    def __init__(self, words: npt.NDArray[np.uint64]) -> None:
        self.all = words
        self.reads: list[tuple[int, int]] = []

    def words(self, first: int, n: int) -> npt.NDArray[np.uint64]:
        self.reads.append((first, n))
        return self.all[first : first + n]


def test_mask_needs_soft_dirty_and_a_page() -> None:
    words = np.array(
        [SD | PRESENT, SD | SWAPPED, SD, PRESENT, SWAPPED, 0, SD | SWAPPED | GUARD],
        dtype=np.uint64,
    )
    assert softdirty.soft_dirty_mask(words).tolist() == [1, 1, 0, 0, 0, 0, 0]


def test_segments_sort_and_merge() -> None:
    maps = [mapping(50, 60), mapping(10, 20), mapping(20, 30), mapping(25, 28), mapping(40, 45)]
    lo, hi = softdirty.segments(maps)
    assert lo.tolist() == [10, 40, 50] and hi.tolist() == [30, 45, 60]
    assert softdirty.segments([])[0].size == 0


def test_windows_merge_close_segments_only() -> None:
    lo = np.array([0, 10, 5000, 5003], dtype=np.uint64)
    hi = np.array([5, 20, 5001, 5010], dtype=np.uint64)
    wlo, whi = softdirty.windows(lo, hi, gap=100)
    assert wlo.tolist() == [0, 5000] and whi.tolist() == [20, 5010]


def test_inside_keeps_pages_of_segments() -> None:
    lo = np.array([10, 30], dtype=np.uint64)
    hi = np.array([20, 31], dtype=np.uint64)
    pages = np.array([0, 9, 10, 19, 20, 29, 30, 31, 99], dtype=np.uint64)
    assert softdirty.inside(pages, lo, hi).tolist() == [10, 19, 30]


@settings(max_examples=200, deadline=None)
@given(
    spans=st.lists(st.tuples(st.integers(0, 9000), st.integers(1, 700)), max_size=12),
    seed=st.integers(0, 2**32 - 1),
    chunk=st.sampled_from([3, 64, 1 << 20]),
)
def test_read_matches_brute_force(spans: list[tuple[int, int]], seed: int, chunk: int) -> None:
    n = 10_000
    rng = np.random.default_rng(seed)
    flags = np.array([0, SD, PRESENT, SD | PRESENT, SD | SWAPPED, SWAPPED], dtype=np.uint64)
    words = flags[rng.integers(0, flags.size, n)]
    maps = [mapping(a, min(a + k, n)) for a, k in spans]
    pm = FakePagemap(words)
    lo, hi = softdirty.segments(maps)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(softdirty, "CHUNK_PAGES", chunk)
        got = softdirty.read_soft_dirty(pm, lo, hi)  # type: ignore[arg-type]
    inside = np.zeros(n, dtype=bool)
    for m in maps:
        inside[m.start >> PAGE_SHIFT : m.end >> PAGE_SHIFT] = True
    want = np.flatnonzero(inside & softdirty.soft_dirty_mask(words))
    assert got.dtype == np.uint64
    assert got.tolist() == want.tolist()
    # Few reads: one per window (per chunk), never one per page or per mapping.
    if chunk == 1 << 20:
        assert len(pm.reads) <= max(1, len(maps))


def test_collect_refuses_when_not_armed() -> None:
    from cpcoord.errors import TrackerFailed
    from nodeagent.proc.freeze import FrozenProcess
    from nodeagent.proc.procfs import ProcessIdentity

    t = softdirty.SoftDirtyTracker()
    fp = FrozenProcess(ProcessIdentity(1, 1))
    with pytest.raises(TrackerFailed, match="not armed"):
        t.collect(fp, [])
