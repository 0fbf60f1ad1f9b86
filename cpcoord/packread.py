"""The direct read path: the coordinator names where each chunk lies (PageBatch.locations:
pack, offset, sizes, method; no page byte) and the reader reads the packs from the store
itself (directory or S3) and checks every chunk before anything uses it. Readers: an
agent restoring (DownloadRequest.chunk_locations, the store it opened at the Welcome;
nodeagent/daemon/restore_ops.py) and a client exporting (ReadGenerationRequest.
chunk_locations, the store StoreStats names; cpcoord/readpath.py).

Reads are batched: the chunks of a whole download are sorted by (pack, offset) and
adjacent blobs of a pack (gaps up to GAP_BYTES, spans up to SPAN_BYTES) come with one
ranged read, a few spans at a time (READ_THREADS; S3 latency). Each chunk is then
opened (sealed: the store's key, AES-GCM), decompressed and its BLAKE3 compared with
its id (storecore.packs.decode_chunk); a mismatch is DataCorrupted naming the chunk and
the pack, and nothing of the download is used. The caller then reads through the
coordinator, saying why: the coordinator re-reads and re-checks the same chunks, so a
chunk that is damaged in the store still fails (a restore before the freeze), and one
the reader saw wrongly (a stale mount) is read right.
Per chunk, never per page: the pages are assembled by cpcoord.pagedata in NumPy.

Chunks the reader holds already (`LocalChunks`: an agent's staging still holds the
chunks of its member's last upload, nodeagent/upload/recent.py) are taken from there
when their bytes hash to their ids, and not read; any other bytes are read as above.

Cached packs (ChunkLocations.cached; a generation at level local, docs/multilevel.md):
an agent reads them from its own node cache. The coordinator never read such a pack, so
it names only the pack; the reader takes each chunk's offset, sizes and method from the
pack's trailer (one read per pack) and then reads and checks it like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from cpcoord import faults
from cpcoord.errors import DataCorrupted, InvalidArgument, StoreError
from cpcoord.gen.v1 import common_pb2
from storecore import packs
from storecore.backend import Backend, Kind
from storecore.crypt import Sealer
from storecore.ids import ID_DTYPE, IdArray, digest, search_ids

log = logging.getLogger(__name__)
GAP_BYTES = 256 << 10  # read over a gap this small rather than issue another read
SPAN_BYTES = 32 << 20  # one ranged read at most this long
READ_THREADS = 4
FAIL_POINT = "agent.restore.direct_read"  # cpcoord/faults.py: fails like a lost store
ID = 32
# Per batch with locations: its chunks' ids and plain bytes, checked; None for a batch
# without locations (a coordinator that sent the bytes: checked as usual).
Filled = list[tuple[list[bytes], list[bytes]] | None]


class LocalChunks(Protocol):
    """Bytes a reader may hold already (nodeagent/upload/recent.py), never trusted."""

    def get(self, want: IdArray) -> list[bytes | None]:
        """Per wanted id (V32 array): candidate bytes, or None."""
        ...


@dataclass(frozen=True)
class _Cols:
    """Every located chunk of a download, as columns (one row per chunk)."""

    batch: npt.NDArray[np.int64]
    ids: bytes
    pack: list[str]  # per chunk's pack index, the name
    pack_no: npt.NDArray[np.int64]
    offset: npt.NDArray[np.int64]
    stored: npt.NDArray[np.int64]
    raw: npt.NDArray[np.int64]
    method: npt.NDArray[np.uint8]
    namespace: list[str]  # per chunk's batch
    cached: set[int]  # pack numbers in the reader's node cache (ChunkLocations.cached)


def _columns(batches: Sequence[common_pb2.PageBatch]) -> _Cols:
    names: dict[str, int] = {}
    cached: set[int] = set()
    batch, ids, pno, off, st, raw, meth, ns = [], [], [], [], [], [], [], []
    for bi, b in enumerate(batches):
        loc = b.locations
        i = loc.ids
        n = len(i) // ID
        if not n:
            continue
        if (
            len(i) % ID or len(loc.pack_index) != 4 * n or len(loc.offsets) != 8 * n
            or len(loc.stored_sizes) != 4 * n or len(loc.raw_sizes) != 4 * n
            or len(loc.methods) != n
        ):  # fmt: skip
            raise InvalidArgument("page stream: chunk location columns disagree")
        local = np.frombuffer(loc.pack_index, dtype="<u4").astype(np.int64)
        if local.size and int(local.max()) >= len(loc.packs):
            raise InvalidArgument("page stream: a chunk location names no pack")
        glob = np.array([names.setdefault(p, len(names)) for p in loc.packs], dtype=np.int64)
        if loc.cached:
            if len(loc.cached) != len(loc.packs):
                raise InvalidArgument("page stream: cached flags disagree with the packs")
            cached.update(int(glob[i]) for i, f in enumerate(loc.cached) if f)
        batch.append(np.full(n, bi, dtype=np.int64))
        ids.append(i)
        pno.append(glob[local])
        off.append(np.frombuffer(loc.offsets, dtype="<u8").astype(np.int64))
        st.append(np.frombuffer(loc.stored_sizes, dtype="<u4").astype(np.int64))
        raw.append(np.frombuffer(loc.raw_sizes, dtype="<u4").astype(np.int64))
        meth.append(np.frombuffer(loc.methods, dtype=np.uint8))
        ns.append(loc.namespace)
    return _Cols(
        _cat(batch), b"".join(ids), list(names), _cat(pno), _cat(off), _cat(st), _cat(raw),
        np.concatenate(meth) if meth else np.zeros(0, dtype=np.uint8),
        [x for b, n in zip(batch, ns, strict=True) for x in [n] * b.size], cached,
    )  # fmt: skip


def _cat(xs: list[npt.NDArray[np.int64]]) -> npt.NDArray[np.int64]:
    return np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)


def _spans(
    c: _Cols, need: npt.NDArray[np.bool_] | None = None
) -> list[tuple[int, int, int, npt.NDArray[np.int64]]]:
    """(pack number, offset, length, chunk rows) per ranged read (of the rows `need`
    marks; default all)."""
    order = np.lexsort((c.offset, c.pack_no))
    if need is not None:
        order = order[need[order]]
    if not order.size:
        return []
    p, o = c.pack_no[order], c.offset[order]
    e = o + c.stored[order]
    # A new span where the pack changes or the gap from the furthest end so far is big.
    reach = np.maximum.accumulate(e)  # within one pack, since packs sort first
    new = np.ones(order.size, dtype=bool)
    new[1:] = (p[1:] != p[:-1]) | (o[1:] - reach[:-1] > GAP_BYTES)
    out = []
    for grp in np.split(np.arange(order.size), np.flatnonzero(new)[1:]):
        # Cut a long group into reads of at most SPAN_BYTES (a blob is never split).
        start = 0
        while start < grp.size:
            lo = int(o[grp[start]])
            ends = e[grp[start:]]
            k = max(1, int(np.searchsorted(ends - lo, SPAN_BYTES, side="right")))
            rows = grp[start : start + k]
            out.append((int(p[rows[0]]), lo, int(e[rows].max()) - lo, order[rows]))
            start += k
    return out


def _resolve_cached(
    c: _Cols, cache: Backend | None, need: npt.NDArray[np.bool_] | None = None
) -> None:
    """Fill in the entries of chunks in cached packs from the packs' trailers, read from
    the node cache (the coordinator never read them: it names the pack only); only
    for the rows `need` marks (default all)."""
    if not c.cached:
        return
    if cache is None:
        raise InvalidArgument("page stream: names cached packs, and this reader has no cache")
    want = np.frombuffer(c.ids, dtype=packs.ENTRY_DTYPE["id"])
    for pno in sorted(c.cached):
        rows = np.flatnonzero((c.pack_no == pno) & (need if need is not None else True))
        if not rows.size:
            continue
        name = c.pack[pno]
        contents = packs.read_contents(cache, name)  # DataCorrupted if bad
        if any(c.namespace[r] != contents.namespace for r in rows.tolist()):
            raise DataCorrupted("pack", name, f"of namespace {contents.namespace!r}")
        e = contents.entries
        order = np.argsort(e["id"], kind="stable")
        hay = np.take(e["id"], order)
        ids = np.take(want, rows)
        pos = np.minimum(search_ids(hay, ids), max(hay.size - 1, 0))
        if not hay.size or np.any(np.take(hay, pos) != ids):
            raise DataCorrupted("pack", name, "lacks a chunk the coordinator names in it")
        got = np.take(e, np.take(order, pos))
        c.offset[rows] = got["offset"]
        c.stored[rows] = got["stored"]
        c.raw[rows] = got["raw"]
        c.method[rows] = got["method"]


def _from_local(
    c: _Cols, local: LocalChunks, chunks: list[bytes], on_local: Callable[[int], None] | None
) -> npt.NDArray[np.bool_]:
    """Fill the chunks whose bytes `local` holds and hash to their ids (`on_local` told
    of their bytes); the rows still to read from packs."""
    need = np.ones(c.batch.size, dtype=bool)
    if not need.size:
        return need
    want = np.frombuffer(c.ids, dtype=ID_DTYPE)
    used = stale = 0
    for r, got in enumerate(local.get(want)):  # per chunk, not per page
        if got is None:
            continue
        if digest(got) == c.ids[r * ID : (r + 1) * ID]:
            chunks[r] = got
            need[r] = False
            used += len(got)
        else:
            stale += 1
    if used or stale:
        fields = {"chunks": int(need.size - need.sum()), "bytes": used, "stale": stale}
        log.info("chunks read from memory", extra={"fields": fields})
    if used and on_local is not None:
        on_local(used)
    return need


def fetch(
    backend: Backend,
    sealer: Sealer | None,
    batches: Sequence[common_pb2.PageBatch],
    on_read: Callable[[int], None] | None = None,
    cache: Backend | None = None,
    local: LocalChunks | None = None,
    on_local: Callable[[int], None] | None = None,
) -> Filled:
    """Read and check every chunk the batches locate; per batch (in order) its chunks'
    ids and plain bytes, None for a batch without locations. Chunks of cached packs are
    read from `cache` (this node's cache: level local), located by the packs' trailers.
    `local`: bytes the reader may already hold (an agent's staging after its last
    upload); each is used only when its BLAKE3 is the chunk's id (`on_local` told of
    the bytes so used), the others are read.
    Raises DataCorrupted, ObjectNotFound or the backend's error; nothing is returned
    half checked."""
    if faults.fail_point(FAIL_POINT):
        raise StoreError(f"fault point {FAIL_POINT}")
    c = _columns(batches)
    n = c.batch.size
    chunks: list[bytes] = [b""] * n
    need = _from_local(c, local, chunks, on_local) if local is not None else None
    _resolve_cached(c, cache, need)
    spans = _spans(c, need)

    def one(span: tuple[int, int, int, npt.NDArray[np.int64]]) -> int:
        pno, lo, length, rows = span
        pack = c.pack[pno]
        src = cache if pno in c.cached and cache is not None else backend
        data = src.get_range(Kind.PACKS, pack, lo, length)
        if len(data) != length:
            raise DataCorrupted("pack", pack, f"{len(data)} bytes at {lo}, {length} wanted")
        for r in rows.tolist():  # per chunk, not per page
            a = int(c.offset[r]) - lo
            chunks[r] = packs.decode_chunk(
                int(c.method[r]), data[a : a + int(c.stored[r])], int(c.raw[r]),
                c.ids[r * ID : (r + 1) * ID], pack, sealer, c.namespace[r],
            )  # fmt: skip
        return length

    if spans:
        with ThreadPoolExecutor(min(READ_THREADS, len(spans))) as pool:
            for got in pool.map(one, spans):
                if on_read is not None:
                    on_read(got)
    out: Filled = [None] * len(batches)
    for bi in range(len(batches)):
        if batches[bi].HasField("locations") or not batches[bi].HasField("chunks"):
            out[bi] = ([], [])
    for r, bi in enumerate(c.batch.tolist()):  # rows are in batch order already
        into = out[bi]
        assert into is not None
        into[0].append(c.ids[r * ID : (r + 1) * ID])
        into[1].append(chunks[r])
    return out
