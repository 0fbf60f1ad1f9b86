"""Packs: append-only files holding many chunks, each zstd-compressed or raw, with a
trailer that lists them, so the index can always be rebuilt from the packs alone.

Layout of a pack (all integers little-endian):

    pack    = header blob* trailer tail
    header  = "CPPK" version:u8 reserved:3 bytes (zero), then zeros     4096 bytes
              up to one page (version 3; versions 1 and 2: the first 8 bytes only)
    blob    = the stored bytes of one chunk; blob i starts at len(header) + sum(stored[:i])
    trailer = ns_len:u16 namespace:utf8 count:u32 entry{count} checksum:32
    entry   = id:32 method:u8 stored:u32 raw:u32                        41 bytes
    tail    = trailer_len:u32 "CPPT"                                   8 bytes

  method 0 = raw (stored == raw), 1 = one zstd frame (stored < raw). A chunk is stored
  raw when zstd saves less than 1/32 of its size, or when a 4 KiB sample of it does not
  compress (see _worth_trying): random data then costs neither a full compression
  attempt on ingest nor decompression on read, and the trailer says which it is.
  checksum = BLAKE3-256 of the trailer bytes before it; trailer_len counts ns_len through
  checksum. The header's length follows from the trailer and the pack's size (whatever
  the blobs and trailer leave must be 8 or 4096 bytes), so the trailer alone locates
  every blob.

Why a header of one page (version 3): chunks are runs of whole pages, so a pack of raw
chunks written behind an 8-byte header put every blob 8 bytes off a page boundary, and
every copy of it ran misaligned: the kernel's copy into tmpfs pages (a node cache) and
the copy into a pack arena. Measured here, writev of 512 MiB from page-aligned memory
into a tmpfs file costs 0.09-0.11 CPU s at a page-aligned file offset and 0.24-0.33 s at
offset 8 (two writers at once); in the checkpoint it was a quarter of the agents' CPU.
The page costs 4 KiB per pack (packs are 16 or 64 MiB).

The pack id (and object name), by version (`pack_id_of`):
  3 (written now): as version 2, over the page-long header.
  2: BLAKE3-256 of
      header || every blob that is not raw, in order || XXH3-128 of the raw blobs
      (method 0) in order || trailer || tail.
    A raw blob is the chunk's plain bytes, whose BLAKE3 is the chunk id the trailer
    names and every read checks (`decode_chunk`); hashing it with BLAKE3 a second time
    into the pack id cost ~0.17 CPU s per 512 MiB of random memory, XXH3 ~0.04. The
    name still changes with every byte of the pack, so it names one content: an agent
    that put wrong bytes and then the right ones gets two names (the coordinator's
    record of a lying pack is by name), and `verify_pack` finds any bit flip by the
    name alone. XXH3 is no defence against a forger, and needs none: a raw blob that is
    not its chunk's bytes fails its chunk id on every read.
  1: BLAKE3-256 of the whole file (read and checked as before).

A pack belongs to one dedup namespace (written in its trailer). PackWriter buffers one
pack in memory (up to the target size) and seals it into bytes for one whole-object put.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import blake3
import numpy as np
import numpy.typing as npt
import xxhash

from cpcoord.errors import DataCorrupted, InvalidArgument
from storecore.arena import Arena
from storecore.backend import Backend, Buffer, Kind
from storecore.compress import (
    METHOD_RAW,
    METHOD_SEALED,
    METHOD_ZSTD,
    check_chunk,
    immutable,
)
from storecore.compress import decode_chunk as decode_chunk  # callers read it from here
from storecore.crypt import Sealer
from storecore.ids import ID_DTYPE, IdArray, PackId, digest, digest_all

HEADER_BYTES = 4096  # one page: blobs of whole pages stay page-aligned (module docstring)
HEADER = b"CPPK\x03\x00\x00\x00".ljust(HEADER_BYTES, b"\x00")  # what PackWriter writes
HEADER_V2 = b"CPPK\x02\x00\x00\x00"
HEADER_V1 = b"CPPK\x01\x00\x00\x00"
MIN_HEADER = len(HEADER_V2)  # the shortest header a readable pack has (versions 1, 2)


def _header_page() -> memoryview:
    """HEADER in a page of its own: a borrowed pack's parts are then whole pages where
    they lie up to the first compressed blob, and go to disk with O_DIRECT as they are
    (storecore/directio.py)."""
    page = mmap.mmap(-1, HEADER_BYTES)
    page[:] = HEADER
    return memoryview(page).toreadonly()


HEADER_PAGE = _header_page()
TAIL_MAGIC = b"CPPT"
SEAL_OVERHEAD = 28  # nonce + tag
MAX_CHUNK_BYTES = 4 << 20  # a run of up to 1024 pages; bounds memory per chunk
MAX_NAMESPACE = 255
# Packed on disk (no alignment): 41 bytes per entry.
ENTRY_DTYPE = np.dtype([("id", ID_DTYPE), ("method", "u1"), ("stored", "<u4"), ("raw", "<u4")])
# In memory, with the blob's offset in the pack added.
LOCATED_DTYPE = np.dtype(
    [("id", ID_DTYPE), ("method", "u1"), ("stored", "<u4"), ("raw", "<u4"), ("offset", "<u4")]
)
_TAIL = struct.Struct("<I4s")

Entries = npt.NDArray[np.void]


@dataclass(frozen=True)
class PackContents:
    """What a pack's trailer says: its namespace and located entries (LOCATED_DTYPE)."""

    namespace: str
    entries: Entries

    @property
    def blob_bytes(self) -> int:
        return int(self.entries["stored"].sum(dtype=np.uint64))


@dataclass(frozen=True)
class SealedPack:
    id: PackId
    data: bytes
    contents: PackContents


@dataclass(frozen=True)
class SealedParts:
    """A sealed pack as the parts that make it up, back to back (PackWriter.seal_parts)."""

    id: PackId
    parts: list[Buffer]
    size: int
    contents: PackContents


# -- writing --------------------------------------------------------------------------


class PackWriter:
    """Accumulates chunks of one namespace; `seal()` returns the finished pack."""

    def __init__(self, namespace: str, arena: Arena | None = None, borrow: bool = False) -> None:
        ns = namespace.encode()
        if len(ns) > MAX_NAMESPACE:
            raise InvalidArgument(f"namespace {namespace!r} is longer than {MAX_NAMESPACE}")
        self.namespace = namespace
        self.arena = arena  # where the pack is laid out (storecore/arena.py)
        self.borrow = borrow  # blobs kept as given (writer.py, "Borrowed blobs")
        self._blobs: list[Buffer] = [HEADER_PAGE]
        self._entries: list[Entries] = []
        self._size = len(HEADER)
        # Whether the pack so far lies whole in the arena, back to back from its start:
        # then the sealed pack is one page-aligned buffer (`seal_parts`).
        self._flat = arena is not None and arena.pos == 0 and arena.take(HEADER) is not None

    @property
    def size(self) -> int:
        return self._size

    @property
    def count(self) -> int:
        return sum(len(e) for e in self._entries)

    def add(
        self,
        ids: IdArray,
        methods: npt.NDArray[np.uint8],
        blobs: Sequence[Buffer],
        raw_sizes: npt.NDArray[np.integer],
    ) -> None:
        e = np.zeros(len(blobs), dtype=ENTRY_DTYPE)
        e["id"] = ids
        e["method"] = methods
        e["stored"] = [len(b) for b in blobs]
        e["raw"] = raw_sizes
        self._entries.append(e)
        # Own the bytes, the caller may reuse its buffers (unless the writer borrows).
        self._blobs.extend(blobs if self.borrow else [self._own(b) for b in blobs])
        self._size += int(e["stored"].sum(dtype=np.uint64))

    def _own(self, b: Buffer) -> Buffer:
        """`b`, or a copy of it where it could change. While the pack lies flat in the
        arena every blob is copied there, immutable ones too (they are the few that
        compressed: a small copy, and it spares the write a bounce copy of the whole)."""
        if self.arena is not None and (self._flat or not immutable(b)):
            v = self.arena.take(b)
            if v is not None:
                return v
            self._flat = False
        return b if immutable(b) else bytes(b)

    def release(self) -> None:
        """Drop the blobs (after the pack is stored): its arena may then be reused."""
        self._blobs = []

    def seal(self) -> SealedPack:
        parts = self.seal_parts()
        data = b"".join(parts.parts)
        return SealedPack(parts.id, data, parts.contents)

    def seal_parts(self) -> SealedParts:
        """The finished pack as its parts (header, blobs, trailer, tail), not joined:
        the pack id is hashed over them in order, and a backend with `put_parts` writes
        them without building the whole pack in fresh memory first."""
        entries = np.concatenate(self._entries) if self._entries else np.zeros(0, ENTRY_DTYPE)
        ns = self.namespace.encode()
        body = b"".join(
            [struct.pack("<H", len(ns)), ns, struct.pack("<I", len(entries)), entries.tobytes()]
        )
        trailer = body + digest(body)
        parts = [*self._blobs, trailer, _TAIL.pack(len(trailer), TAIL_MAGIC)]
        size = self._size + len(trailer) + _TAIL.size
        pid = _v2_id(HEADER, self._blobs[1:], entries["method"].tolist(), parts[-2:])
        if self._flat and self._flatten(parts[-2:]):
            parts = [self._arena().span(0, size)]
        contents = PackContents(self.namespace, _locate(entries, len(HEADER)))
        return SealedParts(pid, parts, size, contents)

    def _arena(self) -> Arena:
        assert self.arena is not None
        return self.arena

    def _flatten(self, tail: list[Buffer]) -> bool:
        """Append the trailer and tail to the flat arena (once: a second seal finds
        them there); False when they do not fit."""
        a = self._arena()
        if a.pos == self._size and any(a.take(t) is None for t in tail):
            self._flat = False
            return False
        return a.pos == self._size + sum(len(t) for t in tail)


def _locate(entries: Entries, header_len: int) -> Entries:
    out = np.zeros(len(entries), dtype=LOCATED_DTYPE)
    if not len(entries):
        return out
    for f in ENTRY_DTYPE.names or ():
        out[f] = entries[f]
    stored = entries["stored"].astype(np.uint64)
    out["offset"] = header_len + np.concatenate([[0], np.cumsum(stored)[:-1]]).astype(np.uint64)
    return out


# -- reading --------------------------------------------------------------------------


def parse_trailer(tail: bytes, total_size: int, where: str) -> PackContents:
    """Parse a pack's trailer from the last `len(tail)` bytes of a `total_size`-byte pack.
    Raises DataCorrupted on any inconsistency."""
    return _parse_trailer(tail, total_size, where)[0]


def trailer_of(data: Buffer, where: str) -> PackContents:
    """The trailer of a whole pack's bytes (a mapped file, say): only the trailer is
    copied out of them."""
    return _trailer_of(memoryview(data).cast("B"), where)[0]


def _trailer_of(view: memoryview, where: str) -> tuple[PackContents, int]:
    """trailer_of, and the length of the header that the pack's size leaves."""
    n = view.nbytes
    if n < _TAIL.size:
        raise DataCorrupted("pack", where, "too short to be a pack")
    tlen, _ = _TAIL.unpack_from(view, n - _TAIL.size)
    return _parse_trailer(bytes(view[max(0, n - _TAIL.size - tlen) :]), n, where)


def _parse_trailer(tail: bytes, total_size: int, where: str) -> tuple[PackContents, int]:
    """parse_trailer, and the length of the header that the pack's size leaves."""
    bad = lambda why: DataCorrupted("pack", where, why)  # noqa: E731
    if len(tail) < _TAIL.size or total_size < MIN_HEADER + _TAIL.size:
        raise bad("too short to be a pack")
    tlen, magic = _TAIL.unpack_from(tail, len(tail) - _TAIL.size)
    if magic != TAIL_MAGIC:
        raise bad("no trailer magic (truncated?)")
    if tlen < 2 + 4 + 32 or tlen + _TAIL.size + MIN_HEADER > total_size:
        raise bad(f"trailer length {tlen} does not fit the pack")
    if tlen + _TAIL.size > len(tail):
        raise bad("trailer not inside the bytes given")
    trailer = tail[len(tail) - _TAIL.size - tlen : len(tail) - _TAIL.size]
    body, checksum = trailer[:-32], trailer[-32:]
    if digest(body) != checksum:
        raise bad("trailer checksum mismatch")
    (ns_len,) = struct.unpack_from("<H", body, 0)
    if 2 + ns_len + 4 > len(body):
        raise bad("namespace overruns the trailer")
    try:
        namespace = body[2 : 2 + ns_len].decode()
    except UnicodeDecodeError:
        raise bad("namespace is not UTF-8") from None
    (count,) = struct.unpack_from("<I", body, 2 + ns_len)
    start = 2 + ns_len + 4
    if len(body) - start != count * ENTRY_DTYPE.itemsize:
        raise bad(f"trailer holds {len(body) - start} entry bytes for {count} entries")
    entries = np.frombuffer(body, dtype=ENTRY_DTYPE, count=count, offset=start)
    sealed = (entries["method"] & METHOD_SEALED) != 0
    m, raw = entries["method"] & ~np.uint8(METHOD_SEALED), entries["raw"]
    st = entries["stored"].astype(np.int64) - np.where(sealed, SEAL_OVERHEAD, 0)
    if np.any((m != METHOD_RAW) & (m != METHOD_ZSTD)):
        raise bad("unknown compression method")
    if np.any((raw == 0) | (raw > MAX_CHUNK_BYTES) | (st <= 0)):
        raise bad("chunk size out of bounds")
    if np.any((m == METHOD_RAW) & (st != raw)) or np.any((m == METHOD_ZSTD) & (st >= raw)):
        raise bad("stored size contradicts the method")
    header_len = total_size - int(entries["stored"].sum(dtype=np.uint64)) - tlen - _TAIL.size
    if header_len not in (MIN_HEADER, len(HEADER)):
        raise bad("blob sizes do not add up to the pack size")
    return PackContents(namespace, _locate(entries, header_len)), header_len


TAIL_READ = 64 << 10  # bytes read from a pack's end for its trailer (one read, usually)


def read_sized_contents(backend: Backend, name: str) -> tuple[int, PackContents]:
    """(size, trailer) of a stored pack: with a backend's `get_tail`, size and the last
    TAIL_READ bytes come from one request (S3: no HEAD before the ranged GET)."""
    get_tail = getattr(backend, "get_tail", None)
    if get_tail is None:
        size = backend.stat(Kind.PACKS, name).size
        return size, read_contents(backend, name, size)
    size, tail = get_tail(Kind.PACKS, name, TAIL_READ)
    return size, read_contents(backend, name, size, tail)


def read_contents(
    backend: Backend, name: str, size: int | None = None, tail: bytes | None = None
) -> PackContents:
    """Read only the trailer of a stored pack (one or two ranged reads; `tail`: its last
    bytes, already read)."""
    if size is None:
        size = backend.stat(Kind.PACKS, name).size
    if tail is None:
        want = min(size, TAIL_READ)
        tail = backend.get_range(Kind.PACKS, name, size - want, want)
    want = len(tail)
    if len(tail) >= _TAIL.size:
        tlen, _ = _TAIL.unpack_from(tail, len(tail) - _TAIL.size)
        need = tlen + _TAIL.size
        if want < need <= size - MIN_HEADER:
            tail = backend.get_range(Kind.PACKS, name, size - need, need)
    return parse_trailer(tail, size, name)


def _v2_id(
    header: bytes, blobs: Sequence[Buffer], methods: list[int], tail: Sequence[Buffer]
) -> PackId:
    """The version-2 (and 3) id of a pack (module docstring): its header, its blobs and
    their methods in order, then its trailer and tail."""
    h, x = blake3.blake3(header), xxhash.xxh3_128()
    for b, m in zip(blobs, methods, strict=True):
        (x if m == METHOD_RAW else h).update(b)
    h.update(x.digest())
    for t in tail:
        h.update(t)
    return PackId(h.digest())


def pack_id_of(data: Buffer) -> PackId:
    """The id a pack's bytes give, by the version in its header (module docstring). Bytes
    that are no pack of a known version (or whose trailer does not parse) give the hash
    of all of them, which no name of a version-2 pack matches."""
    view = memoryview(data).cast("B")
    n = view.nbytes
    head = bytes(view[: len(HEADER)])
    header = HEADER if head == HEADER else HEADER_V2 if head[:MIN_HEADER] == HEADER_V2 else None
    if header is None or n < len(header) + _TAIL.size:
        return PackId.of(view)
    try:
        contents, header_len = _trailer_of(view, "pack")
    except DataCorrupted:
        return PackId.of(view)
    if header_len != len(header):
        return PackId.of(view)  # a header of one version, blobs laid out for another
    entries = contents.entries
    start = header_len + contents.blob_bytes  # the trailer's first byte
    offsets, stored = entries["offset"].tolist(), entries["stored"].tolist()
    blobs = [view[o : o + s] for o, s in zip(offsets, stored, strict=True)]
    return _v2_id(header, blobs, entries["method"].tolist(), [view[start:]])


def verify_pack(data: Buffer, name: str, sealer: Sealer | None = None) -> PackContents:
    """Full check of a pack's bytes: its id equals its name, trailer parses, every chunk
    decodes to its id. Returns its contents; DataCorrupted on the first defect."""
    if pack_id_of(data).format() != name.rsplit("/", 1)[-1]:
        raise DataCorrupted("pack", name, "content hash does not match its name")
    contents = trailer_of(data, name)
    for chunk_id, blob, e in iter_blobs(data, contents.entries):
        check_chunk(
            int(e["method"]), blob, int(e["raw"]), chunk_id, name, sealer, contents.namespace
        )
    return contents


def iter_blobs(data: Buffer, entries: Entries) -> list[tuple[bytes, memoryview, np.void]]:
    """(id, stored bytes, entry) of each entry: views of a whole pack's bytes (a slice
    of `bytes` is a copy, the whole pack again)."""
    view = memoryview(data).cast("B")
    raw_ids = np.ascontiguousarray(entries["id"]).tobytes()
    out = []
    for i, e in enumerate(entries):
        off, st = int(e["offset"]), int(e["stored"])
        out.append((raw_ids[32 * i : 32 * i + 32], view[off : off + st], e))
    return out


def check_chunks(ids: IdArray, chunks: Sequence[Buffer]) -> IdArray:
    """BLAKE3 of every chunk; returns the actual ids (compare with the claimed ones)."""
    too_big = [len(c) for c in chunks if not 0 < len(c) <= MAX_CHUNK_BYTES]
    if too_big:
        raise InvalidArgument(f"chunk of {too_big[0]} bytes: sizes must be 1..{MAX_CHUNK_BYTES}")
    return digest_all(chunks)
