"""Ingest into the page store: which chunks a generation still lacks, storing its chunks,
and committing it: the bodies of `Repository.missing`, `add_chunks` and `commit` (the
lifecycle and the commit order are in repository.py's header). They act on the
repository's parts under its lock, like reader.py and gc.py; hashing and compression run
outside the lock, so uploads of several members overlap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from coordinator.store import drain, index_io, manifest_io, nodepacks
from coordinator.store.catalog import GenerationInfo, Level
from coordinator.store.manifest import Manifest
from coordinator.store.references import check_references
from cpcoord.errors import ChunkMismatch, InvalidArgument, ManifestInvalid, NodeDataBad
from cpcoord.log import log_event
from storecore import compress, packs
from storecore.backend import Buffer, Kind
from storecore.ids import IdArray, as_id_array, first_of, unique_ids, zero_mask
from storecore.writer import PackSink

if TYPE_CHECKING:
    from coordinator.store.inflight import InFlight
    from coordinator.store.parts import StoreParts

    class IngestParts(StoreParts, Protocol):
        """The parts ingest needs beyond the maintenance modules' view."""

        sink: PackSink  # the open packs and the writer thread
        fence: Callable[[str], None] | None  # replicas: before manifest and catalog


log = logging.getLogger("cpcoord.store")


@dataclass(frozen=True)
class AddResult:
    received: int
    stored: int  # chunks newly stored (the rest were already present or repeated)
    bytes_stored: int  # stored (compressed) bytes of those


def missing(
    repo: IngestParts, job: str, generation: int, ids: Any, node: str | None = None
) -> IdArray:
    """The ids (sorted, unique, ZERO excluded) the store lacks in the generation's
    namespace, for `node` (None: the coordinator): a chunk only another node's pack holds
    counts once verified (nodepacks.py; verified here, the first time it is wanted). The
    ones it has are claimed for the generation (kept from gc)."""
    arr = as_id_array(ids)
    arr = arr[~zero_mask(arr)]
    with repo.lock:
        g = repo.inflight.get(job, generation, "ask for missing chunks")
        repo.integrate(block=False)
        found, locs = repo.index.chunks(g.namespace).lookup(arr)
        check = nodepacks.foreign(repo, g.namespace, arr, found, locs, node)
        if not check.any():
            return _claim_present(repo, g, arr, found, node)
    # Read back outside the lock, then record and look again. The index and the writer's
    # packs are looked up under one hold of the lock: between two, another call may index
    # a pack the writer held, and its chunks would be in neither.
    good, bad = nodepacks.verify(repo, g.namespace, arr[check], locs[check])
    with repo.lock:
        nodepacks.settle(repo, g.namespace, good, bad)
        repo.integrate(block=False)
        found, locs = repo.index.chunks(g.namespace).lookup(arr)
        found &= ~nodepacks.foreign(repo, g.namespace, arr, found, locs, node)
        return _claim_present(repo, g, arr, found, node)


def _claim_present(
    repo: IngestParts, g: InFlight, arr: IdArray, found: np.ndarray, node: str | None
) -> IdArray:
    """(Under the lock, with `found` from the index under the same hold.) Claim the ids
    present (indexed, or in a pack the writer holds); the others, sorted, less those in
    `node`'s cache that this generation may use (level local)."""
    present = found | repo.sink.contains(g.namespace, arr)
    g.claim(arr[present])
    if node is not None and (g.cached or repo.cached.packs):  # level local
        present |= drain.cached_present(repo.cached, g, node, arr)
    return unique_ids(np.compress(~present, arr))


def add_chunks(
    repo: IngestParts, job: str, generation: int, ids: Any, chunks: Sequence[Buffer]
) -> AddResult:
    """Store chunks whose BLAKE3 equals their claimed id. Any mismatch (or a ZERO id, or
    a bad size) refuses the whole batch: nothing of it is stored."""
    arr = as_id_array(ids)
    if arr.size != len(chunks):
        raise InvalidArgument(f"{arr.size} chunk ids for {len(chunks)} chunks")
    if zero_mask(arr).any():
        raise InvalidArgument("the ZERO marker names all-zero pages and is never stored")
    with repo.lock:
        g = repo.inflight.get(job, generation, "accept chunks")
    actual = packs.check_chunks(arr, chunks)
    bad = np.flatnonzero(actual != arr)
    if bad.size:
        i = int(bad[0])
        raise ChunkMismatch(arr[i].tobytes().hex(), actual[i].tobytes().hex())
    with repo.lock:
        new = new_ids(repo, g.namespace, arr)
    sel = np.flatnonzero(new)
    todo = [chunks[int(i)] for i in sel]
    threads = repo.config.threads or compress.default_threads()
    methods, blobs = compress.compress_batch(todo, repo.config.compression_level, threads)
    if repo.config.sealer is not None and sel.size:
        sel_ids = [x.tobytes() for x in arr[sel]]
        blobs = list(repo.config.sealer.seal_chunks(g.namespace, sel_ids, blobs))
        methods |= packs.METHOD_SEALED
    raws = np.array([len(c) for c in todo], dtype=np.uint32)
    stored = 0
    with repo.lock:
        g.claim(arr)
        still = new_ids(repo, g.namespace, arr[sel])  # another upload may have won
        keep = np.flatnonzero(still)
        if keep.size:
            kb = [blobs[i] for i in keep]
            repo.sink.add(g.namespace, arr[sel][keep], methods[keep], kb, raws[keep])
            stored = sum(len(b) for b in kb)
            g.chunks_new += int(keep.size)
            g.bytes_new += stored
        repo.integrate(block=False)
    return AddResult(len(chunks), int(keep.size), stored)


def new_ids(repo: IngestParts, namespace: str, arr: IdArray) -> np.ndarray:
    """(Under the lock.) Mask of ids neither indexed nor pending nor repeated earlier in
    `arr`."""
    new = first_of(arr)
    new &= ~repo.index.chunks(namespace).contains(arr)
    new &= ~repo.sink.contains(namespace, arr)
    return new


def commit(repo: IngestParts, manifest: Manifest) -> GenerationInfo:
    """Make a generation durable and visible (order in repository.py's header)."""
    job, n = manifest.job, manifest.generation
    with repo.lock:
        g = repo.inflight.get(job, n, "commit")
        if manifest.parent != g.parent:
            raise ManifestInvalid(n, job, f"parent {manifest.parent}, begun with {g.parent}")
        m = replace(manifest, namespace=g.namespace)
        m.validate()
        for who, why in g.bad.items():  # a node's packs failed verification meanwhile
            raise NodeDataBad(who, why)
        repo.sink.seal()
        repo.integrate(block=True)
        repo.step("packs")
        may_lack, deps = drain.commit_plan(repo.cached, g)
        sizes = check_references(m, repo.index, g.bytes_new, may_lack)
        index_io.persist_new(repo)
        repo.step("index")
        name = f"{job}/{n:010d}"
        data = manifest_io.encode(m)
        if repo.config.sealer is not None:
            data = repo.config.sealer.seal_manifest(name, data)
        if repo.fence is not None:
            repo.fence("manifest")
        repo.backend.put(Kind.MANIFESTS, name, data)
        repo.step("manifest")
        if repo.fence is not None:
            repo.fence("catalog")
        if deps:
            own = g.cached
            record = repo.cached.recorder(job, n, own, deps)
            repo.catalog.commit(job, n, name, sizes, Level.LOCAL, also=record)
            repo.cached.committed(job, n, own, deps)
        else:
            repo.catalog.commit(job, n, name, sizes)
        repo.inflight.remove(job, n)
        repo.step("catalog")
    log_event(
        log, logging.INFO, "generation committed", job=job, generation=n,
        pages=sizes.pages, bytes_logical=sizes.bytes_logical, bytes_new=sizes.bytes_new,
    )  # fmt: skip
    return repo.catalog.get(job, n)
