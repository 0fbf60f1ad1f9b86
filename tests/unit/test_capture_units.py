"""Pure pieces of the capture engine: zero-page detection and the staging buffer."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cpcoord.ranges import PAGE_SIZE
from nodeagent.capture import zero_rows
from nodeagent.reader import Staging


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 64),
    st.lists(st.tuples(st.integers(0, 63), st.integers(0, PAGE_SIZE - 1)), max_size=40),
)
def test_zero_rows_finds_exactly_the_zero_pages(n: int, pokes: list[tuple[int, int]]) -> None:
    data = np.zeros((n, PAGE_SIZE), dtype=np.uint8)
    for row, byte in pokes:
        if row < n:
            data[row, byte] = 1  # one non-zero byte anywhere, first and last words included
    want = ~data.any(axis=1)
    assert np.array_equal(zero_rows(data), want)


def test_zero_rows_with_many_candidates() -> None:
    # Every page starts and ends with zero words (all are candidates); every third one
    # holds a byte in the middle: more candidates than one scan chunk.
    n = 20000
    data = np.zeros((n, PAGE_SIZE), dtype=np.uint8)
    data[::3, PAGE_SIZE // 2] = 9
    z = zero_rows(data)
    assert int(z.sum()) == n - len(range(0, n, 3))
    assert not z[::3].any()


def test_staging_reserve_reuses_and_grows() -> None:
    s = Staging()
    assert s.capacity == 0
    assert s.reserve(10 * PAGE_SIZE)
    cap = s.capacity
    assert cap >= 10 * PAGE_SIZE and cap % (2 << 20) == 0
    assert not s.reserve(cap)  # big enough: nothing happens
    rows = s.pages(0, 10)
    rows[:] = 5
    assert s.reserve(cap + 1) and s.allocations == 2
    assert s.pages(0, 1).shape == (1, PAGE_SIZE)
    assert rows.sum() == 5 * rows.size  # old views stay valid: unmapped with the last one
    s.close()
