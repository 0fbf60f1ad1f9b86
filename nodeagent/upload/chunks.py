"""The chunking rule of uploads: page entries, chunk edges, batches, packed chunk data.

A region's delivered pages are cut into page entries at every gap (non-consecutive
offsets), at every change between zero and non-zero pages, and, for non-zero pages, at
every boundary of a 16-page group of the region (offsets 0-15, 16-31, ...). A non-zero
entry is one chunk: the plain bytes of its pages (at most 64 KiB), named by their
BLAKE3-256. A zero entry gets the ZERO id (32 zero bytes), is never hashed or sent, and
may span groups (a zero GiB is one entry).

Why: chunk edges depend only on a page's offset in its region and on which neighbours
were delivered, so a group of pages that did not change has the same id in every
generation, and members with the same memory at the same region offsets produce the
same ids: the store keeps them once. 16 pages keep chunks big enough to hash and index
cheaply (one id per 64 KiB: BLAKE3 runs at ~3 GB/s on one core here) and small enough
that a one-page change in an incremental capture costs one page.

Everything is vectorised over the page arrays; Python steps once per batch or chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from cpcoord.gen.v1 import common_pb2
from cpcoord.ranges import PAGE_SIZE

GROUP_PAGES = 16
ID_SIZE = 32
ENTRY_BYTES = 48  # packed entry: offset u64, count u32, skip u32, id 32
MESSAGE_MARGIN = 256 << 10  # room in every message for protobuf framing
MAX_IDS = 65536  # ids per MissingChunks request
SAMPLE = PAGE_SIZE  # compression is tried on a chunk only if its first page compresses


@dataclass(frozen=True)
class Entries:
    """A region's page entries (the chunking rule above), as parallel arrays."""

    offsets: npt.NDArray[np.uint64]  # first page, from the region start
    counts: npt.NDArray[np.int64]
    rows: npt.NDArray[np.int64]  # first row of the region's staged data
    zero: npt.NDArray[np.bool_]

    def __len__(self) -> int:
        return int(self.offsets.size)


def plan(
    pages: npt.NDArray[np.uint64],
    zero: npt.NDArray[np.bool_],
    group: int = GROUP_PAGES,
    region: npt.NDArray[np.int64] | None = None,
) -> Entries:
    """Cut sorted page offsets (with a zero flag each) into entries, vectorised. With
    `region` (each page's region, ascending), the pages of many regions back to back
    (offsets from each one's start) are cut at once: an entry never spans two."""
    n = int(pages.size)
    if n == 0:
        e = np.zeros(0, dtype=np.int64)
        return Entries(np.zeros(0, dtype=np.uint64), e, e, np.zeros(0, dtype=np.bool_))
    g = np.uint64(group)
    brk = np.ones(n, dtype=np.bool_)
    brk[1:] = (
        (pages[1:] != pages[:-1] + np.uint64(1))
        | (zero[1:] != zero[:-1])
        | (~zero[1:] & (pages[1:] // g != pages[:-1] // g))
    )
    if region is not None:
        brk[1:] |= region[1:] != region[:-1]
    starts = np.flatnonzero(brk)
    counts = np.diff(np.append(starts, n)).astype(np.int64)
    return Entries(pages[starts], counts, starts.astype(np.int64), zero[starts])


def batches(e: Entries, max_message_bytes: int, max_entries: int) -> list[tuple[int, int]]:
    """Entry ranges [a, b) per batch: at most max_batch_entries, and the bytes of the
    chunks they could carry (all of them, if all were missing) within one message."""
    n = len(e)
    if n == 0:
        return []
    cost = np.where(e.zero, 0, e.counts * PAGE_SIZE) + ENTRY_BYTES
    cum = np.cumsum(cost)
    budget = max(max_message_bytes - MESSAGE_MARGIN, GROUP_PAGES * PAGE_SIZE + ENTRY_BYTES)
    out: list[tuple[int, int]] = []
    a = 0
    while a < n:  # one step per batch
        base = int(cum[a - 1]) if a else 0
        b = int(np.searchsorted(cum, base + budget, side="right"))
        b = min(max(b, a + 1), a + max_entries, n)
        out.append((a, b))
        a = b
    return out


def chunk_parts(
    chunks: Sequence[npt.NDArray[np.uint8]], ids: bytes, compress: bool
) -> tuple[common_pb2.ChunkData, list[Any], int]:
    """ChunkData for the chunks with every column but `data`, the parts that make up
    `data` (each chunk raw, or zstd where it saves >= 1/32), and their total size."""
    raw = np.array([c.nbytes for c in chunks], dtype="<u4")
    parts: list[Any] = list(chunks)
    methods = np.zeros(len(chunks), dtype=np.uint8)
    if compress and chunks:
        cctx = zstandard.ZstdCompressor(level=1)
        samples = cctx.multi_compress_to_buffer([c[:1].data for c in chunks], threads=-1)
        try_idx = [i for i in range(len(chunks)) if len(samples[i]) < SAMPLE - SAMPLE // 32]
        if try_idx:
            done = cctx.multi_compress_to_buffer([chunks[i].data for i in try_idx], threads=-1)
            for k, i in enumerate(try_idx):
                z = done[k].tobytes()
                if len(z) < int(raw[i]) - int(raw[i]) // 32:
                    parts[i], methods[i] = z, 1
    stored = np.array([len(p) if isinstance(p, bytes) else p.nbytes for p in parts], dtype="<u4")
    cd = common_pb2.ChunkData(
        ids=ids, methods=methods.tobytes(), raw_sizes=raw.tobytes(), stored_sizes=stored.tobytes()
    )
    return cd, parts, int(stored.sum())


def chunk_data(
    chunks: Sequence[npt.NDArray[np.uint8]],
    ids: bytes,
    compress: bool,
    into: common_pb2.ChunkData | None = None,
) -> tuple[common_pb2.ChunkData, int]:
    """Packed ChunkData for the chunks (raw, or zstd where it saves >= 1/32), filled
    into `into` when given: a nested message passed to a constructor is copied whole,
    and these carry megabytes."""
    head, parts, nbytes = chunk_parts(chunks, ids, compress)
    cd = into if into is not None else common_pb2.ChunkData()
    cd.ids = head.ids
    cd.methods = head.methods
    cd.raw_sizes = head.raw_sizes
    cd.stored_sizes = head.stored_sizes
    cd.data = b"".join(parts)
    return cd, nbytes


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Protobuf tags (field number << 3 | length-delimited): UploadRequest.batch = 2,
# PageBatch.chunks = 3, ChunkData.data = 5 (proto/cpcoord/v1/agent.proto, common.proto).
_TAG_BATCH, _TAG_CHUNKS, _TAG_DATA = b"\x12", b"\x1a", b"\x2a"


def encode_batch(
    batch: common_pb2.PageBatch, head: common_pb2.ChunkData, parts: Sequence[Any]
) -> bytes:
    """The wire bytes of `UploadRequest{batch: batch + {chunks: head + {data: parts}}}`,
    built with one copy of the chunk bytes (straight from staging into the message).
    Setting `data` on a message and serialising it would copy them three times (join,
    field, serialisation): ~0.5 CPU s per GiB. Protobuf accepts the fields of a
    message in any order, so these bytes parse exactly as the message would. `batch`
    must not carry chunks itself (the field would appear twice and be merged)."""
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    b = batch.SerializeToString()
    c = head.SerializeToString()
    chunks_len = len(c) + 1 + len(_varint(size)) + size
    batch_len = len(b) + 1 + len(_varint(chunks_len)) + chunks_len
    frame = [_TAG_BATCH, _varint(batch_len), b, _TAG_CHUNKS, _varint(chunks_len), c]
    return b"".join([*frame, _TAG_DATA, _varint(size), *parts])
