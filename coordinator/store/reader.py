"""The read path: chunks by id and the pages of a committed generation, verified.

Every chunk read is decompressed and re-hashed against its id (DataCorrupted if not).
Pages are read in batches of ~64 MiB of page entries; each distinct chunk of a batch is
read once, so a run of identical pages costs one read, and adjacent blobs of a pack are
fetched with one ranged read. A chunk that gc moved between the index lookup and the
read is looked up once more.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cpcoord.errors import CpcoordError, DataCorrupted, NotDrained, ObjectNotFound
from storecore import packs
from storecore.backend import Kind
from storecore.ids import IdArray, as_id_array, ids_to_bytes, member_of, zero_mask

if TYPE_CHECKING:
    from coordinator.store.parts import StoreParts

BATCH_BYTES = 64 << 20
SPAN_BYTES = 8 << 20


@dataclass(frozen=True)
class PageRun:
    """Pages [offset, offset + count) of a region; data None means all-zero pages."""

    member: str
    region: str
    offset: int
    count: int
    data: memoryview | None


def read_chunks(repo: StoreParts, namespace: str, ids: Any) -> list[bytes]:
    arr = as_id_array(ids)
    with repo.lock:
        found, locs = repo.index.chunks(namespace).lookup(arr)
        names = [
            repo.index.pack(int(p)).name if f else ""
            for f, p in zip(found, locs["pack"], strict=True)
        ]
    if not found.all():  # a committed manifest needs it: data loss, or not drained yet
        raise lost(repo, namespace, arr[~found])
    cids = ids_to_bytes(arr)
    out: list[bytes] = [b""] * arr.size
    # One ranged read per span of adjacent blobs of a pack (up to SPAN_BYTES), not per chunk.
    order = np.lexsort((locs["offset"], locs["pack"]))
    start = 0
    while start < order.size:
        end = start + 1
        first = locs[order[start]]
        span_end = int(first["offset"]) + int(first["stored"])
        while end < order.size:
            nxt = locs[order[end]]
            if nxt["pack"] != first["pack"] or int(nxt["offset"]) != span_end:
                break
            if span_end + int(nxt["stored"]) - int(first["offset"]) > SPAN_BYTES:
                break
            span_end += int(nxt["stored"])
            end += 1
        idx = order[start:end].tolist()
        pack, off = names[idx[0]], int(first["offset"])
        try:
            data = repo.backend.get_range(Kind.PACKS, pack, off, span_end - off)
        except ObjectNotFound:  # gc may have repacked them since the lookup
            for i in idx:
                out[i] = _read_again(repo, namespace, arr[i : i + 1], cids[i], pack)
        else:
            for i in idx:
                o, n = int(locs["offset"][i]) - off, int(locs["stored"][i])
                out[i] = packs.decode_chunk(
                    int(locs["method"][i]),
                    data[o : o + n],
                    int(locs["raw"][i]),
                    cids[i],
                    pack,
                    repo.config.sealer,
                    namespace,
                )
        start = end
    return out


@dataclass(frozen=True)
class Located:
    """Where chunks lie (the direct read path): per chunk an index into `packs` and its
    index entry (offset, stored and plain size, method); no byte of a chunk is read.
    `cached`: per pack, whether it is a pack in the reader's node cache (not in the
    store, level local): its chunks' entries are zero, the reader finds them in the
    pack's trailer (docs/multilevel.md, "Reading")."""

    packs: list[str]
    pack_index: np.ndarray  # uint32 per chunk
    locs: np.ndarray  # index.LOC_DTYPE per chunk
    cached: list[bool] = field(default_factory=list)


def locate_chunks(repo: StoreParts, namespace: str, ids: Any, cache_node: str = "") -> Located:
    """The pack and blob of each chunk, from the index alone; for a chunk the store
    lacks, the undrained cached pack of `cache_node` that lists it (when given);
    NotDrained or DataCorrupted for one neither has (a committed manifest needs it).
    The pack may be repacked by gc before the reader gets there: it then reads through
    the coordinator instead."""
    arr = as_id_array(ids)
    with repo.lock:
        found, locs = repo.index.chunks(namespace).lookup(arr)
        numbers, index = np.unique(locs["pack"][found], return_inverse=True)
        names = [repo.index.pack(int(p)).name for p in numbers.tolist()]
        pack_index = np.zeros(arr.size, dtype=np.uint32)
        pack_index[found] = index.astype(np.uint32)
        cached = [False] * len(names)
        if not found.all() and cache_node:
            cnames, _, where = repo.cached.locate(arr[~found], namespace, cache_node)
            hit = where >= 0
            rows = np.flatnonzero(~found)[hit]
            used, inv = np.unique(where[hit], return_inverse=True)
            pack_index[rows] = (len(names) + inv).astype(np.uint32)
            names += [cnames[int(i)] for i in used.tolist()]
            cached += [True] * used.size
            found = found.copy()
            found[rows] = True
    if not found.all():
        raise lost(repo, namespace, arr[~found])
    return Located(names, pack_index, locs, cached)


def _read_again(repo: StoreParts, namespace: str, one: Any, cid: bytes, old_pack: str) -> bytes:
    with repo.lock:
        found, loc = repo.index.chunks(namespace).lookup(one)
        pack = repo.index.pack(int(loc["pack"][0])).name if found[0] else old_pack
    if pack == old_pack:
        raise ObjectNotFound(Kind.PACKS, old_pack)
    blob = repo.backend.get_range(Kind.PACKS, pack, int(loc["offset"][0]), int(loc["stored"][0]))
    return packs.decode_chunk(
        int(loc["method"][0]), blob, int(loc["raw"][0]), cid, pack, repo.config.sealer, namespace
    )


def iter_pages(
    repo: StoreParts, job: str, generation: int, member: str | None, region: str | None
) -> Iterator[PageRun]:
    m = repo.manifest(job, generation)
    ps = m.page_size
    for mem in m.members:
        if member is not None and mem.name != member:
            continue
        for r in mem.regions:
            if region is not None and r.name != region:
                continue
            t = r.pages
            ends = np.cumsum(t.counts.astype(np.int64)) * ps
            lo = 0
            while lo < len(t):
                hi = max(lo + 1, int(np.searchsorted(ends, ends[lo] + BATCH_BYTES)))
                ids = t.ids[lo:hi]
                zero = zero_mask(ids)
                uniq, inv = np.unique(ids[~zero], return_inverse=True)
                data = read_chunks(repo, m.namespace, uniq)
                k = 0
                for j in range(hi - lo):
                    off, cnt = int(t.offsets[lo + j]), int(t.counts[lo + j])
                    view = None
                    if not zero[j]:
                        skip = int(t.skips[lo + j])
                        view = memoryview(data[int(inv[k])])[skip * ps : (skip + cnt) * ps]
                        k += 1
                    yield PageRun(mem.name, r.name, off, cnt, view)
                lo = hi


def read_region(repo: StoreParts, job: str, generation: int, member: str, region: str) -> bytearray:
    m = repo.manifest(job, generation)
    r, ps = m.member(member).region(region), m.page_size
    buf = bytearray(r.end - r.start)
    for run in iter_pages(repo, job, generation, member, region):
        if run.data is not None:
            buf[run.offset * ps : (run.offset + run.count) * ps] = run.data
    return buf


def lost(repo: StoreParts, namespace: str, lost: IdArray) -> CpcoordError:
    """Chunks a committed manifest names that the store lacks: still in a node cache (a
    generation at level `local`, docs/multilevel.md), else data loss."""
    with repo.lock:
        where = {
            p.node
            for p in repo.cached.packs.values()
            if not p.drained and p.namespace == namespace
            and member_of(lost, np.unique(as_id_array(p.ids))).any()
        }  # fmt: skip
    if where:
        return NotDrained(lost.size, ", ".join(sorted(set(where))))
    why = f"missing from the store ({lost.size} chunk(s) of namespace {namespace})"
    return DataCorrupted("chunk", lost[0].tobytes().hex(), why)
