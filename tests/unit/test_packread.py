"""The direct read path's fetch (cpcoord/packread.py) against real packs in
a directory store: chunks come back exact and in their batches, adjacent blobs of a
pack come with one ranged read, sealed and compressed chunks open, and one damaged byte
is DataCorrupted naming the chunk (nothing returned)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cpcoord import packread
from cpcoord.errors import DataCorrupted
from cpcoord.gen.v1 import common_pb2
from storecore import compress, packs
from storecore.backend import Kind, LocalBackend
from storecore.crypt import Sealer
from storecore.ids import digest_all

NS = "job:j"


class CountingBackend(LocalBackend):
    reads: list[tuple[str, int, int]]

    def get_range(self, kind: Kind, name: str, offset: int, length: int) -> bytes:
        self.reads.append((name, offset, length))
        return super().get_range(kind, name, offset, length)


def _store(tmp: Path, chunks: list[bytes], sealer: Sealer | None = None) -> tuple[
    CountingBackend, str, np.ndarray
]:  # fmt: skip
    b = CountingBackend(tmp / "store")
    b.reads = []
    ids = digest_all(chunks)
    methods, blobs = compress.compress_batch(chunks)
    if sealer is not None:
        blobs = list(sealer.seal_chunks(NS, [x.tobytes() for x in ids], blobs))
        methods |= packs.METHOD_SEALED
    w = packs.PackWriter(NS)
    w.add(ids, methods, blobs, np.array([len(c) for c in chunks], dtype=np.uint32))
    sp = w.seal()
    name = f"nodes/n/{sp.id.format()}"
    b.put(Kind.PACKS, name, sp.data)
    return b, name, sp.contents.entries


def _batch(name: str, e: np.ndarray) -> common_pb2.PageBatch:
    loc = common_pb2.ChunkLocations(
        namespace=NS,
        packs=[name],
        ids=np.ascontiguousarray(e["id"]).tobytes(),
        pack_index=np.zeros(len(e), "<u4").tobytes(),
        offsets=e["offset"].astype("<u8").tobytes(),
        stored_sizes=e["stored"].astype("<u4").tobytes(),
        raw_sizes=e["raw"].astype("<u4").tobytes(),
        methods=e["method"].astype(np.uint8).tobytes(),
    )
    return common_pb2.PageBatch(locations=loc)


def _chunks(n: int) -> list[bytes]:
    out = [os.urandom(4096 * (1 + i % 3)) for i in range(n)]
    out[1] = bytes(8192)  # compresses: a zstd blob among raw ones
    return out


@pytest.mark.parametrize("sealed", [False, True])
def test_fetch_is_exact_per_batch_with_one_read_per_span(tmp_path: Path, sealed: bool) -> None:
    chunks = _chunks(40)
    sealer = Sealer(os.urandom(32)) if sealed else None
    b, name, e = _store(tmp_path, chunks, sealer)
    # Two batches, the second's chunks in reverse order; an empty batch between.
    batches = [_batch(name, e[:25]), common_pb2.PageBatch(), _batch(name, e[25:][::-1])]
    got = packread.fetch(b, sealer, batches)
    assert got[1] == ([], [])
    assert got[0] is not None and got[2] is not None
    assert got[0][1] == chunks[:25]
    assert got[2][1] == chunks[25:][::-1]
    assert got[2][0] == [x.tobytes() for x in e["id"][25:][::-1]]
    assert len(b.reads) == 1, b.reads  # adjacent blobs: one ranged read


def test_a_batch_with_chunk_bytes_is_left_to_the_stream(tmp_path: Path) -> None:
    b, name, e = _store(tmp_path, _chunks(3))
    plain = common_pb2.PageBatch(chunks=common_pb2.ChunkData(ids=bytes(32)))
    assert packread.fetch(b, None, [plain, _batch(name, e)])[0] is None


def test_spans_split_at_big_gaps_and_at_the_span_limit(tmp_path: Path) -> None:
    chunks = [os.urandom(1 << 20) for _ in range(6)]
    b, name, e = _store(tmp_path, chunks)
    keep = e[[0, 1, 4]]  # a 2 MiB gap between 1 and 4
    packread.fetch(b, None, [_batch(name, keep)])
    assert [r[1:] for r in b.reads] == [
        (int(e["offset"][0]), 2 << 20),
        (int(e["offset"][4]), 1 << 20),
    ]
    b.reads.clear()
    limit = packread.SPAN_BYTES
    packread.SPAN_BYTES = 3 << 20
    try:
        packread.fetch(b, None, [_batch(name, e)])
    finally:
        packread.SPAN_BYTES = limit
    assert [r[2] for r in sorted(b.reads, key=lambda r: r[1])] == [3 << 20, 3 << 20]


def test_a_damaged_byte_is_data_corrupted(tmp_path: Path) -> None:
    chunks = [os.urandom(4096) for _ in range(8)]
    b, name, e = _store(tmp_path, chunks)
    path = b._path(Kind.PACKS, name)
    data = bytearray(path.read_bytes())
    data[int(e["offset"][5]) + 17] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DataCorrupted, match=e["id"][5].tobytes().hex()):
        packread.fetch(b, None, [_batch(name, e)])


def _cached_batch(name: str, e: np.ndarray) -> common_pb2.PageBatch:
    """As the coordinator names chunks of a cached pack: the pack only, entries zero."""
    n = len(e)
    loc = common_pb2.ChunkLocations(
        namespace=NS, packs=[name], ids=np.ascontiguousarray(e["id"]).tobytes(),
        pack_index=np.zeros(n, "<u4").tobytes(), offsets=bytes(8 * n),
        stored_sizes=bytes(4 * n), raw_sizes=bytes(4 * n), methods=bytes(n), cached=b"\x01",
    )  # fmt: skip
    return common_pb2.PageBatch(locations=loc)


@pytest.mark.parametrize("sealed", [False, True])
def test_cached_packs_are_read_from_the_cache_located_by_their_trailers(
    tmp_path: Path, sealed: bool
) -> None:
    chunks = _chunks(30)
    sealer = Sealer(os.urandom(32)) if sealed else None
    cache, name, e = _store(tmp_path, chunks, sealer)
    store = CountingBackend(tmp_path / "other")
    store.reads = []
    order = np.arange(len(e))[::-1]  # any order: found by id
    got = packread.fetch(store, sealer, [_cached_batch(name, e[order])], cache=cache)
    assert got[0] is not None
    want = [chunks[i] for i in order.tolist()]
    assert got[0][1] == want
    assert not store.reads and cache.reads  # the cache, never the store
    # Without a cache the stream is refused; a chunk the pack lacks is DataCorrupted.
    with pytest.raises(Exception, match="no cache"):
        packread.fetch(store, sealer, [_cached_batch(name, e)])
    bad = e.copy()
    bad["id"][3] = bytes(32 - 1) + b"\x01"
    with pytest.raises(DataCorrupted, match="lacks a chunk"):
        packread.fetch(store, sealer, [_cached_batch(name, bad)], cache=cache)


def test_a_damaged_byte_in_a_cached_pack_is_data_corrupted(tmp_path: Path) -> None:
    cache, name, e = _store(tmp_path, _chunks(10))
    path = next((tmp_path / "store").rglob(name.rsplit("/", 1)[-1]))
    data = bytearray(path.read_bytes())
    data[int(e["offset"][4]) + 7] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(DataCorrupted, match="does not match"):
        packread.fetch(cache, None, [_cached_batch(name, e)], cache=cache)


class _Local:
    """Candidate bytes by id; `wrong` ids get bytes that are not theirs."""

    def __init__(self, chunks: dict[bytes, bytes], wrong: set[bytes]) -> None:
        self.chunks, self.wrong = chunks, wrong

    def get(self, want: np.ndarray) -> list[bytes | None]:
        out: list[bytes | None] = []
        for i in want.tolist():
            got = self.chunks.get(bytes(i))
            out.append(None if got is None else (b"x" + got[1:]) if bytes(i) in self.wrong else got)
        return out


def test_chunks_held_locally_are_used_only_when_they_hash_to_their_ids(tmp_path: Path) -> None:
    """Held chunks whose bytes are theirs are not read; held bytes that are not (staging
    written since) are read from the pack instead; every chunk comes back exact."""
    chunks = [os.urandom(64 << 10) for _ in range(40)]  # gaps of held ones: never read over
    b, name, e = _store(tmp_path, chunks)
    ids = [bytes(x) for x in np.ascontiguousarray(e["id"]).tolist()]
    by_id = {bytes(x): c for x, c in zip(digest_all(chunks).tolist(), chunks, strict=True)}
    held = {i: by_id[i] for i in ids[:30]}  # the first 30 (pack order) held
    local = _Local(held, wrong=set(ids[:3]))  # of which 3 changed since
    from_memory: list[int] = []
    got = packread.fetch(b, None, [_batch(name, e)], local=local, on_local=from_memory.append)
    assert got[0] is not None
    assert got[0][0] == ids and got[0][1] == [by_id[i] for i in ids]
    assert from_memory == [27 * (64 << 10)]  # the metric's `memory` bytes: 27 held and right
    read = {(o, n) for _, o, n in b.reads}
    offs = e["offset"].astype(int).tolist()
    ends = (e["offset"] + e["stored"]).astype(int).tolist()
    for k in range(3, 30):  # used from memory: no read covers them
        assert not any(o <= offs[k] and ends[k] <= o + n for o, n in read), k
    for k in [*range(3), *range(30, 40)]:
        assert any(o <= offs[k] and ends[k] <= o + n for o, n in read), k
