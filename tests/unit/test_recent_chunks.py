"""The chunks of a member's last upload in its staging (nodeagent/upload/recent.py):
found by id, never once a capture rewrote staging or a backup wrote over them, and a
record keeps no memory of a closed staging."""

from __future__ import annotations

import os

import numpy as np

from cpcoord.ranges import PAGE_SIZE
from nodeagent.proc.staging import Staging
from nodeagent.restore.backup import BackupStore
from nodeagent.upload.recent import RecentChunks
from storecore.ids import ID_DTYPE, digest_all


def _staged(n_chunks: int, pages: int = 4) -> tuple[Staging, RecentChunks, list[bytes]]:
    st = Staging(n_chunks * pages * PAGE_SIZE)
    arr = np.frombuffer(os.urandom(n_chunks * pages * PAGE_SIZE), dtype=np.uint8)
    st.array()[: arr.size] = arr
    chunks = [
        arr[i * pages * PAGE_SIZE : (i + 1) * pages * PAGE_SIZE].tobytes() for i in range(n_chunks)
    ]
    ids = digest_all(chunks).view(np.uint8).reshape(-1, 32)
    rows = np.arange(n_chunks, dtype=np.int64) * pages
    counts = np.full(n_chunks, pages, dtype=np.int64)
    order = np.random.default_rng(1).permutation(n_chunks)  # any order in, sorted inside
    rec = RecentChunks.of(st, st.version, ids[order], rows[order], counts[order])
    return st, rec, chunks


def _want(chunks: list[bytes]) -> np.ndarray:
    return digest_all(chunks)


def test_held_chunks_come_back_by_id_and_others_are_none() -> None:
    st, rec, chunks = _staged(50)
    other = [os.urandom(PAGE_SIZE)]
    got = rec.get(_want([chunks[7], *other, chunks[0], chunks[49]]))
    assert got == [chunks[7], None, chunks[0], chunks[49]]
    assert rec.get(np.zeros(0, dtype=ID_DTYPE)) == []
    st.close()


def test_nothing_once_a_capture_rewrote_staging() -> None:
    st, rec, chunks = _staged(8)
    st.rewrite()
    assert rec.get(_want(chunks)) == [None] * 8
    st.close()


def test_a_backup_written_over_the_first_rows_hides_just_those_chunks() -> None:
    st, rec, chunks = _staged(8)
    store = BackupStore(st)
    store.take(2 * 4 * PAGE_SIZE + 1)  # into the third chunk's first page
    got = rec.get(_want(chunks))
    assert got[:3] == [None] * 3 and got[3:] == chunks[3:]
    store.close()
    st.close()


def test_a_closed_staging_gives_nothing_and_is_not_kept_alive() -> None:
    st, rec, chunks = _staged(4)
    st.close()
    assert rec.get(_want(chunks)) == [None] * 4
    assert st.array().size == 0
