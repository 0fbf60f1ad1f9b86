"""The pages a restore must write, from two manifests' page tables (coordinator/
restore_diff.py), against a page-by-page model; and a table cut down to chosen pages."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.restore_diff import differing_pages, only_pages
from coordinator.store.manifest import PageTable
from storecore.ids import ID_DTYPE

N = 64


def _table(rng: np.random.Generator) -> PageTable:
    """Random runs over N pages, each a slice of one of 4 chunks (id 0: the zero marker)."""
    present = rng.random(N) < 0.7
    cuts = np.flatnonzero(rng.random(N) < 0.3)
    offs, counts, ids, skips = [], [], [], []
    start = None
    for p in range(N + 1):
        run_ends = p == N or not present[p] or p in cuts
        if start is not None and run_ends:
            offs.append(start)
            counts.append(p - start)
            k = int(rng.integers(0, 4))
            ids.append(bytes([k]) * 32)
            skips.append(0 if k == 0 else int(rng.integers(0, 2)))
            start = None
        if p < N and present[p] and start is None:
            start = p
    arr = np.frombuffer(b"".join(ids), dtype=ID_DTYPE) if ids else np.zeros(0, ID_DTYPE)
    return PageTable.of(offs, counts, arr, skips)


def _model(t: PageTable) -> dict[int, tuple[bytes, int]]:
    pages, entry, within = t.expand()
    zero = bytes(32)
    return {
        int(p): (t.ids[e].tobytes(), 0 if t.ids[e].tobytes() == zero else int(w))
        for p, e, w in zip(pages.tolist(), entry.tolist(), within.tolist(), strict=True)
    }


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_differing_pages_match_a_page_by_page_model(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = _table(rng), _table(rng)
    ma, mb = _model(a), _model(b)
    want = sorted(p for p in set(ma) | set(mb) if ma.get(p) != mb.get(p))
    assert differing_pages(a, b).tolist() == want
    assert differing_pages(a, a).size == 0


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_only_pages_keeps_exactly_the_chosen_pages(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = _table(rng)
    chosen = np.flatnonzero(rng.random(N) < 0.4).astype(np.uint64)
    cut = only_pages(t, chosen)
    m = _model(t)
    assert _model(cut) == {p: v for p, v in m.items() if p in set(chosen.tolist())}
    assert not cut.problems(N)
