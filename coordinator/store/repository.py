"""The page store's facade: what the coordinator calls. Ingest, commit, read, and the
entry points of gc, verify and stats (gc.py, verify.py hold those).

Lifecycle of a generation in the store:
    n = repo.begin(job)                           catalog row PREPARING, in flight
    todo = repo.missing(job, n, ids)              ids the store lacks (sorted, unique)
    repo.add_chunks(job, n, todo, chunks)         BLAKE3-checked; mismatch -> nothing stored
    repo.commit(manifest)                         -> GenerationInfo (COMMITTED)
    repo.abort(job, n, reason)                    on any failure instead
Commit order: (1) seal and put the open packs (each put is fsynced), (2) check every
referenced chunk is indexed and long enough (references.py), (3) write an index file for
new packs, (4) put the manifest (fsynced), (5) flip the catalog row to COMMITTED in one
transaction. A replica's `fence` runs before (4) and before (5): a deposed leader
commits nothing. A crash before (5) leaves the row PREPARING, which reopening the store
turns ABORTED; the packs and manifest it left are unreferenced and `gc` removes them.
Readers only ever see COMMITTED rows, so no partial generation is ever visible. A failed
commit leaves the generation in flight: the caller may upload what is missing and retry,
or abort.

The catalog is bound to its store (binding.py): opened against another store (a new
bucket of the same name, a replaced directory, another endpoint) it is set aside and
rebuilt from the store's manifests (`rebound`, `rebuilt` say so).

One process owns a store at a time (ownership.py: an exclusive flock on `lock` beside
the catalog); within it, one RLock guards the index, open packs, in-flight registry and
catalog steps. Hashing and compression run outside the lock, so uploads of several members overlap.
Storing chunks and the commit are in ingest.py.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from coordinator.store import binding, drain, index_io, ingest, manifest_io, nodepacks, reader
from coordinator.store.cached import CachedPacks, Lost
from coordinator.store.catalog import Catalog, GenerationInfo, State
from coordinator.store.config import StoreConfig, load_or_init_identity
from coordinator.store.gc import GcReport, collect
from coordinator.store.index import Index
from coordinator.store.inflight import InFlight, Registry
from coordinator.store.ingest import AddResult
from coordinator.store.manifest import Manifest
from coordinator.store.ownership import Ownership
from coordinator.store.reader import PageRun
from coordinator.store.rebuild import RebuildReport, rebuild_catalog
from coordinator.store.verify import StoreStats, VerifyReport, stats, verify
from cpcoord.closing import Closing
from cpcoord.errors import (
    GenerationStateError,
    NotDrained,
    StoreError,
)
from cpcoord.log import log_event
from cpcoord.ranges import check_name
from storecore.backend import Backend, Buffer, Kind, LocalBackend
from storecore.crypt import open_manifest
from storecore.ids import (
    IdArray,
    member_of,
)
from storecore.writer import PackSink

log = logging.getLogger("cpcoord.store")
Latest = Literal["latest"]


class Repository(Closing):
    """See the module docstring. Open with `Repository.open_local(path)`."""

    def __init__(
        self, backend: Backend, state_dir: Path | str, config: StoreConfig | None = None
    ) -> None:
        self.backend = backend
        self.config = config or StoreConfig()
        # Tests only: called with the name of each commit and gc step just done.
        self.fault: Callable[[str], None] | None = None
        # Replicas (coordinator/ha): called with "manifest" before the manifest is
        # written and "catalog" before the flip; raising fails the commit, nothing flips.
        self.fence: Callable[[str], None] | None = None
        self.lock = threading.RLock()
        self.sink = PackSink(backend, self.config.pack_size)
        self.unindexed: list[int] = []  # pack numbers not yet in an index file
        self.recent_puts: set[str] = set()  # packs stored since gc's mark (gc must not delete)
        self._manifests: dict[str, Manifest] = {}  # small cache, names are immutable
        self.inflight = Registry()
        self.index = Index()
        self.trust = nodepacks.Trust()
        self.unreadable_packs: dict[str, str] = {}  # name -> why (found at open)
        state = Path(state_dir)
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._owner = Ownership(state, backend.location)
        try:
            self._open(state)
        except BaseException:
            self._owner.release()
            raise

    @classmethod
    def open_local(cls, root: Path | str, config: StoreConfig | None = None) -> Repository:
        return cls(LocalBackend(root), root, config)

    def _open(self, state: Path) -> None:
        self.identity, store_new = load_or_init_identity(self.backend)
        self.backend.discard_incomplete()
        self._owner.announce(self.backend)
        # The catalog must be this store's (binding.py); one of another store is set
        # aside and rebuilt from this store's manifests below.
        now = binding.StoreRef(str(self.identity["id"]), self.backend.source)
        travels = isinstance(self.backend, LocalBackend) and (
            os.path.realpath(state) == os.path.realpath(self.backend.root)
        )
        self.catalog, self.rebound = binding.bind(
            Catalog(state / "catalog.sqlite"),
            now,
            store_new=store_new,
            manifests=lambda: {o.name for o in self.backend.list(Kind.MANIFESTS)},
            travels=travels,
        )
        aborted = self.catalog.abort_all_preparing("interrupted: the store was reopened")
        for job, n in aborted:
            log_event(log, logging.WARNING, "aborted interrupted generation", job=job, generation=n)
        index_io.load(self)
        self.cached = CachedPacks(self.catalog)
        self.rebuilt: RebuildReport | None = None
        if self.rebound is not None:
            self.rebuilt = rebuild_catalog(self)

    def close(self) -> None:
        with self.lock:
            if not self._owner.held:
                return
            self.sink.close()
            self._owner.withdraw(self.backend)
            self.catalog.close()
            self.backend.close()
            self._owner.release()

    def step(self, name: str) -> None:
        if self.fault is not None:
            self.fault(name)

    # -- index ---------------------------------------------------------------------

    def rebuild_index(self) -> int:
        """Forget the index files and re-read every pack's trailer; returns chunks indexed."""
        with self.lock:
            return index_io.rebuild(self)

    def integrate(self, block: bool) -> None:
        """Index the packs the writer has stored; raise its first failure (if any) after
        indexing the others."""
        stored, error = self.sink.reap(block)
        for sp in stored:
            self.recent_puts.add(sp.name)
            self.index.add_pack(sp.id, sp.size, sp.contents, sp.name)
            no = self.index.pack_number(sp.name)
            assert no is not None
            self.unindexed.append(no)
        if error is not None:
            raise error

    def _forget_earlier_put_failures(self) -> None:
        """Index what the writer has stored and drop the failures it has collected: a
        pack put that failed before a generation began belongs to earlier generations
        (aborted for it, or about to fail at commit with ChunkMissing, since a failed
        pack's ids are forgotten). Raised into the new generation's first call, it
        aborted a generation whose own data was fine, e.g. the first one after the S3
        server came back (tests/integration/test_e2e_s3_faults.py)."""
        try:
            self.integrate(block=False)
        except StoreError as e:
            log_event(log, logging.WARNING, "dropped an earlier pack put failure", error=str(e))

    def flush(self) -> None:
        """Seal every open pack and wait until all are stored and indexed."""
        with self.lock:
            self.sink.seal()
            self.integrate(block=True)

    # -- ingest --------------------------------------------------------------------

    def begin(self, job: str, parent: int | Latest | None = "latest") -> int:
        """Allocate a PREPARING generation; parent defaults to the latest committed one."""
        check_name(job)
        with self.lock:
            if parent == "latest":
                done = self.catalog.generations(job, State.COMMITTED)
                parent = done[-1].number if done else None
            elif parent is not None:
                info = self.catalog.get(job, parent)
                if info.state is not State.COMMITTED:
                    raise GenerationStateError(parent, job, "be a parent", f"it is {info.state}")
            self._forget_earlier_put_failures()
            ns = self.config.namespace(job)
            n = self.catalog.allocate(job, parent, ns)
            self.inflight.add(InFlight(job, n, parent, ns))
        log_event(log, logging.INFO, "generation begun", job=job, generation=n, parent=parent)
        return n

    def missing(self, job: str, generation: int, ids: Any, node: str | None = None) -> IdArray:
        """The ids (sorted, unique, ZERO excluded) the store lacks in the generation's
        namespace, for `node` (None: the coordinator); the ones it has are claimed for
        the generation (ingest.py)."""
        return ingest.missing(self, job, generation, ids, node)

    def bad_nodes(self, job: str, generation: int) -> dict[str, str]:
        """Nodes whose packs for this generation failed verification: node -> why."""
        with self.lock:
            return dict(self.inflight.get(job, generation, "check its nodes").bad)

    def take_packs(
        self, job: str, generation: int, node: str, reports: Sequence[nodepacks.Report],
        cache_id: str = "",
    ) -> tuple[int, int]:  # fmt: skip
        """Packs `node` put itself for the generation (direct data path): checked and
        indexed, (chunks, stored bytes); bad data of that node otherwise (nodepacks.py).
        Packs in its node cache (`cached`) are recorded with the cache's id (drain.py)."""
        with self.lock:
            g = self.inflight.get(job, generation, "take packs")
            cached = [r for r in reports if r.cached]
            got = drain.take_cached(g, node, cached, cache_id) if cached else (0, 0)
        if len(cached) == len(reports):
            return got
        c, b = nodepacks.take(self, g, node, [r for r in reports if not r.cached])
        return c + got[0], b + got[1]

    def take_drained(self, node: str, reports: Sequence[nodepacks.Report]) -> list[GenerationInfo]:
        """Cached packs `node` drained into the store: checked and indexed; the
        generations that rose to `store` (drain.py)."""
        return drain.take_drained(self, self.cached, node, reports)

    def add_chunks(
        self, job: str, generation: int, ids: Any, chunks: Sequence[Buffer]
    ) -> AddResult:
        """Store chunks whose BLAKE3 equals their claimed id. Any mismatch (or a ZERO
        id, or a bad size) refuses the whole batch: nothing of it is stored (ingest.py)."""
        return ingest.add_chunks(self, job, generation, ids, chunks)

    def abort(self, job: str, generation: int, reason: str) -> None:
        with self.lock:
            self.catalog.abort(job, generation, reason)
            self.inflight.remove(job, generation)
        log_event(
            log, logging.INFO, "generation aborted", job=job, generation=generation, reason=reason
        )

    # -- commit --------------------------------------------------------------------

    def commit(self, manifest: Manifest) -> GenerationInfo:
        """Make a generation durable and visible (order in the module docstring;
        ingest.py)."""
        return ingest.commit(self, manifest)

    # -- reading -------------------------------------------------------------------

    def generations(self, job: str | None = None) -> list[GenerationInfo]:
        """Committed generations (the only visible ones), oldest first."""
        return self.catalog.generations(job, State.COMMITTED)

    def manifest(self, job: str, generation: int) -> Manifest:
        info = self.catalog.get(job, generation)
        if info.state is not State.COMMITTED or info.manifest is None:
            raise GenerationStateError(generation, job, "read it", f"it is {info.state}")
        return self.load_manifest(info.manifest)

    def forget_manifest(self, name: str) -> None:
        with self.lock:
            self._manifests.pop(name, None)

    def load_manifest(self, name: str) -> Manifest:
        with self.lock:
            m = self._manifests.get(name)
        if m is None:
            raw = self.backend.get(Kind.MANIFESTS, name)
            m = manifest_io.decode(open_manifest(self.config.sealer, name, raw), name)
            with self.lock:
                if len(self._manifests) >= 8:
                    self._manifests.pop(next(iter(self._manifests)))
                self._manifests[name] = m
        return m

    def read_chunks(self, namespace: str, ids: Any) -> list[bytes]:
        """Plain bytes of each chunk, each re-hashed against its id (DataCorrupted)."""
        return reader.read_chunks(self, namespace, ids)

    def cache_seen(self, node: str, cache_id: str) -> Lost:
        """An agent connected with this node cache id: packs of another cache of that
        node that never drained are lost (cached.py): the generations that needed them,
        and what holders of copies now drain in its place."""
        with self.lock:
            if not self.cached.packs:
                return Lost([])
            with self.catalog.tx() as db:
                return self.cached.lose(db, node, cache_id)

    def forget_node(self, node: str) -> Lost:
        """An operator says `node` is gone for good: every undrained pack in its caches
        is lost (cached.py), and so is each generation that needed one."""
        why = f"node {node} was forgotten (cpcoord forget) before these packs drained"
        with self.lock:
            if not self.cached.packs:
                return Lost([])
            with self.catalog.tx() as db:
                return self.cached.lose(db, node, None, why)

    def not_in_store(self, namespace: str, ids: IdArray, cache_node: str = "") -> IdArray:
        """The ids the store lacks, less those in `cache_node`'s undrained cached packs."""
        with self.lock:
            missing = ids[~self.index.chunks(namespace).contains(ids)]
            if missing.size and cache_node:
                mine = self.cached.pending_ids(cache_node, namespace)
                missing = missing[~member_of(missing, mine)]
        return missing

    def ensure_in_store(self, namespace: str, ids: IdArray, cache_node: str = "") -> None:
        """NotDrained when some of these chunks are still only in node caches (other
        than `cache_node`'s, whose reader reads its own cache)."""
        missing = self.not_in_store(namespace, ids, cache_node)
        if missing.size:
            err = reader.lost(self, namespace, missing)
            if isinstance(err, NotDrained):
                raise err

    def locate_chunks(self, namespace: str, ids: Any, cache_node: str = "") -> reader.Located:
        """Where each chunk lies (pack, offset, sizes, method): ids in, locations out;
        chunks only in `cache_node`'s cache as its cached packs (reader.Located)."""
        return reader.locate_chunks(self, namespace, ids, cache_node)

    def iter_pages(
        self, job: str, generation: int, member: str | None = None, region: str | None = None
    ) -> Iterator[PageRun]:
        """Every page entry of a committed generation, in order, contents verified."""
        return reader.iter_pages(self, job, generation, member, region)

    def read_region(self, job: str, generation: int, member: str, region: str) -> bytearray:
        """A whole region as bytes; pages without an entry read as zero."""
        return reader.read_region(self, job, generation, member, region)

    def pin(self, job: str, generation: int, pinned: bool = True) -> None:
        """Pinned generations survive retention."""
        self.catalog.set_pinned(job, generation, pinned)

    def delete_generation(self, job: str, generation: int) -> None:
        """Delete a committed (unpinned) or aborted generation now; gc reclaims its space."""
        with self.lock:
            info = self.catalog.get(job, generation)
            if info.state is State.PREPARING:
                raise GenerationStateError(generation, job, "delete it", "it is in flight")
            if info.pinned:
                raise GenerationStateError(generation, job, "delete it", "it is pinned")
            if generation in self.inflight.protected_parents(job):
                why = "it is the parent of a generation in flight"
                raise GenerationStateError(generation, job, "delete it", why)
            gone = [generation]
            self.catalog.delete(job, gone, lambda db: self.cached.forget(db, job, gone))
            self._manifests.pop(info.manifest or "", None)
        if info.manifest:
            self.backend.delete(Kind.MANIFESTS, info.manifest)

    def gc(self, keep: int = 5) -> GcReport:
        """Retention (last `keep` committed per job, plus pinned ones and parents of
        generations in flight), then remove everything no kept manifest references."""
        return collect(self, keep)

    def verify(self) -> VerifyReport:
        """Re-read and re-hash every chunk of every committed manifest."""
        return verify(self)

    def stats(self) -> StoreStats:
        return stats(self)
