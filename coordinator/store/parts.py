"""The repository's parts its maintenance modules work on, as a narrow structural view.

gc.py, index_io.py, reader.py, verify.py and rebuild.py act on a Repository's index,
catalog, backend and lock; they take `StoreParts`, never the Repository class, so the
import graph runs one way: repository -> those modules -> parts. `MAINTENANCE` is the
process-wide lock that lets one gc or verify run at a time (both walk every pack).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

from coordinator.store.catalog import Catalog
from coordinator.store.config import StoreConfig
from coordinator.store.index import Index
from coordinator.store.inflight import Registry
from coordinator.store.manifest import Manifest

if TYPE_CHECKING:
    from coordinator.store.cached import CachedPacks
    from coordinator.store.nodepacks import Trust
from storecore.backend import Backend

MAINTENANCE = threading.Lock()  # one gc (or verify) at a time per process


class StoreParts(Protocol):
    """What a Repository shares with its maintenance modules. `lock` guards the index,
    the open packs, the in-flight registry, `unindexed` and the catalog steps."""

    backend: Backend
    config: StoreConfig
    catalog: Catalog
    index: Index
    inflight: Registry
    lock: threading.RLock
    unindexed: list[int]  # pack numbers not yet in an index file
    unreadable_packs: dict[str, str]  # name -> why (found at open)
    recent_puts: set[str]  # packs stored since gc's mark (gc must not delete)
    trust: Trust  # agents' chunks checked across nodes (nodepacks.py)
    cached: CachedPacks  # packs in agents' node caches, level local (cached.py)

    def step(self, name: str) -> None:
        """A commit or gc step is done (the fault hook of crash tests)."""

    def integrate(self, block: bool) -> None:
        """Index the packs the writer has stored; raise its first failure."""

    def manifest(self, job: str, generation: int) -> Manifest:
        """A committed generation's manifest."""

    def load_manifest(self, name: str) -> Manifest:
        """A manifest by object name (cached)."""

    def forget_manifest(self, name: str) -> None:
        """Drop a deleted manifest from the cache."""
