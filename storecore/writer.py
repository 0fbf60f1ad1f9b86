"""The pack sink: open packs per namespace, sealed and stored by a background thread.

Ingest appends compressed chunks to the open pack of their namespace. A full pack is
handed to a writer thread (WRITERS of them), which joins it, hashes it (its id) and puts
it (write + fsync); BLAKE3 and fsync release the GIL, so the next batch's hashing and
compression overlap with the previous packs' I/O. At most MAX_IN_TRANSIT packs wait for the
writer (backpressure: ingest blocks rather than buffering without bound).

Until a pack is stored and indexed, its ids still count as present (`contains`), so a
chunk is never uploaded twice. The sink does no locking of its own: the repository calls
it under its lock; a writer thread only touches the pack it was given. Completed packs
are collected with `reap()` (non-blocking) or `flush()` (barrier: every pack added so
far is durable); both return the first failed put as a StoreError after forgetting that
pack's ids (so they are reported missing and uploaded again, and a commit that needs
them fails with ChunkMissing instead of referencing data that is not there).

Borrowed blobs (`borrow=True`): a pack owns its bytes by copying each chunk into its
arena (arena.py), because the caller reuses its buffers. When the backend's put_parts
writes the parts as they are (a directory: writev into tmpfs pages, or O_DIRECT from
where they lie on disk, directio.py) that copy is the whole difference, so a borrowing
sink keeps the caller's buffers instead. The caller then
promises they stay unchanged until every pack holding them is stored or dropped:
`flush()` returned, or `close()` (an agent holds its staging until then:
nodeagent/upload/direct.py, `PackBuilder.close`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cpcoord.errors import StoreError
from storecore.arena import Arena, ArenaPool
from storecore.backend import Backend, Buffer, Kind
from storecore.ids import IdArray, member_of, unique_ids
from storecore.packs import PackContents, PackWriter

WRITERS = 2  # two puts in flight overlap one's write with the other's fsync (~1.8x here)
MAX_IN_TRANSIT = 3


@dataclass(frozen=True)
class StoredPack:
    id: bytes
    size: int
    contents: PackContents
    name: str = ""  # its object name: the id in hex, under the sink's prefix

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.id.hex())


class _Open:
    """One namespace's open pack and the ids in it."""

    def __init__(self, namespace: str, arena: Arena | None = None, borrow: bool = False) -> None:
        self.writer = PackWriter(namespace, arena, borrow)
        self.ids: list[IdArray] = []
        self._sorted: IdArray | None = None

    def contains(self, ids: IdArray) -> npt.NDArray[np.bool_]:
        if not self.ids:
            return np.zeros(ids.size, dtype=bool)
        if self._sorted is None:
            self._sorted = unique_ids(np.concatenate(self.ids))
        return member_of(ids, self._sorted)

    def note(self, ids: IdArray) -> None:
        """Record ids added to the pack. The sorted copy is kept by inserting the new ids
        (a memmove), not re-sorted whole: thousands of small uploads into one pack made
        every lookup sort everything added so far."""
        self.ids.append(ids)
        if self._sorted is not None:
            new = unique_ids(ids)
            new = new[~member_of(new, self._sorted)]
            self._sorted = np.insert(self._sorted, np.searchsorted(self._sorted, new), new)


class PackSink:
    def __init__(
        self,
        backend: Backend,
        pack_size: int,
        prefix: str = "",
        arenas: ArenaPool | None = None,
        borrow: bool = False,
    ) -> None:
        self._backend = backend
        self._borrow = borrow  # module docstring: keep the caller's buffers
        # Open packs copy mutable chunks into these (arena.py), unless they borrow.
        self._arenas = None if borrow else arenas
        self._prefix = prefix  # agents: their node's prefix (storecore/names.py)
        self._pack_size = pack_size
        self._open: dict[str, _Open] = {}
        self._transit: list[tuple[_Open, Future[StoredPack]]] = []
        self._pool = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="pack-writer")

    def contains(self, namespace: str, ids: IdArray) -> npt.NDArray[np.bool_]:
        """Ids held by an open or in-transit pack of the namespace."""
        mask = np.zeros(ids.size, dtype=bool)
        for o in [self._open.get(namespace), *(o for o, _ in self._transit)]:
            if o is not None and o.writer.namespace == namespace:
                mask |= o.contains(ids)
        return mask

    def open_bytes(self, namespace: str) -> int:
        """Bytes in the namespace's open pack (0: none open)."""
        o = self._open.get(namespace)
        return o.writer.size if o is not None else 0

    def add(
        self,
        namespace: str,
        ids: IdArray,
        methods: npt.NDArray[np.uint8],
        blobs: Sequence[Buffer],
        raw_sizes: npt.NDArray[np.integer],
    ) -> None:
        o = self._open.get(namespace)
        if o is None:
            arena = self._arenas.get() if self._arenas is not None else None
            o = self._open[namespace] = _Open(namespace, arena, self._borrow)
        o.writer.add(ids, methods, blobs, raw_sizes)
        o.note(ids)
        if o.writer.size >= self._pack_size:
            self.seal(namespace)

    def seal(self, namespace: str | None = None) -> None:
        """Hand the open pack of a namespace (of every one: None) to the writer."""
        names = list(self._open) if namespace is None else [namespace]
        for ns in names:
            o = self._open.pop(ns, None)
            if o is None or not o.writer.count:
                continue
            busy = [f for _, f in self._transit if not f.done()]
            if len(busy) >= MAX_IN_TRANSIT:  # backpressure: wait for the writer
                wait(busy, return_when=FIRST_COMPLETED)
            self._transit.append((o, self._pool.submit(self._store, o.writer)))

    def _store(self, w: PackWriter) -> StoredPack:
        try:
            return self._put(w)
        finally:
            w.release()
            if w.arena is not None and self._arenas is not None:
                self._arenas.put(w.arena)

    def _put(self, w: PackWriter) -> StoredPack:
        sp = w.seal_parts()
        name = self._prefix + sp.id.format()
        put_parts = getattr(self._backend, "put_parts", None)
        if put_parts is not None:  # the local backend: no joined copy of the pack
            put_parts(Kind.PACKS, name, sp.parts)
        elif len(sp.parts) == 1:  # laid out flat in its arena: put from there (S3)
            self._backend.put(Kind.PACKS, name, sp.parts[0])
        else:
            self._backend.put(Kind.PACKS, name, b"".join(sp.parts))
        return StoredPack(sp.id.digest, sp.size, sp.contents, name)

    def reap(self, block: bool = False) -> tuple[list[StoredPack], StoreError | None]:
        """(packs stored since the last reap, oldest first; the first failure if any).
        With block, wait for every pack in transit. A failed pack's ids are forgotten."""
        done: list[StoredPack] = []
        error: StoreError | None = None
        keep = []
        for o, f in self._transit:
            if not block and not f.done():
                keep.append((o, f))
                continue
            e = f.exception()
            if e is None:
                done.append(f.result())
            elif error is None:
                error = e if isinstance(e, StoreError) else StoreError(f"cannot store a pack: {e}")
        self._transit = keep
        return done, error

    def flush(self) -> tuple[list[StoredPack], StoreError | None]:
        """Seal every open pack and wait until all are stored (the commit barrier)."""
        self.seal()
        return self.reap(block=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for o in self._open.values():  # never stored (an aborted upload): free the arenas
            o.writer.release()
            if o.writer.arena is not None and self._arenas is not None:
                self._arenas.put(o.writer.arena)
        self._open.clear()
