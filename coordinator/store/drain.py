"""Level `local` in the repository: cached packs taken at upload, the local commit's
extra rows, and the drain that raises generations to `store` (docs/multilevel.md;
the ledger is cached.py).

Upload (`take_cached`): a report marked `cached` names a pack in the agent's node
cache. The coordinator cannot read it: it checks only what needs no bytes (the name is
under the reporting node's prefix, the ids parse) and remembers it on the generation in
flight; its ids count as present for that node from then on.

Drain (`take_drained`): the agent put cached packs into the store and reports them.
Each must be a cached pack of that node the ledger still wants; it is checked exactly as
a direct-path report (nodepacks.check: size, trailer, namespace, ids, a sample read
back), indexed, and marked drained; every generation whose packs are now all drained has
its manifest's references checked against the index (what the local commit could not)
and rises to `store`, all in one catalog transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from coordinator.store import index_io, nodepacks
from coordinator.store.cached import CachedPack, CachedPacks
from coordinator.store.catalog import GenerationInfo, State
from coordinator.store.references import check_references
from cpcoord.errors import CpcoordError, InvalidArgument, NoSuchGeneration
from cpcoord.log import log_event
from storecore.ids import ID_DTYPE, IdArray, as_id_array, member_of, unique_ids
from storecore.names import node_of, node_prefix

if TYPE_CHECKING:
    from coordinator.store.inflight import InFlight
    from coordinator.store.parts import StoreParts

log = logging.getLogger("cpcoord.store.drain")


def take_cached(
    g: InFlight, node: str, reports: Sequence[nodepacks.Report], cache_id: str = ""
) -> tuple[int, int]:
    """Record cached packs for generation `g` (caller holds the lock); (chunks, bytes)."""
    known = {p.name for p in g.cached}
    chunks = nbytes = 0
    for r in reports:
        if not r.name.startswith(node_prefix(node)) or node_of(r.name) != node:
            raise InvalidArgument(f"pack {r.name!r} is not under node {node}'s prefix")
        if len(r.ids) % 32:
            raise InvalidArgument(f"pack {r.name}: ids are not a multiple of 32 bytes")
        if r.name in known:
            continue
        known.add(r.name)
        g.cached.append(
            CachedPack(r.name, node, g.namespace, r.size, r.ids, g.job, g.generation,
                       cache_id=cache_id)
        )  # fmt: skip
        g.cached_nodes.add(node)
        chunks += len(r.ids) // 32
        nbytes += r.size
    g.chunks_new += chunks
    g.bytes_new += nbytes
    return chunks, nbytes


def cached_present(cached: CachedPacks, g: InFlight, node: str, ids: IdArray) -> np.ndarray:
    """Which ids `node` holds in its cache for `g` (its own cached packs of this
    generation, or undrained ones of earlier generations); marks the node a dependency."""
    mine = [as_id_array(p.ids) for p in g.cached if p.node == node]
    mine.append(cached.pending_ids(node, g.namespace))
    have = unique_ids(np.concatenate(mine)) if mine else np.zeros(0, ID_DTYPE)
    out = member_of(ids, have) if have.size else np.zeros(ids.size, dtype=bool)
    if out.any():
        g.cached_nodes.add(node)
    return out


def commit_plan(cached: CachedPacks, g: InFlight) -> tuple[IdArray | None, set[str]]:
    """(ids that may be absent from the store, pack names it depends on); (None, empty)
    for a generation that commits at `store`."""
    if not g.cached_nodes:
        return None, set()
    deps = {p.name for p in g.cached} | cached.undrained(g.cached_nodes, g.namespace)
    parts = [as_id_array(p.ids) for p in g.cached]
    parts += [cached.pending_ids(n, g.namespace) for n in g.cached_nodes]
    return unique_ids(np.concatenate(parts)), deps


def take_drained(
    repo: StoreParts, cached: CachedPacks, node: str, reports: Sequence[nodepacks.Report]
) -> list[GenerationInfo]:
    """Check and index drained packs of `node`, raise the generations now wholly in the
    store; returns them (at their new level). Bad data raises (InvalidArgument,
    ChunkMismatch): the pack is lying and nothing of it counts."""
    with repo.lock:
        todo: list[tuple[nodepacks.Report, str, str]] = []
        for r in reports:
            p = cached.packs.get(r.name)
            if p is None or (p.node != node and not cached.drains_for(p, node)):
                if p is None and repo.index.pack_number(r.name) is not None:
                    continue  # drained and settled before (a report sent again)
                if p is None and r.name in cached.retired:
                    continue  # its generations were deleted while it drained
                raise InvalidArgument(f"pack {r.name!r} is not a cached pack of node {node}")
            if p.drained or r.name in repo.trust.lying:
                continue
            if (r.size, r.ids) != (p.size, p.ids):
                raise InvalidArgument(f"pack {r.name} is not the pack reported at commit")
            todo.append((r, p.namespace, p.node))
    taken = []
    for r, ns, owner in todo:  # a holder drains an owner's pack under the owner's prefix
        try:
            taken.append(nodepacks.check(repo, owner, ns, r))
        except CpcoordError:
            with repo.lock:
                repo.trust.lying.add(r.name)
            raise
    with repo.lock:
        for t in taken:
            repo.index.add_pack(t.id, t.size, t.contents, t.name)
            no = repo.index.pack_number(t.name)
            assert no is not None
            repo.unindexed.append(no)
            repo.recent_puts.add(t.name)
        if taken:
            index_io.persist_new(repo)
        drained = {t.name for t in taken}
        raised = [k for k in cached.ready(drained) if _references_hold(repo, *k)]
        with repo.catalog.tx() as db:
            cached.apply(db, drained, raised)
        cached.applied(drained, raised)
    out = []
    for job, gen in raised:
        info = repo.catalog.get(job, gen)
        if info.state is State.COMMITTED:
            out.append(info)
            log_event(log, logging.INFO, "generation in the store", job=job, generation=gen)
    return out


def _references_hold(repo: StoreParts, job: str, generation: int) -> bool:
    """Every chunk the manifest names is in the index now, long enough for its entries."""
    try:
        m = repo.manifest(job, generation)
        check_references(m, repo.index, 0)
        return True
    except NoSuchGeneration:  # deleted meanwhile: nothing depends on its packs
        return True
    except CpcoordError as e:
        log_event(
            log, logging.WARNING, "drained generation still lacks chunks", job=job,
            generation=generation, why=str(e),
        )  # fmt: skip
        return False
