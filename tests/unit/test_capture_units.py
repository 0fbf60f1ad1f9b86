"""Pure pieces of the capture engine: zero-page detection, the staging buffer, and which
pages are read through /proc/PID/mem."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cpcoord.ranges import PAGE_SIZE
from nodeagent.capture.process import zero_rows
from nodeagent.proc.reader import MEM_ABSORB, _absorb
from nodeagent.proc.staging import Staging


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


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.booleans(), st.booleans()), max_size=30))
def test_absorb_reads_short_exclusive_stretches_with_their_shared_neighbours(
    parts: list[tuple[int, bool, bool]],
) -> None:
    """Stretches (length, shared?, gap before?): an exclusive stretch is read through
    /proc/PID/mem exactly when it is shorter than MEM_ABSORB and touches a shared stretch
    on both sides within one run of consecutive pages; nothing else changes."""
    pages, kind, stretch = [], [], []
    at = 0
    for i, (n, shared, gap) in enumerate(parts):
        at += 3 if gap else 0
        pages += range(at, at + n)
        kind += [shared] * n
        stretch += [i] * n
        at += n
    p = np.array(pages, dtype=np.uint64)
    via_mem = np.array(kind, dtype=bool)
    before = via_mem.copy()
    _absorb(p, via_mem)
    # The model, on the merged stretches (neighbours of the same kind with no gap join).
    runs: list[list[int]] = []  # [first index, last index, shared]
    for j in range(p.size):
        if runs and p[j] == p[j - 1] + 1 and before[j] == before[j - 1]:
            runs[-1][1] = j
        else:
            runs.append([j, j, int(before[j])])
    want = before.copy()
    for r, (a, b, sh) in enumerate(runs):
        prev_ok = r > 0 and runs[r - 1][2] and p[a] == p[a - 1] + 1
        next_ok = r + 1 < len(runs) and runs[r + 1][2] and p[b + 1] == p[b] + 1
        if not sh and b - a + 1 < MEM_ABSORB and prev_ok and next_ok:
            want[a : b + 1] = True
    assert np.array_equal(via_mem, want)
    assert not (before & ~via_mem).any(), "a shared page must never go to process_vm_readv"
