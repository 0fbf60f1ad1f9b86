"""The fast id-array operations (storecore/ids.py) agree with NumPy's own V32 ones, also
when different ids share their first 8 bytes (the integer key they sort and search by):
an agent may send such ids on purpose."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from storecore.ids import ID_DTYPE, first_of, member_of, search_ids, sort_ids, unique_ids

# Few distinct bytes and a shared 8-byte prefix make duplicates and key collisions common.
_ID = st.builds(
    lambda prefix, rest: bytes(prefix) + bytes(rest),
    st.lists(st.integers(0, 1), min_size=8, max_size=8),
    st.lists(st.integers(0, 2), min_size=24, max_size=24),
)
_IDS = st.lists(_ID, max_size=40)


def _arr(ids: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(ids), dtype=ID_DTYPE).copy() if ids else np.zeros(0, ID_DTYPE)


@settings(max_examples=300, deadline=None)
@given(_IDS)
def test_sort_unique_first_match_numpy(ids: list[bytes]) -> None:
    a = _arr(ids)
    assert np.array_equal(sort_ids(a), np.sort(a))
    assert np.array_equal(unique_ids(a), np.unique(a))
    want = np.zeros(a.size, dtype=bool)
    if a.size:
        want[np.unique(a, return_index=True)[1]] = True
    assert np.array_equal(first_of(a), want)


@settings(max_examples=300, deadline=None)
@given(_IDS, _IDS)
def test_member_of_and_search_match_numpy(needles: list[bytes], hay: list[bytes]) -> None:
    n, h = _arr(needles), np.unique(_arr(hay))
    want = np.isin(n, h)
    assert np.array_equal(member_of(n, h), want)
    pos = search_ids(h, n)
    assert np.array_equal(pos[want], np.searchsorted(h, n)[want])


def test_random_ids_take_the_integer_path() -> None:
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, size=(5000, 32), dtype=np.uint8).view(ID_DTYPE).reshape(-1)
    a = np.concatenate((a, a[:100]))  # duplicates
    assert np.array_equal(unique_ids(a), np.unique(a))
    h = np.unique(a)
    assert member_of(a, h).all()
    assert np.array_equal(search_ids(h, a), np.searchsorted(h, a))
