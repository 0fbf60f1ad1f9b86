"""Compressing chunks for packs: zstd where it pays, raw where it does not (the method
byte of a pack entry, storecore/packs.py), decided cheaply for random data.

A chunk is stored raw when zstd saves less than 1/32 of its size, or when a 4 KiB
sample of it does not compress (`_worth_trying`): random data then costs neither a full
compression attempt on ingest nor decompression on read.

`decode_chunk` turns a stored blob back into the chunk: it opens a sealed blob (an
encrypted store), decompresses, and checks the bytes against the chunk's id, on every
read.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import zstandard

from cpcoord.errors import DataCorrupted
from storecore.backend import Buffer
from storecore.crypt import Sealer
from storecore.ids import digest

METHOD_RAW = 0
METHOD_ZSTD = 1
METHOD_SEALED = 0x80  # flag: the blob is AES-GCM sealed (crypt.py) around method & 0x7f
SAMPLE_MIN = 16 << 10  # chunks this big are sampled before a full compression attempt
SCOUT_STRIDE = 8  # in a batch of many big chunks, every 8th is sampled first

_local = threading.local()


def _cctx(level: int) -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe: one reused context per thread and level.
    key = f"c{level}"
    c = getattr(_local, key, None)
    if c is None:
        c = zstandard.ZstdCompressor(level=level, write_checksum=False)
        setattr(_local, key, c)
    return c


def _worth_trying(chunks: Sequence[Buffer], level: int, threads: int) -> npt.NDArray[np.bool_]:
    """Which chunks may compress: for chunks of 16 KiB and more, zstd first sees a 4 KiB
    sample (8 slices of 512 bytes spread over the chunk) and only a sample that shrinks
    by 1/16 earns the whole chunk a try. Random data thus costs ~1/16 of a full attempt;
    a chunk that is random exactly where sampled and compressible elsewhere is stored raw
    (space, never correctness). Smaller chunks are always tried. In a batch of many big
    chunks, a few scouts are sampled first, and a batch whose scouts all fail is stored
    raw whole: random memory then costs ~1/8 of sampling every chunk, and a compressible
    chunk among incompressible scouts is stored raw (space again, never correctness)."""
    n = len(chunks)
    big = [i for i in range(n) if len(chunks[i]) >= SAMPLE_MIN]
    worth = np.ones(n, dtype=bool)
    if not big:
        return worth
    if len(big) >= 2 * SCOUT_STRIDE:
        # Scouts first: every SCOUT_STRIDE-th big chunk. When none of them compresses
        # (a batch of random or already-compressed pages, the costly case), the whole
        # batch is stored raw without sampling the rest.
        scouts = big[::SCOUT_STRIDE]
        if not _samples_shrink(chunks, scouts, level).any():
            worth[big] = False
            return worth
    worth[big] = _samples_shrink(chunks, big, level)
    return worth


def _samples_shrink(
    chunks: Sequence[Buffer], which: list[int], level: int
) -> npt.NDArray[np.bool_]:
    samples: list[Buffer] = []
    for i in which:
        mv = memoryview(chunks[i]).cast("B")
        step = (len(mv) - 512) // 7
        samples.append(b"".join([mv[k * step : k * step + 512] for k in range(8)]))
    # One thread: the samples are 4 KiB each, starting zstd's workers would cost more.
    out = _cctx(level).multi_compress_to_buffer(samples, threads=1)
    return np.fromiter((len(out[j]) < 4096 - 256 for j in range(len(which))), bool, len(which))


def immutable(c: Buffer) -> bool:
    return isinstance(c, bytes) or (
        isinstance(c, memoryview) and c.readonly and isinstance(c.obj, bytes)
    )


def compress_batch(
    chunks: Sequence[Buffer], level: int = 1, threads: int = 0
) -> tuple[npt.NDArray[np.uint8], list[Buffer]]:
    """Compress a batch in one call (zstd's C threads, GIL released); return (methods,
    blobs), choosing raw where zstd saves less than 1/32 (or a sample says it would).
    A raw blob is the caller's own buffer (no copy here): `PackWriter.add` takes a copy
    of any that could change (a view of a mutable buffer), into its arena if it has one.
    A read-only view of a `bytes` object (an upload's chunks, sliced from the message)
    cannot change and keeps its object alive: it is kept as is."""
    n = len(chunks)
    methods = np.full(n, METHOD_RAW, dtype=np.uint8)
    blobs: list[Buffer] = list(chunks)
    tries = np.flatnonzero(_worth_trying(chunks, level, threads)) if n else np.zeros(0, int)
    if tries.size:
        out = _cctx(level).multi_compress_to_buffer(
            [chunks[int(i)] for i in tries], threads=threads or 1
        )
        for j, i in enumerate(tries.tolist()):
            c, raw_len = out[j], len(chunks[i])
            if len(c) + (raw_len >> 5) < raw_len:
                methods[i] = METHOD_ZSTD
                blobs[i] = c.tobytes()
    _unpin(blobs)
    return methods, blobs


def _unpin(blobs: list[Buffer]) -> None:
    """A view kept in an open pack pins its whole message until the pack is written.
    Keep views only where they hold at least half of their message (the usual case: an
    upload carries only missing chunks); copy the others, so a message whose chunks were
    mostly compressed or already stored is not held for a few raw chunks."""
    kept: dict[int, int] = {}
    for b in blobs:
        if isinstance(b, memoryview) and immutable(b):
            kept[id(b.obj)] = kept.get(id(b.obj), 0) + b.nbytes
    for i, b in enumerate(blobs):
        if (
            isinstance(b, memoryview)
            and id(b.obj) in kept
            and 2 * kept[id(b.obj)] < memoryview(b.obj).nbytes
        ):
            blobs[i] = bytes(b)


_THREADS = max(1, min(4, os.cpu_count() or 1))  # os.cpu_count reads /sys: once


def default_threads() -> int:
    return _THREADS


# -- decoding -------------------------------------------------------------------------


def _dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def decode_chunk(
    method: int,
    blob: bytes,
    raw_len: int,
    chunk_id: bytes,
    where: str,
    sealer: Sealer | None = None,
    namespace: str = "",
) -> bytes:
    """Decrypt (sealed blobs), decompress a blob and check its BLAKE3 against its id;
    DataCorrupted otherwise."""
    data = check_chunk(method, blob, raw_len, chunk_id, where, sealer, namespace)
    return data if isinstance(data, bytes) else bytes(data)


def check_chunk(
    method: int,
    blob: Buffer,
    raw_len: int,
    chunk_id: bytes,
    where: str,
    sealer: Sealer | None = None,
    namespace: str = "",
) -> Buffer:
    """decode_chunk of a blob that may be a view, whose plain bytes come back as they
    are (a raw blob: the view itself), so that a whole pack's check slices no copies."""
    if method & METHOD_SEALED:
        if sealer is None:
            raise DataCorrupted("chunk", chunk_id.hex(), f"in {where}: encrypted, no store key")
        blob = sealer.open_chunk(namespace, chunk_id, blob, where)
        method &= ~METHOD_SEALED
    if method == METHOD_RAW:
        data = blob
    elif method == METHOD_ZSTD:
        try:
            # A damaged frame header can declare any size, and decompress() allocates
            # what the frame declares before max_output_size applies: check it first.
            declared = zstandard.frame_content_size(blob)
            if declared not in (-1, raw_len):
                raise DataCorrupted(
                    "chunk", chunk_id.hex(), f"in {where}: frame declares {declared} bytes"
                )
            data = _dctx().decompress(blob, max_output_size=raw_len)
        except zstandard.ZstdError as e:
            raise DataCorrupted("chunk", chunk_id.hex(), f"in {where}: {e}") from None
    else:
        raise DataCorrupted("chunk", chunk_id.hex(), f"in {where}: unknown method {method}")
    if len(data) != raw_len or digest(data) != chunk_id:
        raise DataCorrupted("chunk", chunk_id.hex(), f"in {where}: content does not match id")
    return data
