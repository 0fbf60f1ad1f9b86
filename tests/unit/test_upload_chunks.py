"""The chunking rule of uploads (nodeagent/upload/chunks.py): entry edges, zero markers, batch
limits and packed chunk data. Pure functions over arrays; no process, no network."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.upload.chunks import (
    ENTRY_BYTES,
    GROUP_PAGES,
    MESSAGE_MARGIN,
    Entries,
    batches,
    chunk_data,
    plan,
)

PAGE = 4096


def _u64(xs: list[int]) -> np.ndarray:
    return np.array(xs, dtype=np.uint64)


def _entries(e: Entries) -> list[tuple[int, int, int, bool]]:
    return list(
        zip(e.offsets.tolist(), e.counts.tolist(), e.rows.tolist(), e.zero.tolist(), strict=True)
    )


def test_full_region_is_cut_at_16_page_groups() -> None:
    pages = np.arange(40, dtype=np.uint64)
    e = plan(pages, np.zeros(40, dtype=bool))
    assert _entries(e) == [(0, 16, 0, False), (16, 16, 16, False), (32, 8, 32, False)]


def test_gaps_and_group_edges_cut_and_rows_follow_the_data() -> None:
    pages = _u64([3, 4, 5, 15, 16, 17, 40])
    e = plan(pages, np.zeros(7, dtype=bool))
    # 15 | 16 is a group edge although consecutive; 5 -> 15 and 17 -> 40 are gaps.
    assert _entries(e) == [
        (3, 3, 0, False),
        (15, 1, 3, False),
        (16, 2, 4, False),
        (40, 1, 6, False),
    ]


def test_zero_pages_are_their_own_entries_and_span_groups() -> None:
    pages = np.arange(64, dtype=np.uint64)
    zero = np.zeros(64, dtype=bool)
    zero[5:50] = True
    e = plan(pages, zero)
    assert _entries(e) == [
        (0, 5, 0, False),
        (5, 45, 5, True),  # one marker over three group edges
        (50, 14, 50, False),
    ]


def test_all_zero_gib_is_one_entry() -> None:
    n = (1 << 30) // PAGE
    e = plan(np.arange(n, dtype=np.uint64), np.ones(n, dtype=bool))
    assert len(e) == 1 and int(e.counts[0]) == n and bool(e.zero[0])


def test_chunk_edges_depend_only_on_offsets_so_unchanged_groups_repeat() -> None:
    """An incremental capture delivering a whole group cuts it like the full one did."""
    full = plan(np.arange(64, dtype=np.uint64), np.zeros(64, dtype=bool))
    inc = plan(np.arange(16, 32, dtype=np.uint64), np.zeros(16, dtype=bool))
    assert (int(inc.offsets[0]), int(inc.counts[0])) == (int(full.offsets[1]), int(full.counts[1]))


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(0, 300), max_size=200), st.integers(0, 2**32 - 1))
def test_entries_cover_exactly_the_pages(offsets: set[int], seed: int) -> None:
    pages = _u64(sorted(offsets))
    zero = np.random.default_rng(seed).random(pages.size) < 0.3
    e = plan(pages, zero)
    covered = np.concatenate(
        [np.arange(o, o + c, dtype=np.uint64) for o, c in zip(e.offsets, e.counts, strict=True)]
        or [np.zeros(0, dtype=np.uint64)]
    )
    assert covered.tolist() == pages.tolist()
    assert int(e.counts.sum()) == pages.size
    for o, c, r, z in _entries(e):
        assert pages[r] == o  # the row points at the entry's first page
        assert zero[r : r + c].tolist() == [z] * c  # one kind per entry
        if not z:  # a chunk never crosses a group edge
            assert o // GROUP_PAGES == (o + c - 1) // GROUP_PAGES


def test_batches_respect_entry_and_byte_limits() -> None:
    pages = np.arange(10_000, dtype=np.uint64)
    e = plan(pages, np.zeros(pages.size, dtype=bool))  # 625 chunks of 64 KiB
    max_bytes = MESSAGE_MARGIN + 10 * GROUP_PAGES * PAGE + 10 * ENTRY_BYTES
    bs = batches(e, max_bytes, 65536)
    assert bs[0] == (0, 10) and bs[-1][1] == len(e)
    assert all(b - a <= 10 for a, b in bs)
    assert [a for a, _ in bs[1:]] == [b for _, b in bs[:-1]]  # contiguous, in order
    bs = batches(e, 64 << 20, 7)
    assert all(b - a <= 7 for a, b in bs) and bs[-1][1] == len(e)


def test_zero_entries_cost_no_chunk_bytes() -> None:
    n = 1 << 16
    e = plan(np.arange(n, dtype=np.uint64), np.ones(n, dtype=bool))
    assert batches(e, MESSAGE_MARGIN + 1024, 65536) == [(0, 1)]
    assert batches(plan(np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=bool)), 1 << 20, 10) == []


def test_chunk_data_raw_and_compressed() -> None:
    rnd = np.frombuffer(os.urandom(4 * PAGE), dtype=np.uint8).reshape(4, PAGE)
    text = np.frombuffer(b"abcd" * (2 * PAGE), dtype=np.uint8).reshape(8, PAGE)
    chunks = [rnd[:4], text[:8]]
    ids = bytes(range(32)) + bytes(range(32, 64))
    raw, nraw = chunk_data(chunks, ids, compress=False)
    assert raw.ids == ids and raw.methods == b"\0\0"
    assert np.frombuffer(raw.raw_sizes, "<u4").tolist() == [4 * PAGE, 8 * PAGE]
    assert raw.stored_sizes == raw.raw_sizes and nraw == 12 * PAGE
    assert raw.data == rnd.tobytes() + text.tobytes()
    z, nz = chunk_data(chunks, ids, compress=True)
    assert z.methods == b"\0\1"  # random data stays raw, text is compressed
    stored = np.frombuffer(z.stored_sizes, "<u4").tolist()
    assert stored[0] == 4 * PAGE and stored[1] < PAGE and nz == sum(stored)
    frame = z.data[stored[0] :]
    assert zstandard.ZstdDecompressor().decompress(frame) == text.tobytes()
    assert z.data[: stored[0]] == rnd.tobytes()


@pytest.mark.parametrize("compress", [False, True])
def test_chunk_data_empty(compress: bool) -> None:
    cd, n = chunk_data([], b"", compress)
    assert n == 0 and cd.ids == b"" and cd.data == b""
