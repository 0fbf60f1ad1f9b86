"""Reading a page stream (`PageData`, common.proto) into whole pages, client side.

ReadGeneration (export) and DownloadPages (restore) send, per member, a header and then
batches of page entries with the chunks they name. `read_members` assembles each
member's regions as (page offsets, page bytes, zero mask), ready for an image writer or
process_vm_writev. Every chunk is re-hashed (BLAKE3) against its id on arrival, so what
is written is what the store committed. Vectorised: one gather over all pages of a
region, no Python loop per page.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import blake3
import numpy as np
import numpy.typing as npt
import zstandard

from cpcoord.anonmem import huge_map
from cpcoord.errors import DataCorrupted, InvalidArgument
from cpcoord.gen.v1 import common_pb2

ID = 32
ZERO_ID = bytes(ID)
ID_DTYPE = np.dtype("V32")


@dataclass(frozen=True)
class RegionPages:
    name: str
    start: int
    end: int
    pages: npt.NDArray[np.uint64]  # sorted page offsets from start
    data: npt.NDArray[np.uint8]  # (len(pages), page_size)
    zero: npt.NDArray[np.bool_]  # per page: all zero (a ZERO entry)


@dataclass(frozen=True)
class MemberPages:
    header: common_pb2.PagesHeader
    regions: tuple[RegionPages, ...]

    @property
    def name(self) -> str:
        return self.header.member


@dataclass
class _Acc:
    header: common_pb2.PagesHeader
    cols: dict[int, list[tuple[bytes, bytes, bytes, bytes]]] = field(default_factory=dict)
    ids: list[bytes] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)


def _check_chunks(c: common_pb2.ChunkData, acc: _Acc) -> None:
    # Each read of a bytes field copies it: read every column once.
    ids, methods, blob = c.ids, c.methods, c.data
    n = len(ids) // ID
    if len(ids) % ID or len(methods) != n or len(c.raw_sizes) != 4 * n:
        raise InvalidArgument("page stream: chunk columns disagree")
    raw = np.frombuffer(c.raw_sizes, dtype="<u4")
    stored = np.frombuffer(c.stored_sizes, dtype="<u4")
    ends = np.cumsum(stored.astype(np.int64))
    if stored.size != n or (n and int(ends[-1]) != len(blob)):
        raise InvalidArgument("page stream: chunk sizes disagree with the data")
    data = memoryview(blob)
    for i in range(n):  # per chunk, not per page
        cid = ids[i * ID : (i + 1) * ID]
        chunk = bytes(data[int(ends[i] - stored[i]) : int(ends[i])])
        if methods[i] == 1:
            chunk = zstandard.ZstdDecompressor().decompress(chunk, max_output_size=int(raw[i]))
        if len(chunk) != raw[i] or blake3.blake3(chunk).digest() != cid:
            raise DataCorrupted("chunk", cid.hex(), "its bytes do not match its id in transit")
        acc.ids.append(cid)
        acc.blobs.append(chunk)


HUGE_MIN = 8 << 20  # a region's pages at least this big get huge pages


def _pages(n: int, ps: int) -> npt.NDArray[np.uint8]:
    """Zeroed rows for `n` pages. Big ones are mapped here with transparent huge pages
    asked for (the kernel's default here is `madvise`): a restore writes them into the
    target with process_vm_writev, which walks this side's page tables as it copies,
    and filling them takes 512x fewer faults."""
    nbytes = n * ps
    if nbytes < HUGE_MIN:
        return np.zeros((n, ps), dtype=np.uint8)
    mm = huge_map(nbytes)  # freed with the last view of it
    return np.frombuffer(mm, dtype=np.uint8).reshape(n, ps)


def _copy_entries(
    flat: npt.NDArray[np.uint8],
    blobs: Sequence[bytes],
    ps: int,
    chunk: npt.NDArray[np.int64],
    skip: npt.NDArray[np.int64],
    count: npt.NDArray[np.int64],
    row: npt.NDArray[np.int64],
) -> None:
    """Entry i's `count[i]` pages, from page `skip[i]` of chunk `chunk[i]`, into rows
    `row[i]...` of `flat`: one copy per entry (a chunk at most), straight from the
    chunks. Joining the chunks first and gathering rows from that took two copies, both
    into fresh memory: a full rollback of 1 GiB was 7.8 s from call to restored, 2.5 s
    with this (BENCHMARKS.md)."""
    for c, sk, n, r in zip(
        chunk.tolist(), skip.tolist(), count.tolist(), row.tolist(), strict=True
    ):
        src = np.frombuffer(blobs[c], dtype=np.uint8, count=n * ps, offset=sk * ps)
        flat[r * ps : (r + n) * ps] = src


def _finish(acc: _Acc) -> MemberPages:
    ps = acc.header.page_size
    if ps < 512 or ps & (ps - 1):
        raise InvalidArgument(f"page stream: bad page size {ps}")
    sizes = np.array([len(b) for b in acc.blobs], dtype=np.int64)
    if np.any(sizes % ps):
        raise InvalidArgument("page stream: a chunk is not a whole number of pages")
    ids = np.frombuffer(b"".join(acc.ids), dtype=ID_DTYPE)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    regions = []
    for ri, r in enumerate(acc.header.regions):
        parts = acc.cols.get(ri, [])
        offs = np.frombuffer(b"".join(p[0] for p in parts), dtype="<u8").astype(np.uint64)
        counts = np.frombuffer(b"".join(p[1] for p in parts), dtype="<u4").astype(np.int64)
        skips = np.frombuffer(b"".join(p[2] for p in parts), dtype="<u4").astype(np.int64)
        eids = np.frombuffer(b"".join(p[3] for p in parts), dtype=ID_DTYPE)
        n = int(counts.sum())
        entry = np.repeat(np.arange(offs.size), counts)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        within = np.arange(n, dtype=np.int64) - starts[entry]
        pages = offs[entry] + within.astype(np.uint64)
        if pages.size > 1 and np.any(pages[1:] <= pages[:-1]):
            raise InvalidArgument(f"page stream: region {r.name}: entries not ascending")
        if pages.size and int(pages[-1]) >= (r.end - r.start) // ps:
            raise InvalidArgument(f"page stream: region {r.name}: an entry is past its end")
        ezero = eids == np.frombuffer(ZERO_ID, dtype=ID_DTYPE)[0]
        zero = ezero[entry]
        data = _pages(n, ps)
        nz = np.flatnonzero(~ezero)  # entries with bytes
        if nz.size:
            want = eids[nz]
            pos = np.minimum(np.searchsorted(sorted_ids, want), max(sorted_ids.size - 1, 0))
            if sorted_ids.size == 0 or np.any(sorted_ids[pos] != want):
                raise InvalidArgument(f"page stream: region {r.name} names a chunk never sent")
            ci = order[pos]
            if np.any(skips[nz] + counts[nz] > sizes[ci] // ps):
                raise InvalidArgument(f"page stream: region {r.name} reads past a chunk")
            _copy_entries(data.reshape(-1), acc.blobs, ps, ci, skips[nz], counts[nz], starts[nz])
        regions.append(RegionPages(r.name, r.start, r.end, pages, data, zero))
    return MemberPages(acc.header, tuple(regions))


# Per batch of a stream (in order): its chunks' ids and plain bytes, already checked
# against their ids by whoever read them (the direct read path); None: the batch's own
# ChunkData, checked here.
Checked = Sequence[tuple[list[bytes], list[bytes]] | None]


def read_members(
    messages: Iterable[common_pb2.PageData], checked: Checked | None = None
) -> Iterator[MemberPages]:
    """Assemble the stream member by member (a member ends at the next header);
    `checked`: the chunks of each batch, read and checked elsewhere (Checked)."""
    acc: _Acc | None = None
    nbatch = 0
    for msg in messages:
        kind = msg.WhichOneof("body")
        if kind == "header":
            if acc is not None:
                yield _finish(acc)
            acc = _Acc(msg.header)
        elif kind == "batch":
            if acc is None:
                raise InvalidArgument("page stream: a batch before any header")
            b = msg.batch
            if b.region >= len(acc.header.regions):
                raise InvalidArgument(f"page stream: batch for unknown region {b.region}")
            e = b.entries
            acc.cols.setdefault(b.region, []).append(
                (e.page_offsets, e.page_counts, e.chunk_skips, e.chunk_ids)
            )
            got = checked[nbatch] if checked is not None else None
            nbatch += 1
            if got is None:
                _check_chunks(b.chunks, acc)
            else:
                acc.ids += got[0]
                acc.blobs += got[1]
    if acc is not None:
        yield _finish(acc)
