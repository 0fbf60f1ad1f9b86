"""How a big copy is shared out to threads (nodeagent/proc/reader.py `_shares`): the shares,
put back together, are exactly the iovecs given (same bytes, same order, remote and
local in step), and a big copy is spread about evenly."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cpcoord.ranges import PAGE_SIZE
from nodeagent.proc import reader


def _bytes_of(remote: np.ndarray, local: np.ndarray) -> list[tuple[int, int, int]]:
    """The iovec pairs as (remote, local, length) with neighbours that continue each
    other on both sides merged: equal for two lists that move the same bytes alike."""
    out: list[list[int]] = []
    for (ra, n), (la, m) in zip(remote.tolist(), local.tolist(), strict=True):
        assert n == m
        if out and out[-1][0] + out[-1][2] == ra and out[-1][1] + out[-1][2] == la:
            out[-1][2] += n
        else:
            out.append([ra, la, n])
    return [(a, b, c) for a, b, c in out]


@settings(max_examples=200, deadline=None)
@given(
    runs=st.lists(st.integers(1, 40_000), min_size=1, max_size=12),
    workers=st.integers(1, 4),
    gap=st.integers(0, 3),
)
def test_shares_are_the_iovecs_cut_up(runs: list[int], workers: int, gap: int) -> None:
    pages = np.array(runs, dtype=np.uint64)
    lengths = pages * np.uint64(PAGE_SIZE)
    starts = np.cumsum(lengths + np.uint64(gap * PAGE_SIZE)) - lengths
    remote = np.stack((starts + np.uint64(1 << 40), lengths), axis=1)
    local = np.stack((np.cumsum(lengths) - lengths + np.uint64(1 << 30), lengths), axis=1)
    shares = reader._shares(remote, local, workers)
    total = int(lengths.sum())
    if workers == 1 or total < reader.PARALLEL_MIN:
        assert len(shares) == 1
    else:
        assert 1 < len(shares) <= workers
        sizes = [int(r[:, 1].sum()) for r, _ in shares]
        assert max(sizes) <= total / workers + reader.COPY_PIECE
        assert all(int(r[:, 1].max()) <= reader.COPY_PIECE for r, _ in shares)
    whole_r = np.concatenate([r for r, _ in shares])
    whole_l = np.concatenate([lo for _, lo in shares])
    assert _bytes_of(whole_r, whole_l) == _bytes_of(remote, local)
    for r, lo in shares:
        assert r.flags.c_contiguous and lo.flags.c_contiguous and r.dtype == np.uint64
