"""A committed generation as a page stream (`PageData`): per member a header, then
batches of page entries with the chunks they need. ReadGeneration (export) and
DownloadPages (restore) both send this; the format is in common.proto.

Batches hold at most `max_entries` entries and about `target_bytes` of chunk data; a
chunk goes once per stream, with the first batch that names it. Chunks are read through
the store's verified read path (re-hashed against their ids). Entries are sliced from
the manifest's packed columns: no Python object per page.

With `locate` (the direct read path) a batch names where its new chunks lie in the store
(ChunkLocations, from the index alone) instead of carrying them: no page byte is read or
sent, and batches are bigger (LOCATE_TARGET_BYTES of pages each), the message holding
only ~100 bytes per entry. `Moved` counts what each stream sent, for the metrics (told
to `record` when the stream ends).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import numpy.typing as npt

from coordinator import restore_diff
from coordinator.store import Manifest, Repository
from coordinator.store.manifest import PageTable, RegionMap
from cpcoord.errors import UnknownMember
from cpcoord.gen.v1 import common_pb2, manifest_pb2, types_pb2
from cpcoord.image import runs_of
from storecore.ids import ID_DTYPE, IdArray, member_of, unique_ids, zero_mask

TARGET_BYTES = 4 << 20
HARD_BYTES = 48 << 20  # a batch never carries more chunk bytes than this (limit 64 MiB)
LOCATE_TARGET_BYTES = 64 << 20  # pages per batch with locations: <= 16384 entries


class Relay(Protocol):
    """Reads chunks the store lacks from the agents whose node caches hold them
    (coordinator/cacheread.py)."""

    def check(self, namespace: str, ids: IdArray, job: str, generation: int) -> None: ...
    def read(self, namespace: str, ids: IdArray) -> list[bytes]: ...


@dataclass
class Moved:
    """What a stream sent: chunk bytes (the coordinator read path), or the stored bytes
    of the chunks it located for the agent to read itself."""

    sent: int = 0
    located: int = 0


def region_runs(t: PageTable) -> list[types_pb2.PageRun]:
    pages, _, _ = t.expand()
    return [types_pb2.PageRun(offset=int(o), count=int(c)) for o, c in runs_of(pages).tolist()]


def header(
    m: Manifest, member: str, node: str, regions: Sequence[RegionMap]
) -> common_pb2.PagesHeader:
    rs = []
    for r in regions:
        runs = region_runs(r.pages)
        rs.append(
            types_pb2.Region(name=r.name, start=r.start, end=r.end, pages=runs, all_pages=runs)
        )
    return common_pb2.PagesHeader(
        job=m.job,
        generation=m.generation,
        member=member,
        node=node,
        page_size=m.page_size,
        regions=rs,
        full=True,
        cut_unix_ns=max(0, m.time_ns),
    )


def _entries(t: PageTable, lo: int, hi: int) -> manifest_pb2.PageEntries:
    return manifest_pb2.PageEntries(
        page_offsets=t.offsets[lo:hi].astype("<u8").tobytes(),
        page_counts=t.counts[lo:hi].astype("<u4").tobytes(),
        chunk_skips=t.skips[lo:hi].astype("<u4").tobytes(),
        chunk_ids=np.ascontiguousarray(t.ids[lo:hi]).tobytes(),
    )


def _chunk_data(ids: IdArray, data: list[bytes]) -> common_pb2.ChunkData:
    sizes = np.array([len(d) for d in data], dtype="<u4")
    return common_pb2.ChunkData(
        ids=np.ascontiguousarray(ids).tobytes(),
        methods=bytes(len(data)),
        raw_sizes=sizes.tobytes(),
        stored_sizes=sizes.tobytes(),
        data=b"".join(data),
    )


def stream(
    repo: Repository,
    m: Manifest,
    members: Sequence[str] = (),
    regions: Sequence[str] = (),
    nodes: dict[str, str] | None = None,
    max_entries: int = 65536,
    target_bytes: int = TARGET_BYTES,
    only: dict[str, npt.NDArray[np.uint64]] | None = None,
    locate: bool = False,
    record: Callable[[int, int], None] | None = None,
    cache_node: str = "",
    relay: Relay | None = None,
) -> Iterator[common_pb2.PageData]:
    """PageData messages of the chosen members (all, in name order) and regions;
    `only`: region name -> the page offsets to send (a region not named: none);
    `locate`: chunk locations instead of chunk bytes (module docstring); `cache_node`
    (with `locate`): the reader reads that node's cache, so chunks only there are
    named by their cached packs; `relay`: chunks the store lacks (else) come from the
    agents caching them, as chunk bytes (without it: NotDrained); `record(sent, located)`
    is told what the stream moved (`Moved`) when it ends, also cut short or failed."""
    moved = Moved()
    if locate:
        target_bytes = max(target_bytes, LOCATE_TARGET_BYTES)
    names = sorted(x.name for x in m.members) if not members else list(members)
    if repo.cached.packs:  # level local: refuse before the first message (not mid-stream)
        want = set(names)
        parts = [r.pages.ids[~r.pages.zero] for mem, r in m.tables() if mem in want]
        if parts:
            ids = unique_ids(np.concatenate(parts))
            if relay is None:
                repo.ensure_in_store(m.namespace, ids, cache_node)
            else:
                far = repo.not_in_store(m.namespace, ids, cache_node)
                if far.size:
                    relay.check(m.namespace, far, m.job, m.generation)
    relay = relay if repo.cached.packs else None
    try:
        for name in names:
            try:
                mm = m.member(name)
            except KeyError:
                raise UnknownMember(m.job, name, f"in generation {m.generation}") from None
            chosen = [r for r in mm.regions if not regions or r.name in regions]
            if only is not None:
                empty = np.zeros(0, dtype=np.uint64)
                chosen = [
                    replace(r, pages=restore_diff.only_pages(r.pages, only.get(r.name, empty)))
                    for r in chosen
                ]
            yield common_pb2.PageData(header=header(m, name, (nodes or {}).get(name, ""), chosen))
            sent = [np.zeros(0, dtype=ID_DTYPE)]  # chunks this member's stream has carried
            for ri, r in enumerate(chosen):
                for batch in _batches(
                    repo, m, r.pages, sent, max_entries, target_bytes, locate, cache_node, relay
                ):
                    batch.region = ri
                    moved.sent += len(batch.chunks.data)
                    if locate:
                        st = np.frombuffer(batch.locations.stored_sizes, dtype="<u4")
                        moved.located += int(st.sum(dtype=np.uint64))
                    yield common_pb2.PageData(batch=batch)
    finally:
        if record is not None:
            record(moved.sent, moved.located)


def _locations(
    repo: Repository, namespace: str, ids: IdArray, cache_node: str = ""
) -> common_pb2.ChunkLocations:
    at = repo.locate_chunks(namespace, ids, cache_node)
    return common_pb2.ChunkLocations(
        namespace=namespace,
        packs=at.packs,
        ids=np.ascontiguousarray(ids).tobytes(),
        pack_index=at.pack_index.astype("<u4").tobytes(),
        offsets=at.locs["offset"].astype("<u8").tobytes(),
        stored_sizes=at.locs["stored"].astype("<u4").tobytes(),
        raw_sizes=at.locs["raw"].astype("<u4").tobytes(),
        methods=at.locs["method"].astype(np.uint8).tobytes(),
        cached=bytes(at.cached) if any(at.cached) else b"",
    )


def _batches(
    repo: Repository,
    m: Manifest,
    t: PageTable,
    sent: list[IdArray],
    max_entries: int,
    target: int,
    locate: bool = False,
    cache_node: str = "",
    relay: Relay | None = None,
) -> Iterator[common_pb2.PageBatch]:
    ps = m.page_size
    cost = np.where(zero_mask(t.ids), 0, t.counts.astype(np.int64) * ps)
    ends = np.cumsum(cost)
    lo = 0
    while lo < len(t):
        base = int(ends[lo - 1]) if lo else 0
        hi = int(np.searchsorted(ends, base + target, side="right"))
        hi = min(max(hi, lo + 1), lo + max_entries, len(t))
        while True:
            ids = t.ids[lo:hi]
            new = unique_ids(ids[~zero_mask(ids)])
            new = new[~member_of(new, sent[0])]
            if locate:
                break
            data = _read(repo, m.namespace, new, relay) if new.size else []
            if hi - lo == 1 or sum(len(d) for d in data) <= HARD_BYTES:
                break
            # Entries naming small parts of big chunks: fewer entries per batch.
            hi = lo + max(1, (hi - lo) // 4)
        if new.size:
            sent[0] = np.union1d(sent[0], new)
        if locate:
            if relay is not None and new.size:  # chunks only in other node caches: bytes
                far = member_of(new, repo.not_in_store(m.namespace, new, cache_node))
                if far.any():
                    yield from _relayed(relay, m.namespace, new[far])
                    new = new[~far]
            where = _locations(repo, m.namespace, new, cache_node) if new.size else None
            yield common_pb2.PageBatch(entries=_entries(t, lo, hi), locations=where)
        else:
            yield common_pb2.PageBatch(entries=_entries(t, lo, hi), chunks=_chunk_data(new, data))
        lo = hi


def _read(repo: Repository, namespace: str, ids: IdArray, relay: Relay | None) -> list[bytes]:
    """Chunk bytes from the store, and through the relay those only in node caches."""
    if relay is None:
        return repo.read_chunks(namespace, ids)
    far = member_of(ids, repo.not_in_store(namespace, ids))
    if not far.any():
        return repo.read_chunks(namespace, ids)
    out: list[bytes] = [b""] * ids.size
    for rows, got in (
        (np.flatnonzero(~far), repo.read_chunks(namespace, ids[~far]) if (~far).any() else []),
        (np.flatnonzero(far), relay.read(namespace, ids[far])),
    ):
        for r, d in zip(rows.tolist(), got, strict=True):
            out[r] = d
    return out


def _relayed(relay: Relay, namespace: str, ids: IdArray) -> Iterator[common_pb2.PageBatch]:
    """Batches of no entry carrying chunks read through the relay (before the located
    batch that names them; a reader keeps a member's chunks across its batches)."""
    data = relay.read(namespace, ids)
    lo = 0
    while lo < ids.size:
        hi, size = lo, 0
        while hi < ids.size and (hi == lo or size + len(data[hi]) <= TARGET_BYTES):
            size += len(data[hi])
            hi += 1
        yield common_pb2.PageBatch(chunks=_chunk_data(ids[lo:hi], data[lo:hi]))
        lo = hi
