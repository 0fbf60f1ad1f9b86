"""Packs and ids: round trips, raw-vs-zstd choice, and corruption always detected."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpcoord.errors import DataCorrupted, InvalidArgument, StoreError
from storecore import compress, packs
from storecore.backend import Kind, LocalBackend
from storecore.ids import (
    ZERO,
    ChunkId,
    PackId,
    as_id_array,
    chunk_ids_of,
    digest,
    ids_to_bytes,
    zero_mask,
)

chunk_st = st.one_of(
    st.binary(min_size=1, max_size=3000),  # random-ish: stored raw
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8), st.integers(64, 800)),
)


def make_pack(chunks: list[bytes], ns: str = "job:t") -> packs.SealedPack:
    ids = as_id_array([digest(c) for c in chunks])
    methods, blobs = compress.compress_batch(chunks, level=1, threads=1)
    w = packs.PackWriter(ns)
    w.add(ids, methods, blobs, np.array([len(c) for c in chunks]))
    return w.seal()


def test_ids_format_parse_and_zero() -> None:
    c = ChunkId.of(b"page")
    assert ChunkId.parse(c.format()) == c
    assert ChunkId.parse(c.format().upper()) == c
    assert ZERO.is_zero and not c.is_zero
    with pytest.raises(InvalidArgument):
        ChunkId.parse("xyz")
    with pytest.raises(InvalidArgument):
        PackId(b"short")
    arr = as_id_array([c, ZERO, c.digest])
    assert list(zero_mask(arr)) == [False, True, False]
    assert ids_to_bytes(arr)[0] == c.digest
    # an id ending in zero bytes survives the array round trip (V32, not S32)
    tail0 = b"\x01" + bytes(31)
    assert ids_to_bytes(as_id_array([tail0]))[0] == tail0


def test_chunk_ids_of_marks_zero_chunks_without_hashing() -> None:
    data = bytearray(5 * 4096)
    data[4096 + 7] = 1
    data[-1] = 9  # the short last chunk counts too
    ids, chunks = chunk_ids_of(data[: 4 * 4096 + 100], 4096)
    assert list(zero_mask(ids)) == [True, False, True, True, True]
    ids, chunks = chunk_ids_of(data, 4096)
    assert list(zero_mask(ids)) == [True, False, True, True, False]
    assert ids_to_bytes(ids)[1] == digest(bytes(chunks[1]))


@settings(max_examples=60, deadline=None)
@given(st.lists(chunk_st, min_size=1, max_size=20))
def test_pack_round_trip(chunks: list[bytes]) -> None:
    sealed = make_pack(chunks)
    assert sealed.id == packs.pack_id_of(sealed.data)
    contents = packs.verify_pack(sealed.data, sealed.id.format())
    assert contents.namespace == "job:t"
    got = [
        packs.decode_chunk(int(e["method"]), blob, int(e["raw"]), cid, "p")
        for cid, blob, e in packs.iter_blobs(sealed.data, contents.entries)
    ]
    assert got == chunks
    trailer = packs.parse_trailer(sealed.data[-5000:], len(sealed.data), "p")
    assert np.array_equal(trailer.entries, contents.entries)


def test_raw_when_compression_does_not_help() -> None:
    rnd, text = os.urandom(65536), b"abcd" * 16384
    half = os.urandom(32768) + bytes(32768)  # the sample sees both halves
    small = os.urandom(4096)  # below the sampling size: tried in full
    methods, blobs = compress.compress_batch([rnd, text, half, small], level=1, threads=2)
    assert list(methods) == [packs.METHOD_RAW, packs.METHOD_ZSTD, packs.METHOD_ZSTD, 0]
    assert blobs[0] == rnd and blobs[3] == small
    assert len(blobs[1]) < 1000 and len(blobs[2]) < 34000


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(chunk_st, min_size=1, max_size=6), st.data())
def test_any_bit_flip_or_truncation_is_detected(chunks: list[bytes], data: st.DataObject) -> None:
    sealed = make_pack(chunks)
    raw = bytearray(sealed.data)
    if data.draw(st.booleans()):
        bit = data.draw(st.integers(0, len(raw) * 8 - 1))
        raw[bit // 8] ^= 1 << (bit % 8)
    else:
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    with pytest.raises(DataCorrupted):
        packs.verify_pack(bytes(raw), sealed.id.format())
    # the trailer alone (what open() reads) never yields wrong entries silently
    try:
        contents = packs.parse_trailer(bytes(raw), len(raw), "p")
    except DataCorrupted:
        return
    # The trailer survived, so the damage is in the header or in one blob: reading the
    # chunks either fails for that blob or yields exactly the original bytes (a flip
    # zstd ignores); never different bytes.
    got: list[bytes | None] = []
    for cid, blob, e in packs.iter_blobs(bytes(raw), contents.entries):
        try:
            got.append(packs.decode_chunk(int(e["method"]), blob, int(e["raw"]), cid, "p"))
        except DataCorrupted:
            got.append(None)
    assert sum(g is None for g in got) <= 1
    assert all(g is None or g == c for g, c in zip(got, chunks, strict=True))


@pytest.mark.parametrize("sealed", [False, True])
def test_verify_pack_checks_a_view_into_a_bigger_buffer_as_it_checks_bytes(sealed: bool) -> None:
    """A partner holder checks each pack as a view of a receive buffer reused for bigger
    packs (nodeagent/daemon/partner_server.py): raw, zstd and sealed chunks are checked
    in place, and a flipped bit in the view is found as in bytes."""
    from storecore.crypt import Sealer

    rng = np.random.default_rng(5)
    chunks = [rng.bytes(8192), b"abcd" * 3000, rng.bytes(4096)]  # raw, zstd, raw
    ids = as_id_array([digest(c) for c in chunks])
    methods, blobs = compress.compress_batch(chunks, level=1, threads=1)
    assert sorted(set(methods.tolist())) == [compress.METHOD_RAW, compress.METHOD_ZSTD]
    sealer = Sealer(os.urandom(32)) if sealed else None
    if sealer is not None:
        blobs = sealer.seal_chunks("job:t", [bytes(i) for i in ids], blobs)
        methods = methods | np.uint8(compress.METHOD_SEALED)
    w = packs.PackWriter("job:t")
    w.add(ids, methods, blobs, np.array([len(c) for c in chunks]))
    sp = w.seal()
    room = bytearray(len(sp.data) + 5000)  # a bigger pack's buffer, reused
    room[: len(sp.data)] = sp.data
    view = memoryview(room)[: len(sp.data)]
    contents = packs.verify_pack(view, sp.id.format(), sealer)
    assert contents.entries["id"].tobytes() == ids.tobytes()
    with pytest.raises(DataCorrupted):  # the tail beyond the view is no part of it
        packs.verify_pack(memoryview(room), sp.id.format(), sealer)
    for at in (packs.HEADER_BYTES + 100, packs.HEADER_BYTES + 8192 + 10, len(sp.data) - 300):
        room[at] ^= 1
        with pytest.raises(DataCorrupted):
            packs.verify_pack(view, sp.id.format(), sealer)
        room[at] ^= 1


def test_trailer_from_backend_reads_only_the_tail(tmp_path: Path) -> None:
    sealed = make_pack([os.urandom(70000), b"x" * 9000])
    b = LocalBackend(tmp_path)
    b.put(Kind.PACKS, sealed.id.format(), sealed.data)
    c = packs.read_contents(b, sealed.id.format())
    assert np.array_equal(c.entries, sealed.contents.entries)


def test_many_entries_trailer_longer_than_first_read(tmp_path: Path) -> None:
    chunks = [i.to_bytes(4, "little") * 3 for i in range(3000)]  # trailer ~123 KB
    sealed = make_pack(chunks)
    b = LocalBackend(tmp_path)
    b.put(Kind.PACKS, sealed.id.format(), sealed.data)
    assert packs.read_contents(b, sealed.id.format()).entries.size == 3000


def test_trailer_of_a_whole_pack_in_memory_copies_out_only_the_trailer() -> None:
    for chunks in (
        [os.urandom(70000), b"x" * 9000],
        [i.to_bytes(4, "little") * 3 for i in range(3000)],
    ):
        sealed = make_pack(chunks)  # the second: a trailer longer than TAIL_READ
        got = packs.trailer_of(memoryview(sealed.data), "p")
        assert got.namespace == sealed.contents.namespace
        assert np.array_equal(got.entries, sealed.contents.entries)
    for bad in (b"", b"CPPT", sealed.data[:-1], sealed.data[1:]):
        with pytest.raises(DataCorrupted):
            packs.trailer_of(bad, "p")


def test_check_chunks_bounds() -> None:
    with pytest.raises(InvalidArgument):
        packs.check_chunks(as_id_array([bytes(32)]), [b""])
    with pytest.raises(InvalidArgument):
        packs.check_chunks(as_id_array([bytes(32)]), [bytes(packs.MAX_CHUNK_BYTES + 1)])


def test_decode_errors_are_store_errors() -> None:
    cid = digest(b"a" * 100)
    with pytest.raises(StoreError):
        packs.decode_chunk(packs.METHOD_ZSTD, b"not zstd", 100, cid, "p")
    with pytest.raises(StoreError):
        packs.decode_chunk(7, b"a" * 100, 100, cid, "p")
    assert packs.decode_chunk(packs.METHOD_RAW, b"a" * 100, 100, cid, "p") == b"a" * 100


def test_version_2_ids_take_raw_blobs_through_xxh3_and_version_1_packs_still_verify() -> None:
    """A version-2 pack's id takes its raw blobs through XXH3, the rest through BLAKE3:
    a flip in either changes it (and the raw one fails its chunk id too). A version-1
    pack (named by the hash of the whole file) still verifies under its name, and not
    under another."""
    raw_chunk, text = os.urandom(8192), b"abc" * 4000
    sealed = make_pack([raw_chunk, text])
    contents = packs.verify_pack(sealed.data, sealed.id.format())
    methods = contents.entries["method"].tolist()
    assert methods == [packs.METHOD_RAW, packs.METHOD_ZSTD]
    assert sealed.data[:4096] == packs.HEADER == b"CPPK\x03\x00\x00\x00" + bytes(4088)
    o_raw, o_z = (int(x) for x in contents.entries["offset"])
    other = bytearray(sealed.data)
    other[o_raw] ^= 1  # a raw blob: in the id through XXH3, and its chunk id fails
    assert packs.pack_id_of(bytes(other)) != sealed.id
    with pytest.raises(DataCorrupted, match="does not match"):
        packs.verify_pack(bytes(other), packs.pack_id_of(bytes(other)).format())
    other = bytearray(sealed.data)
    other[o_z + 5] ^= 1  # a compressed blob: in the id
    assert packs.pack_id_of(bytes(other)) != sealed.id
    v1 = packs.HEADER_V1 + sealed.data[packs.HEADER_BYTES :]
    name = PackId.of(v1).format()
    assert packs.verify_pack(v1, name).namespace == contents.namespace
    with pytest.raises(DataCorrupted, match="content hash"):
        packs.verify_pack(v1, sealed.id.format())


def test_version_3_blobs_are_page_aligned_and_version_2_packs_still_verify() -> None:
    """Version 3's header is one page, so raw chunks of whole pages start on page
    boundaries (packs.py, "Why a header of one page"). A version-2 pack (8-byte header)
    is located and verified by its own rule; a version-3 header over blobs laid out for
    version 2 names no version-2 pack."""
    pages = [os.urandom(4096 * k) for k in (1, 16, 3)]
    sealed = make_pack(pages)
    contents = packs.verify_pack(sealed.data, sealed.id.format())
    assert contents.entries["offset"].tolist() == [4096, 8192, 8192 + 16 * 4096]
    assert (contents.entries["method"] == packs.METHOD_RAW).all()
    v2 = packs.HEADER_V2 + sealed.data[packs.HEADER_BYTES :]
    name = packs.pack_id_of(v2).format()
    assert name != PackId.of(v2).format()  # the version-2 rule, not the whole-file hash
    c2 = packs.verify_pack(v2, name)
    assert c2.entries["offset"].tolist() == [8, 8 + 4096, 8 + 17 * 4096]
    assert packs.parse_trailer(v2[-5000:], len(v2), "p").entries["offset"][0] == 8
    # A version-3 header over a version-2 layout (a raw blob of zeros completes the
    # page): no version's id, only the whole-file hash, which no written pack is named by.
    z = bytes(8192)
    w = packs.PackWriter("job:t")
    w.add(as_id_array([digest(z)]), np.array([packs.METHOD_RAW], np.uint8), [z], np.array([8192]))
    forged = packs.HEADER[: packs.MIN_HEADER] + w.seal().data[packs.HEADER_BYTES :]
    assert forged[: packs.HEADER_BYTES] == packs.HEADER
    assert packs.pack_id_of(forged) == PackId.of(forged)
    with pytest.raises(DataCorrupted):
        packs.parse_trailer(v2[-5000:], len(v2) + 1, "p")
