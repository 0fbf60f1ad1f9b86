"""The coordinator's relay of chunks in node caches (coordinator/cacheread.py), as pure
logic: a SendCached stream is taken only under a token that is waiting, from the node
asked, within the bytes its ids could need; every relayed chunk is checked against its
id, so other bytes are DataCorrupted, never passed on."""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest

from coordinator.cacheread import CacheReads, _decode
from cpcoord.errors import DataCorrupted, InvalidArgument
from cpcoord.gen.v1 import agent_pb2, common_pb2
from storecore.ids import digest_all

ENGINE = SimpleNamespace(repo=SimpleNamespace(config=SimpleNamespace(sealer=None)))


def _piece(chunks: list[bytes], ids: bytes | None = None) -> common_pb2.ChunkData:
    sizes = np.array([len(c) for c in chunks], dtype="<u4").tobytes()
    return common_pb2.ChunkData(
        ids=ids if ids is not None else digest_all(chunks).tobytes(),
        methods=bytes(len(chunks)), raw_sizes=sizes, stored_sizes=sizes, data=b"".join(chunks),
    )  # fmt: skip


def _stream(token: str, *pieces: common_pb2.ChunkData) -> Iterator[agent_pb2.CachedChunks]:
    for i, p in enumerate(pieces):
        yield agent_pb2.CachedChunks(token=token if i == 0 else "", chunks=p)


def test_a_stream_is_taken_only_for_a_waiting_token_from_the_node_asked() -> None:
    reads = CacheReads()
    chunks = [os.urandom(4096), os.urandom(8192)]
    token = reads.open("node-a", 2)
    with pytest.raises(InvalidArgument, match="no read is waiting"):
        reads.deliver("", _stream("f" * 32, _piece(chunks)))
    with pytest.raises(InvalidArgument, match="node-b answers a read asked of node-a"):
        reads.deliver("node-b", _stream(token, _piece(chunks)))
    reads.deliver("node-a", _stream(token, _piece(chunks[:1]), _piece(chunks[1:])))
    got = _decode(reads.close(token), "job:j", "cache", ENGINE)  # type: ignore[arg-type]
    assert list(got.values()) == chunks
    assert reads.close(token) == []  # gone once taken
    with pytest.raises(InvalidArgument, match="no read is waiting"):
        reads.deliver("node-a", _stream(token, _piece(chunks)))


def test_a_stream_may_not_carry_more_than_its_ids_need() -> None:
    reads = CacheReads()
    token = reads.open("node-a", 1)
    big = [os.urandom(4 << 20)] * 3
    with pytest.raises(InvalidArgument, match="more bytes"):
        reads.deliver("", _stream(token, *[_piece([b]) for b in big]))


def test_other_bytes_than_the_id_says_are_data_corrupted() -> None:
    chunk = os.urandom(4096)
    wrong = digest_all([os.urandom(4096)]).tobytes()
    with pytest.raises(DataCorrupted):
        _decode([_piece([chunk], ids=wrong)], "job:j", "cache", ENGINE)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="disagree"):
        bad = _piece([chunk])
        bad.stored_sizes = np.array([4095], dtype="<u4").tobytes()
        _decode([bad], "job:j", "cache", ENGINE)  # type: ignore[arg-type]
