"""Generations in flight and what they protect from garbage collection.

Between `begin` and `commit`/`abort`, a generation's future manifest may reference:
  1. chunks it uploaded (in packs no manifest references yet),
  2. chunks `missing()` told it the store already has (so it did not upload them), and
  3. chunks of packs agents put themselves and reported for it (nodepacks.py), and
  4. chunks of its parent generation (pages unchanged since, copied into the new,
     complete manifest by the coordinator without asking `missing()`).
GC keeps (1), (2) and (3) alive by treating every id *claimed* by an in-flight generation as
referenced, and (4) by never dropping the parent of an in-flight generation. The mark
phase and the removal of dead ids from the index happen under the repository lock, the
same lock under which `missing()` claims ids: so an id is either claimed before the mark
(and kept) or looked up after the removal (and reported missing, so it is uploaded
again). A pack an agent put but has not reported yet is not in the index, and gc deletes
only indexed packs (an agent's unfinished put only after NODE_TEMP_GRACE, backend.py):
it is never removed under the agent's feet. A crashed coordinator loses this state, and
with it every in-flight generation: reopening the store aborts every PREPARING generation.

The registry is not thread-safe by itself; the repository calls it under its lock.
Claims are kept as id arrays (32 bytes per id), never as Python objects per id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cpcoord.errors import GenerationStateError
from storecore.ids import ID_DTYPE, IdArray, unique_ids

if TYPE_CHECKING:
    from coordinator.store.cached import CachedPack
    from coordinator.store.nodepacks import Taken


@dataclass
class InFlight:
    job: str
    generation: int
    parent: int | None
    namespace: str
    started: float = field(default_factory=time.monotonic)
    claims: list[IdArray] = field(default_factory=list)
    chunks_new: int = 0
    bytes_new: int = 0  # stored bytes of the chunks it added
    packs: list[Taken] = field(default_factory=list)  # agents' packs it took (nodepacks.py)
    bad: dict[str, str] = field(default_factory=dict)  # node -> why its data is bad
    # Level `local` (cached.py): packs agents put into their node caches for it, and the
    # nodes for which MissingChunks counted a cached chunk as present.
    cached: list[CachedPack] = field(default_factory=list)
    cached_nodes: set[str] = field(default_factory=set)

    def claim(self, ids: IdArray) -> None:
        if ids.size:
            self.claims.append(ids)
            if len(self.claims) > 64:  # keep the list short: fold into one sorted array
                self.claims = [unique_ids(np.concatenate(self.claims))]

    def claimed(self) -> IdArray:
        return unique_ids(np.concatenate(self.claims)) if self.claims else np.zeros(0, ID_DTYPE)


class Registry:
    def __init__(self) -> None:
        self._gens: dict[tuple[str, int], InFlight] = {}

    def add(self, g: InFlight) -> None:
        self._gens[(g.job, g.generation)] = g

    def get(self, job: str, generation: int, verb: str) -> InFlight:
        g = self._gens.get((job, generation))
        if g is None:
            raise GenerationStateError(generation, job, verb, "it is not in flight")
        return g

    def remove(self, job: str, generation: int) -> InFlight | None:
        return self._gens.pop((job, generation), None)

    def all(self) -> list[InFlight]:
        return list(self._gens.values())

    def is_in_flight(self, job: str, generation: int) -> bool:
        return (job, generation) in self._gens

    def protected_ids(self, namespace: str) -> IdArray:
        """Sorted unique ids claimed by in-flight generations of a namespace."""
        parts = [g.claimed() for g in self._gens.values() if g.namespace == namespace]
        return unique_ids(np.concatenate(parts)) if parts else np.zeros(0, ID_DTYPE)

    def protected_parents(self, job: str) -> set[int]:
        return {g.parent for g in self._gens.values() if g.job == job and g.parent is not None}
