"""Content ids of the store: chunk ids, pack ids, the ZERO marker, and id arrays.

A ChunkId is the BLAKE3-256 of a chunk's plain (uncompressed) bytes; a PackId is the
BLAKE3-256 of a whole pack file. Both format as 64 lowercase hex digits and parse back.

The ZERO marker (32 zero bytes) stands for all-zero pages in manifests and is never
stored: no BLAKE3 output is all zeros in practice (2^-256), so it cannot name real content.

Hot paths never build one Python object per chunk: they carry ids as NumPy arrays of
dtype `V32` (IdArray), which sort, search and compare bytewise (memcmp order). Index an
IdArray element with `.tobytes()`; `ids_to_bytes` converts a whole array.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import blake3
import numpy as np
import numpy.typing as npt

from cpcoord.errors import InvalidArgument

ID_SIZE = 32
ID_DTYPE = np.dtype("V32")
ZERO_BYTES = bytes(ID_SIZE)
_HEX = re.compile(r"[0-9a-f]{64}")

IdArray = npt.NDArray[np.void]
Buffer = bytes | bytearray | memoryview


def digest(data: Buffer) -> bytes:
    """BLAKE3-256 of data."""
    return blake3.blake3(data).digest()


def _parse_hex(text: str, what: str) -> bytes:
    t = text.strip().lower()
    if not _HEX.fullmatch(t):
        raise InvalidArgument(f"bad {what} {text!r}: expected 64 hex digits")
    return bytes.fromhex(t)


@dataclass(frozen=True, order=True)
class ChunkId:
    """BLAKE3-256 of a chunk's plain content (or the ZERO marker)."""

    digest: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != ID_SIZE:
            raise InvalidArgument(f"chunk id must be {ID_SIZE} bytes, got {len(self.digest)}")

    @classmethod
    def of(cls, data: Buffer) -> ChunkId:
        return cls(digest(data))

    @classmethod
    def parse(cls, text: str) -> ChunkId:
        return cls(_parse_hex(text, "chunk id"))

    def format(self) -> str:
        return self.digest.hex()

    @property
    def is_zero(self) -> bool:
        return self.digest == ZERO_BYTES

    def __str__(self) -> str:
        return self.format()


ZERO = ChunkId(ZERO_BYTES)


@dataclass(frozen=True, order=True)
class PackId:
    """A pack's id, also its object name (hex): BLAKE3-256 of the pack's bytes but its
    blobs (version 2), or of the whole file (version 1): `packs.pack_id_of`. `of`
    hashes the bytes given, whole."""

    digest: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != ID_SIZE:
            raise InvalidArgument(f"pack id must be {ID_SIZE} bytes, got {len(self.digest)}")

    @classmethod
    def of(cls, data: Buffer) -> PackId:
        return cls(digest(data))

    @classmethod
    def parse(cls, text: str) -> PackId:
        return cls(_parse_hex(text, "pack id"))

    def format(self) -> str:
        return self.digest.hex()

    def __str__(self) -> str:
        return self.format()


# -- id arrays ----------------------------------------------------------------------


def empty_ids() -> IdArray:
    return np.zeros(0, dtype=ID_DTYPE)


def as_id_array(ids: Any) -> IdArray:
    """Accept an IdArray, an (n, 32) uint8 array, a buffer of n*32 bytes, or a sequence
    of 32-byte `bytes`/ChunkId; return a contiguous IdArray (no copy when already one)."""
    if isinstance(ids, np.ndarray):
        if ids.dtype == ID_DTYPE:
            return np.ascontiguousarray(ids)
        if ids.dtype == np.uint8 and ids.ndim == 2 and ids.shape[1] == ID_SIZE:
            return np.ascontiguousarray(ids).view(ID_DTYPE).reshape(-1)
        raise InvalidArgument(f"chunk ids: unsupported array of {ids.dtype} {ids.shape}")
    if isinstance(ids, bytes | bytearray | memoryview):
        buf = bytes(ids)
        if len(buf) % ID_SIZE:
            raise InvalidArgument(f"chunk ids: {len(buf)} bytes is not a multiple of 32")
        return np.frombuffer(buf, dtype=ID_DTYPE).copy()
    seq = list(ids)
    parts = [x.digest if isinstance(x, ChunkId) else bytes(x) for x in seq]
    bad = [len(p) for p in parts if len(p) != ID_SIZE]
    if bad:
        raise InvalidArgument(f"chunk ids must be 32 bytes each, got one of {bad[0]}")
    return np.frombuffer(b"".join(parts), dtype=ID_DTYPE).copy() if parts else empty_ids()


def ids_to_bytes(ids: IdArray) -> list[bytes]:
    raw = np.ascontiguousarray(ids).tobytes()
    return [raw[i : i + ID_SIZE] for i in range(0, len(raw), ID_SIZE)]


def zero_mask(ids: IdArray) -> npt.NDArray[np.bool_]:
    """True where an id is the ZERO marker."""
    return np.asarray(ids == np.frombuffer(ZERO_BYTES, dtype=ID_DTYPE)[0])


def digest_all(chunks: Sequence[Buffer]) -> IdArray:
    """BLAKE3-256 of each chunk, as an IdArray (one C call per chunk, no other objects)."""
    return np.frombuffer(b"".join([digest(c) for c in chunks]), dtype=ID_DTYPE).copy()


def _keys(ids: IdArray) -> npt.NDArray[np.uint64]:
    """The first 8 bytes of each id as a big-endian integer: their order is the ids'
    memcmp order, except among ids that share those 8 bytes."""
    return np.ascontiguousarray(ids).view(">u8")[::4].astype(np.uint64)


def _rows(ids: IdArray) -> npt.NDArray[np.uint64]:
    return np.ascontiguousarray(ids).view(np.uint64).reshape(-1, ID_SIZE // 8)


def sort_ids(ids: IdArray, unique: bool = False) -> IdArray:
    """`np.sort(ids)` (with unique: `np.unique(ids)`), the same memcmp order, ~10x faster:
    NumPy sorts V32 by a generic compare call per pair (NumPy 2.x), so this sorts by the
    first 8 bytes as an integer and falls back to the V32 sort only when two different
    ids share them (never by chance for BLAKE3 ids; an agent may craft such ids, which
    costs time, never correctness)."""
    ids = np.ascontiguousarray(ids)
    if ids.size < 2:
        return ids.copy()
    keys = _keys(ids)
    order = np.argsort(keys)
    out = np.take(ids, order)  # indexing V32 with an array is ~15x slower than take
    sk = np.take(keys, order)
    same_key = sk[1:] == sk[:-1]
    if same_key.any():
        rows = _rows(out)
        same = same_key & (rows[1:] == rows[:-1]).all(axis=1)
        if (same_key & ~same).any():  # ids that differ after 8 equal bytes
            return np.unique(ids) if unique else np.sort(ids)
        if unique:
            return np.compress(np.concatenate(([True], ~same)), out)
    return out


def first_of(ids: IdArray) -> npt.NDArray[np.bool_]:
    """True at the first occurrence of each id (`np.unique(ids, return_index=True)`'s
    indices as a mask), by the integer sort of sort_ids."""
    ids = np.ascontiguousarray(ids)
    first = np.ones(ids.size, dtype=bool)
    if ids.size < 2:
        return first
    keys = _keys(ids)
    order = np.argsort(keys, kind="stable")  # equal ids keep their order: the first wins
    sk = np.take(keys, order)
    same_key = sk[1:] == sk[:-1]
    if not same_key.any():
        return first
    rows = _rows(np.take(ids, order))
    same = same_key & (rows[1:] == rows[:-1]).all(axis=1)
    if (same_key & ~same).any():  # different ids with 8 equal bytes: the V32 way
        first[:] = False
        first[np.unique(ids, return_index=True)[1]] = True
        return first
    # Equal ids are adjacent in `order` only if no other id with their key sits between,
    # which `same_key & ~same` excluded.
    first[order[1:][same]] = False
    return first


def unique_ids(ids: IdArray) -> IdArray:
    """`np.unique(ids)` of an IdArray (sorted, unique), fast (sort_ids)."""
    return sort_ids(ids, unique=True)


def member_of(needles: IdArray, sorted_hay: IdArray) -> npt.NDArray[np.bool_]:
    """For each needle, whether it occurs in `sorted_hay` (sorted IdArray). O(n log m);
    np.isin on V32 sorts both sides, which is several times slower (search_ids)."""
    m = sorted_hay.size
    if m == 0 or needles.size == 0:
        return np.zeros(needles.shape, dtype=bool)
    needles = np.ascontiguousarray(needles)
    pos = search_ids(sorted_hay, needles)
    # np.take: indexing a V32 array with an index array is ~15x slower (NumPy 2.x)
    return np.asarray(np.take(sorted_hay, np.minimum(pos, m - 1)) == needles)


def search_ids(sorted_hay: IdArray, needles: IdArray) -> npt.NDArray[np.int64]:
    """Where each needle is in `sorted_hay` (np.searchsorted's left position for the
    needles it holds; for the others a position, maybe `len(sorted_hay)`, whose id is
    not theirs). The search runs on
    the ids' first 8 bytes as integers (_keys) unless the hay is much longer than the
    needles (then extracting its keys costs more than comparing V32 a few times each)."""
    m = sorted_hay.size
    if m == 0:
        return np.zeros(needles.size, dtype=np.int64)
    if m > 64 * needles.size:
        pos = np.searchsorted(sorted_hay, needles)
    else:
        hk, nk = _keys(sorted_hay), _keys(needles)
        pos = np.searchsorted(hk, nk)
        # Where two hay ids share the needle's key, the V32 search decides.
        nxt = np.minimum(pos + 1, m - 1)
        multi = np.flatnonzero(
            (pos + 1 < m) & (np.take(hk, np.minimum(pos, m - 1)) == nk) & (np.take(hk, nxt) == nk)
        )
        if multi.size:
            pos[multi] = np.searchsorted(sorted_hay, np.take(needles, multi))
    return np.asarray(pos, dtype=np.int64)


def chunk_ids_of(data: Buffer, chunk_bytes: int) -> tuple[IdArray, list[memoryview]]:
    """Cut `data` into chunks of `chunk_bytes` (the last may be shorter) and id them;
    all-zero chunks get the ZERO marker and are not hashed. Returns (ids, chunks).
    The zero test is vectorised over the whole buffer."""
    if chunk_bytes <= 0:
        raise InvalidArgument(f"chunk size must be positive, got {chunk_bytes}")
    mv = memoryview(data).cast("B")
    n = -(-len(mv) // chunk_bytes)
    chunks = [mv[i * chunk_bytes : (i + 1) * chunk_bytes] for i in range(n)]
    arr = np.frombuffer(mv, dtype=np.uint8)
    full = (len(mv) // chunk_bytes) * chunk_bytes
    nonzero = np.zeros(n, dtype=bool)
    if full:
        words = arr[:full].reshape(-1, chunk_bytes)
        nonzero[: full // chunk_bytes] = words.any(axis=1)
    if full < len(mv):
        nonzero[-1] = bool(arr[full:].any())
    ids = np.zeros(n, dtype=ID_DTYPE)
    idx = np.flatnonzero(nonzero)
    if idx.size:
        ids[idx] = digest_all([chunks[i] for i in idx])
    return ids, chunks
