"""Chunks of this node's cache for the coordinator (`ReadCached` -> `SendCached`): an
export of a generation at level local, or a restore elsewhere (docs/multilevel.md,
"Reading"; the coordinator's side is coordinator/cacheread.py).

The command names the cached packs and the chunk ids; they are read like a restore's
direct read of the cache (cpcoord/packread.py: each pack's trailer locates them, every
chunk is checked against its id here) and sent as plain chunks in pieces of at most
PIECE_BYTES under the command's token; the coordinator checks each again. A failure is
the command's CommandResult error, after which the coordinator gives up the read.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from cpcoord import packread
from cpcoord.errors import InvalidArgument, NotDrained
from cpcoord.gen.v1 import agent_pb2, common_pb2
from nodeagent.upload.direct import DirectStore

PIECE_BYTES = 4 << 20  # chunk bytes per SendCached message (Welcome: 8 MiB at most)
ID = 32


def _batch(rc: agent_pb2.ReadCached) -> common_pb2.PageBatch:
    n = len(rc.ids) // ID
    if len(rc.ids) % ID or len(rc.pack_index) != 4 * n:
        raise InvalidArgument("ReadCached: id and pack columns disagree")
    loc = common_pb2.ChunkLocations(
        namespace=rc.namespace, packs=rc.packs, ids=rc.ids, pack_index=rc.pack_index,
        offsets=bytes(8 * n), stored_sizes=bytes(4 * n), raw_sizes=bytes(4 * n),
        methods=bytes(n), cached=b"\x01" * len(rc.packs),
    )  # fmt: skip
    return common_pb2.PageBatch(locations=loc)


def read(store: DirectStore | None, rc: agent_pb2.ReadCached) -> tuple[list[bytes], list[bytes]]:
    """(ids, plain bytes) of the chunks the command names, read from the cache, checked."""
    if store is None or store.cache is None:
        raise NotDrained(len(rc.ids) // ID, "this node (its agent has no cache now)")
    got = packread.fetch(store.backend, store.sealer, [_batch(rc)], cache=store.cache.reader)
    assert got[0] is not None
    return got[0]


def messages(token: str, ids: list[bytes], data: list[bytes]) -> Iterator[agent_pb2.CachedChunks]:
    """The SendCached stream: the token first, the chunks in pieces."""
    lo, first = 0, True
    while first or lo < len(ids):
        hi, size = lo, 0
        while hi < len(ids) and (hi == lo or size + len(data[hi]) <= PIECE_BYTES):
            size += len(data[hi])
            hi += 1
        sizes = np.array([len(d) for d in data[lo:hi]], dtype="<u4").tobytes()
        chunks = common_pb2.ChunkData(
            ids=b"".join(ids[lo:hi]), methods=bytes(hi - lo), raw_sizes=sizes,
            stored_sizes=sizes, data=b"".join(data[lo:hi]),
        )  # fmt: skip
        yield agent_pb2.CachedChunks(token=token if first else "", chunks=chunks)
        first, lo = False, hi
