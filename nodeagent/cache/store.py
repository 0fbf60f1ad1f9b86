"""The node cache (`cpcoord agent --cache DIR`): packs kept on this node so a checkpoint
commits at local speed (level `local`, docs/multilevel.md), drained to the store later.

Layout: DIR is a LocalBackend (packs at DIR/packs/nodes/NODE/ID, put atomically and
durably: temp file, fsync, rename, fsync of the directory), plus a ledger DIR/ledger/
JOB/GEN.json per committed generation that has cached packs: {"packs": [...],
"drained": bool}. The ledger is what retention works from; what must still drain is the
coordinator's word (Welcome.drain), so a ledger lost or stale costs cache space only.

Space: `size` bytes (0: the file system's free space is the only bound). A pack that
does not fit after evicting drained generations (beyond `keep` per job first, then the
oldest drained ones) goes to the store directly (TieredBackend), with a warning once per
generation and `full` counted: never a failed checkpoint. A generation not yet drained
is never evicted, nor a pack another kept generation lists.

Spare files (DIR/spare, nodeagent/cache/spares.py) hold tmpfs pages allocated before a
checkpoint for its packs to be written over; they count as space in use, less the one a
pack about to be put would take.

Thread-safe (one lock); pack I/O happens outside it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from cpcoord.errors import ObjectNotFound
from nodeagent.cache.spares import Spares
from storecore.backend import Backend, Buffer, Kind, LocalBackend, MappedBackend, ObjectInfo

log = logging.getLogger(__name__)
GenKey = tuple[str, int]


class NodeCache:
    def __init__(self, root: Path, size: int = 0, keep: int = 2) -> None:
        self.root = Path(root)
        self.backend = LocalBackend(self.root)
        # What reads of cached packs see: the cache, and partner copies when this node
        # holds some (nodeagent/cache/partner.py, CacheView).
        self.reader: MappedBackend = self.backend
        self.others: Callable[[], int] = lambda: 0  # bytes of partner copies kept in DIR
        self.size = size
        self.keep = max(1, keep)
        self.full = 0  # packs that went to the store because the cache was full
        self._lock = threading.Lock()
        self._ledger_dir = self.root / "ledger"
        self._ledger_dir.mkdir(mode=0o700, exist_ok=True)
        self.id = _cache_id(self.root)
        self._sizes: dict[str, int] = {o.name: o.size for o in self.backend.list(Kind.PACKS)}
        self._pending: dict[GenKey, list[str]] = {}  # generations in flight: cached packs
        self._ledger: dict[GenKey, dict[str, object]] = dict(self._read_ledger())
        self._warned: set[GenKey] = set()
        self.spares = Spares(self.root, self._room)
        if self.backend.gathers:  # only tmpfs pages are worth allocating ahead
            self.backend.spares = self.spares

    # -- space ----------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def reserve(self, job: str, generation: int, name: str, n: int) -> bool:
        """Room for a pack of `n` bytes of (job, generation)? Evicts drained generations
        if needed. False: it must go to the store (counted, warned once per generation)."""
        with self._lock:
            if self._fits(n) or (self._evict(n) and self._fits(n)):
                self._sizes[name] = n
                self._pending.setdefault((job, generation), []).append(name)
                return True
            self.full += 1
            first = (job, generation) not in self._warned
            self._warned.add((job, generation))
        if first:
            log.warning(
                "node cache full: writing the store directly",
                extra={"fields": {"job": job, "generation": generation, "pack_bytes": n,
                                  "cache_bytes": self.bytes, "cache_size": self.size}},
            )  # fmt: skip
        return False

    def prepare(self, spare_bytes: int, member_bytes: int) -> None:
        """A member of `member_bytes` may be checkpointed soon into packs of up to
        `spare_bytes`: allocate spare files for them (on tmpfs only)."""
        if self.backend.spares is not None:
            self.spares.request(spare_bytes, member_bytes)

    def _room(self, n: int) -> bool:
        """Whether a spare of `n` bytes fits beside what the cache holds."""
        with self._lock:
            return self._fits(n, spare=False)

    def _fits(self, n: int, spare: bool = True) -> bool:
        """(lock held) With `spare`, a pack that will take a spare file (if any)."""
        reuse = self.spares.size if spare and self.spares.count else 0
        used = sum(self._sizes.values()) + self.others() + self.spares.bytes - reuse
        if self.size:
            return used + n <= self.size
        st = os.statvfs(self.root)
        return n <= st.f_bavail * st.f_frsize + reuse

    def _evict(self, n: int) -> bool:
        """Drop drained generations, oldest first, until `n` more bytes fit (lock held)."""
        done = sorted(k for k, e in self._ledger.items() if e.get("drained"))
        for k in done:
            if self._fits(n):
                break
            self._forget(k)
        return True

    def unreserve(self, name: str) -> None:
        """A put into the cache failed: the space is not taken."""
        with self._lock:
            self._sizes.pop(name, None)

    # -- generations ----------------------------------------------------------------------

    def cached(self, job: str, generation: int) -> list[str]:
        with self._lock:
            return list(self._pending.get((job, generation), ()))

    def committed(self, job: str, generation: int) -> list[str]:
        """The generation committed: its cached packs go into the ledger (to drain)."""
        with self._lock:
            names = self._pending.pop((job, generation), [])
            self._warned.discard((job, generation))
            if names:
                self._ledger[(job, generation)] = {"packs": names, "drained": False}
                self._write((job, generation))
        self.spares.refill()  # for the next checkpoint, now that this one is over
        return names

    def aborted(self, job: str, generation: int) -> None:
        """Its cached packs are garbage, unless a kept generation lists one."""
        with self._lock:
            names = self._pending.pop((job, generation), [])
            self._warned.discard((job, generation))
            self._delete([n for n in names if not self._listed(n)])
        self.spares.refill()

    def drained(self, job: str, generation: int, names: Sequence[str]) -> None:
        """Every pack of the generation is in the store and the coordinator took them:
        mark it, then keep the newest `keep` generations of the job."""
        with self._lock:
            e = self._ledger.setdefault((job, generation), {"packs": list(names)})
            e["drained"] = True
            self._write((job, generation))
            gens = sorted(g for (j, g) in self._ledger if j == job)
            for g in gens[: -self.keep]:
                if self._ledger[(job, g)].get("drained"):
                    self._forget((job, g))

    def sweep(self, owed: set[str]) -> int:
        """At a Welcome (a new stream: what was in flight on the old one was aborted, and
        its Abort may never have come): drop packs neither the ledger lists nor the
        coordinator says are owed to the store (`owed`); returns how many."""
        with self._lock:
            self._pending.clear()
            gone = [n for n in self._sizes if n not in owed and not self._listed(n)]
            self._delete(gone)
        if gone:
            log.info("node cache: dropped packs of aborted generations",
                     extra={"fields": {"packs": len(gone)}})  # fmt: skip
        return len(gone)

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._sizes

    def _listed(self, name: str) -> bool:
        return any(name in e["packs"] for e in self._ledger.values())  # type: ignore[operator]

    def _forget(self, k: GenKey) -> None:
        e = self._ledger.pop(k, None)
        (self._ledger_dir / k[0] / f"{k[1]}.json").unlink(missing_ok=True)
        if e is not None:
            self._delete([n for n in e["packs"] if not self._listed(n)])  # type: ignore[attr-defined]

    def _delete(self, names: list[str]) -> None:
        for n in names:
            self._sizes.pop(n, None)
            self.backend.delete(Kind.PACKS, n)

    # -- the ledger files -----------------------------------------------------------------

    def _write(self, k: GenKey) -> None:
        d = self._ledger_dir / k[0]
        d.mkdir(mode=0o700, exist_ok=True)
        tmp = d / f".{k[1]}.tmp"
        tmp.write_text(json.dumps(self._ledger[k]))
        os.replace(tmp, d / f"{k[1]}.json")

    def _read_ledger(self) -> Iterator[tuple[GenKey, dict[str, object]]]:
        for d in self._ledger_dir.iterdir():
            for f in d.glob("*.json") if d.is_dir() else ():
                try:
                    yield (d.name, int(f.stem)), json.loads(f.read_text())
                except (ValueError, OSError) as e:
                    log.warning("unreadable cache ledger entry", extra={"fields": {
                        "file": str(f), "error": str(e)}})  # fmt: skip


class TieredBackend:
    """The store as one generation's pack sink sees it: packs go into the node cache when
    they fit (and are remembered as cached), else into the store; everything else is
    the store's."""

    def __init__(
        self, cache: NodeCache, store: Backend, job: str, generation: int,
        on_full: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self.cache, self.store = cache, store
        self.job, self.generation = job, generation
        self.on_full = on_full

    @property
    def location(self) -> str:
        return self.store.location

    @property
    def source(self) -> str:
        return self.store.source

    @property
    def remote(self) -> bool:
        return self.store.remote

    def put_parts(self, kind: Kind, name: str, parts: Sequence[Buffer]) -> None:
        n = sum(len(p) for p in parts)
        if kind is Kind.PACKS and self.cache.reserve(self.job, self.generation, name, n):
            try:
                self.cache.backend.put_parts(kind, name, parts)
            except BaseException:
                self.cache.unreserve(name)
                raise
            return
        if kind is Kind.PACKS and self.on_full is not None:
            self.on_full()
        put_parts = getattr(self.store, "put_parts", None)
        if put_parts is not None:
            put_parts(kind, name, parts)
        else:
            self.store.put(kind, name, b"".join(parts))

    def put(self, kind: Kind, name: str, data: Buffer) -> None:
        self.put_parts(kind, name, [data])

    def get(self, kind: Kind, name: str) -> bytes:
        return self.store.get(kind, name)

    def get_range(self, kind: Kind, name: str, offset: int, length: int) -> bytes:
        return self.store.get_range(kind, name, offset, length)

    def stat(self, kind: Kind, name: str) -> ObjectInfo:
        return self.store.stat(kind, name)

    def exists(self, kind: Kind, name: str) -> bool:
        return self.store.exists(kind, name)

    def list(self, kind: Kind) -> Iterator[ObjectInfo]:
        return self.store.list(kind)

    def delete(self, kind: Kind, name: str) -> None:
        self.store.delete(kind, name)

    def discard_incomplete(self) -> int:
        return 0

    def close(self) -> None:
        pass


def mapped_cached(cache: NodeCache, name: str) -> AbstractContextManager[memoryview]:
    """A cached pack's bytes, mapped (ObjectNotFound when the cache lost it; the mapping
    keeps its pages if it is evicted meanwhile)."""
    if not cache.has(name):
        raise ObjectNotFound("packs", name)
    return cache.backend.mapped(Kind.PACKS, name)


def _cache_id(root: Path) -> str:
    """The cache's id, made with it (DIR/cache-id): a cache deleted or on a rebooted
    tmpfs comes back with another, and the coordinator knows its packs are gone."""
    path = root / "cache-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    new = secrets.token_hex(16)
    tmp = root / ".cache-id.tmp"
    tmp.write_text(new + "\n")
    os.replace(tmp, path)
    return new
