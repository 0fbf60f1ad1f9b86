"""The direct data path: the agent puts its packs into the store itself and reports them
on its upload stream (StoredPacks); only ids and page tables go to the coordinator.

Choosing the path (`choose`, at each Welcome), by `--data-path`:
  coordinator  always through the coordinator (UploadPages carries the chunks);
  direct       the announced store must open from here (a directory that exists, or an
               S3 bucket with the endpoint and credentials of this agent's environment),
               its config/store.json id must equal the announced one, and a sealed store
               needs its key (from the mTLS stream, or --store-key-file /
               $CPCOORD_STORE_KEY): otherwise DataPathUnavailable, and the agent stops;
  auto         direct when all of that holds, else the coordinator path, logging why.
The agent checks the id before it writes anything, so it never writes into another
store that answers under the same name.

Building packs (`GenerationPacks`, one per generation on this node, shared by its
members' uploads, so a chunk two members hold is put once; `PackBuilder` is one
upload's view of it): exactly as the coordinator's store does (storecore): the chunks
MissingChunks named missing are compressed (zstd, raw when it does not pay), sealed with
the namespace's key when the store is encrypted, and added to a pack of the
generation's namespace; full packs are put by writer threads as `nodes/NODE/ID`
(atomic and durable on return: temp + fsync + rename, or one completed S3 upload), and
each stored pack is reported once durable. A put that fails fails the upload; a pack
put but never reported (the agent died) is garbage that gc removes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cpcoord.errors import CpcoordError, DataPathUnavailable, UploadFailed
from cpcoord.gen.v1 import agent_pb2
from nodeagent.cache.store import NodeCache, TieredBackend
from storecore import compress, packs
from storecore.arena import shared_pool
from storecore.backend import Backend, Buffer, LocalBackend
from storecore.crypt import Sealer
from storecore.identity import open_sealed
from storecore.ids import IdArray, first_of, member_of, unique_ids
from storecore.names import node_prefix
from storecore.writer import PackSink, StoredPack

log = logging.getLogger(__name__)

MODES = ("auto", "direct", "coordinator")
SHARED_NAMESPACE = "shared"  # as coordinator/store/config.py names it
# Chunk bytes compressed and added to the open pack at once, at most: `add` cuts a
# piece where the open pack fills up, so a pack overshoots its size by less than a chunk
# (packs.MAX_CHUNK_BYTES) unless members race. Each piece costs a fixed few dozen NumPy
# calls (dedup against the generation, sampling for compression): 4 MiB pieces cost
# 0.37 CPU s per 512 MiB of random chunks put into a directory on tmpfs, 16 MiB 0.30.
PIECE = 16 << 20


@dataclass(frozen=True)
class DirectStore:
    """An opened store this agent may put packs into (one per Welcome)."""

    backend: Backend
    node: str
    store_id: str
    location: str
    dedup: str  # "job" | "store"
    pack_bytes: int
    sealer: Sealer | None
    level: int = 1  # zstd level, as the store's default
    cache: NodeCache | None = None  # --cache: packs go to the node cache first
    _gens: dict[tuple[str, int], GenerationPacks] = field(default_factory=dict, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False)

    @property
    def borrows(self) -> bool:
        """Whether packs keep views of the members' staging rather than copies: where
        they are put as they are (storecore/writer.py), which a directory does: on
        tmpfs (a node cache) writev copies them into the file's pages, on disk O_DIRECT
        takes them straight from the staging (storecore/directio.py). S3 copies them
        into its parts: they go through arenas."""
        first = self.cache.backend if self.cache is not None else self.backend
        return isinstance(first, LocalBackend)

    def prepare(self, member_bytes: int) -> None:
        """A member of `member_bytes` may be checkpointed soon: fault in, on a thread of
        its own, the pack arenas its pages fill (storecore/arena.py, `warm`); when packs
        borrow the staging instead, allocate the cache's spare files for them: one per
        pack the member makes, each a pack, a chunk of overshoot (`GenerationPacks.add`)
        and its trailer."""
        if self.borrows:
            if self.cache is not None:
                spare = self.pack_bytes + packs.MAX_CHUNK_BYTES + (1 << 20)
                self.cache.prepare(spare, -(-member_bytes // self.pack_bytes) * spare)
            else:  # a store directory: nothing to allocate ahead (no spares outside a cache)
                log.info("pack space ready", extra={"fields": {"borrows": True}})
            return
        n = member_bytes // self.pack_bytes
        threading.Thread(target=_warm, args=(self.pack_bytes, n), daemon=True).start()

    def namespace(self, job: str) -> str:
        return SHARED_NAMESPACE if self.dedup == "store" else f"job:{job}"

    def same(self, w: agent_pb2.Welcome) -> bool:
        """Whether a new Welcome announces this very store (keep it open)."""
        return (w.store_location, w.store_id, w.store_dedup, w.store_pack_bytes) == (
            self.location, self.store_id, self.dedup, self.pack_bytes
        )  # fmt: skip

    def generation(self, job: str, generation: int) -> GenerationPacks:
        """The shared packs of (job, generation) on this node; `release` when done."""
        with self._lock:
            g = self._gens.get((job, generation))
            if g is None:
                g = self._gens[(job, generation)] = GenerationPacks(self, job, generation)
            g.users += 1
            return g

    def release(self, job: str, generation: int) -> None:
        with self._lock:
            g = self._gens.get((job, generation))
            if g is None:
                return
            g.users -= 1
            if g.users > 0:
                return
            del self._gens[(job, generation)]
        g.sink.close()

    def close(self) -> None:
        self.backend.close()


def _warm(pack_bytes: int, n: int) -> None:
    t0 = time.perf_counter()
    held = shared_pool(pack_bytes).warm(n)
    ms = round((time.perf_counter() - t0) * 1e3, 3)
    log.info("pack arenas ready", extra={"fields": {"arenas": held, "asked": n, "ms": ms}})


def _open(w: agent_pb2.Welcome, node: str, key_file: Path | None) -> DirectStore:
    if not w.store_location:
        raise DataPathUnavailable(node, "the coordinator announces no store")
    if w.store_dedup not in ("job", "store"):
        raise DataPathUnavailable(node, f"unknown dedup rule {w.store_dedup!r}")
    backend, sealer = open_sealed(
        w.store_location,
        w.store_id,
        w.store_encrypted,
        key_file,
        "it is encrypted and no key came (not over mTLS): give --store-key-file",
        w.store_key,
    )
    pack_bytes = w.store_pack_bytes or (16 << 20)
    return DirectStore(
        backend, node, w.store_id, w.store_location, w.store_dedup, pack_bytes, sealer
    )


def choose(
    w: agent_pb2.Welcome, node: str, mode: str, key_file: Path | None = None
) -> DirectStore | None:
    """The store to put packs into, or None for the coordinator path (module docstring)."""
    if mode == "coordinator":
        return None
    try:
        store = _open(w, node, key_file)
    except CpcoordError as e:
        if mode == "direct":
            if isinstance(e, DataPathUnavailable):
                raise
            raise DataPathUnavailable(node, str(e)) from e
        log.warning(
            "direct data path unavailable: uploading through the coordinator",
            extra={"fields": {"node": node, "store": w.store_location, "why": str(e)}},
        )
        return None
    log.info(
        "direct data path",
        extra={"fields": {"node": node, "store": store.location, "sealed": bool(store.sealer)}},
    )
    return store


class GenerationPacks:
    """The packs of one generation on this node, shared by its members' uploads: a chunk
    two members hold (ranks with the same weights) goes into one pack once. Thread-safe."""

    def __init__(self, store: DirectStore, job: str, generation: int) -> None:
        self.namespace = store.namespace(job)
        self.store = store
        backend: Backend = store.backend
        if store.cache is not None:  # level local (docs/multilevel.md)
            backend = TieredBackend(store.cache, store.backend, job, generation)
        arenas = shared_pool(store.pack_bytes)  # chunks land on warm pages (arena.py)
        prefix = node_prefix(store.node)
        self.sink = PackSink(backend, store.pack_bytes, prefix, arenas, store.borrows)
        self.stored: list[StoredPack] = []
        self._done: list[IdArray] = []  # ids of stored packs (the sink forgets them)
        self.users = 0
        self._lock = threading.Lock()

    def _new(self, ids: IdArray) -> npt.NDArray[np.bool_]:
        """Ids neither repeated in `ids` nor added before (open, in transit or stored)."""
        new = first_of(ids)
        if len(self._done) > 1:
            self._done = [unique_ids(np.concatenate(self._done))]
        done = self._done[0] if self._done else np.zeros(0, ids.dtype)
        return new & ~self.sink.contains(self.namespace, ids) & ~member_of(ids, done)

    def add(self, ids: IdArray, chunks: Sequence[Buffer]) -> None:
        """Add chunks in pieces of up to PIECE bytes, each cut where the open pack
        fills up: a round's batch (up to 256 MiB) still makes packs of the store's pack
        size, and the writer threads start on the first pack while the rest is
        compressed."""
        n = len(chunks)
        if not n:
            return
        cum = np.cumsum(np.fromiter((len(c) for c in chunks), dtype=np.int64, count=n))
        a = 0
        while a < n:
            with self._lock:
                room = self.store.pack_bytes - self.sink.open_bytes(self.namespace)
            want = (int(cum[a - 1]) if a else 0) + max(1, min(PIECE, room))
            # Up to the chunk that reaches `want`: the piece fills the pack, and the
            # pack is sealed after it (overshooting by less than that chunk).
            b = min(n, int(np.searchsorted(cum, want, side="left")) + 1)
            self._add(ids[a:b], chunks[a:b])
            a = b

    def _add(self, ids: IdArray, chunks: Sequence[Buffer]) -> None:
        with self._lock:
            sel = np.flatnonzero(self._new(ids))
        if not sel.size:
            return
        ids, chunks = ids[sel], [chunks[int(i)] for i in sel]
        # Compressed and sealed outside the lock: other members' uploads go on meanwhile.
        threads = compress.default_threads()
        methods, blobs = compress.compress_batch(chunks, self.store.level, threads)
        if self.store.sealer is not None:
            raw_ids = [x.tobytes() for x in ids]
            blobs = list(self.store.sealer.seal_chunks(self.namespace, raw_ids, blobs))
            methods |= packs.METHOD_SEALED
        raws = np.array([len(c) for c in chunks], dtype=np.uint32)
        with self._lock:
            keep = np.flatnonzero(self._new(ids))  # another member's upload may have won
            if keep.size:
                kb = [blobs[int(i)] for i in keep]
                self.sink.add(self.namespace, ids[keep], methods[keep], kb, raws[keep])

    def reap(self, flush: bool) -> list[StoredPack]:
        """Every pack stored so far (with flush: after sealing and storing the rest);
        raises the first failed put."""
        with self._lock:
            stored, error = self.sink.flush() if flush else self.sink.reap(block=False)
            self.stored += stored
            self._done += [unique_ids(s.contents.entries["id"]) for s in stored]  # sorted
            if error is not None:
                raise error
            return list(self.stored)


class PackBuilder:
    """One member upload's view of its generation's packs (module docstring). The
    upload's request generator drives it; `close` may come from the thread waiting for
    the call. A stream reports every pack stored so far that it has not reported: a
    pack may hold other members' chunks and be reported by several streams (the
    coordinator takes it once).

    Chunks are views of the member's staging. Where packs borrow them (`borrows`: a
    directory store or node cache, no copy into an arena) they must not outlive the upload:
    `close` refuses later adds and, unless `finish` stored every pack, seals and
    stores the generation's open packs before it returns, so the caller may release
    the staging after it (an aborted generation's packs are garbage for gc)."""

    def __init__(self, store: DirectStore, job: str, generation: int, member: str = "") -> None:
        self.store = store
        self.shared = store.generation(job, generation)
        self.key = (job, generation)
        self.member = member
        self.reported: set[str] = set()
        self.packs = 0
        self.bytes = 0  # stored bytes reported
        self._lock = threading.Lock()  # add/finish against close
        self._closed = False
        self._finished = False  # every chunk added is in a stored pack

    def add(self, ids: IdArray, chunks: Sequence[Buffer]) -> None:
        """Compress (and seal) chunks and add them to the open pack; full packs go to
        the writer threads. UploadFailed after `close`."""
        if not chunks:
            return
        with self._lock:
            if self._closed:
                raise UploadFailed(self.member, *self.key, "the upload is over")
            self._finished = False
            self.shared.add(ids, chunks)

    def _report(self, stored: list[StoredPack]) -> agent_pb2.UploadRequest | None:
        fresh = [sp for sp in stored if sp.name not in self.reported]
        if not fresh:
            return None
        req = agent_pb2.UploadRequest()
        cache = self.store.cache
        cached = set(cache.cached(*self.key)) if cache is not None else set()
        for sp in fresh:
            ids = np.ascontiguousarray(sp.contents.entries["id"]).tobytes()
            req.packs.packs.add(name=sp.name, size=sp.size, ids=ids, cached=sp.name in cached)
            self.reported.add(sp.name)
            self.packs += 1
            self.bytes += sp.size
        return req

    def ready(self) -> agent_pb2.UploadRequest | None:
        """A report of the packs stored since the last one (None when none); raises the
        first failed put."""
        return self._report(self.shared.reap(flush=False))

    def finish(self) -> agent_pb2.UploadRequest:
        """Seal and put the rest, wait until every pack is durable: the last report
        (always sent, even empty: it tells the coordinator which path this was)."""
        with self._lock:
            req = self._report(self.shared.reap(flush=True))
            self._finished = True
        if req is None:
            req = agent_pb2.UploadRequest()
            req.packs.SetInParent()
        return req

    def close(self) -> None:
        """The upload is over (class docstring); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if not self._finished and self.store.borrows:
                    self.shared.reap(flush=True)
            except CpcoordError as e:  # the upload has failed already: say why, go on
                log.warning(
                    "packs of a failed upload not stored",
                    extra={"fields": {"member": self.member, "error": str(e)}},
                )
            finally:
                self.store.release(*self.key)
