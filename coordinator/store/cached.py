"""Packs held in agents' node caches, not (yet) in the store: the ledger behind the
durability level `local` and its drain (docs/multilevel.md).

A generation commits at `local` when some of the chunks its manifest names are in packs
an agent put into its node's cache (`StoredPack.cached`). The coordinator cannot read
them, so at commit it records them (`cached_packs`: name, node, namespace, size, ids,
the generation that reported it, drained) and which of them the generation depends on
(`generation_packs`): its own cached packs, plus every undrained cached pack of a node
whose MissingChunks answer counted a cached chunk as present (conservative: a node's
cached packs drain oldest first, so depending on all of them costs nothing). Both go in
the transaction that flips the row to COMMITTED. The pack checks of the direct path
happen when a pack is drained (drain.py); a generation rises to `store` once every pack
it depends on is drained, and its rows then leave these tables.

In memory: every row, loaded at open; the ids of a node's undrained packs per namespace
are what MissingChunks counts as present for that node. Guarded by the repository lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from coordinator.store.catalog import Catalog, Level
from storecore.ids import ID_DTYPE, IdArray, as_id_array, search_ids, unique_ids

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cached_packs (
    name TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    namespace TEXT NOT NULL,
    size INTEGER NOT NULL,
    ids BLOB NOT NULL,
    job TEXT NOT NULL,
    generation INTEGER NOT NULL,
    drained INTEGER NOT NULL DEFAULT 0,
    cache_id TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS generation_packs (
    job TEXT NOT NULL,
    generation INTEGER NOT NULL,
    pack TEXT NOT NULL,
    PRIMARY KEY (job, generation, pack)
);
CREATE TABLE IF NOT EXISTS partner_copies (
    pack TEXT NOT NULL,
    holder TEXT NOT NULL,
    cache_id TEXT NOT NULL,
    PRIMARY KEY (pack, holder)
);
CREATE TABLE IF NOT EXISTS lost_generations (
    job TEXT NOT NULL,
    generation INTEGER NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (job, generation)
);
"""

GenKey = tuple[str, int]
# cached_packs.cache_id of a pack whose owner lost its cache while a partner copy lived
# on: the pack stays in the ledger (the copy serves reads), the owner no longer has it.
OWNER_LOST = "-"


@dataclass(frozen=True)
class CachedPack:
    name: str
    node: str
    namespace: str
    size: int
    ids: bytes  # n * 32-byte chunk ids as reported
    job: str
    generation: int
    drained: bool = False
    cache_id: str = ""  # the node cache that holds it (Hello.cache_id)


@dataclass(frozen=True)
class Lost:
    """What `CachedPacks.lose` did: the generations lost, how many packs went, and how
    many undrained packs a holder of a copy now drains in a new owner's place (marked
    OWNER_LOST now, or already so and their first holder's copy dropped): only then
    has a holder anything new to take over (levels.take_over)."""

    keys: list[GenKey]
    packs: int = 0
    handed: int = 0
    # Partner copies it held that were dropped: with `handed` and `keys`, whether any
    # generation's level may have changed (partners.copies_lost re-levels only then).
    copies: int = field(default=0, compare=False)


class CachedPacks:
    """The ledger (module docstring). Not thread-safe: callers hold the repository lock."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        with catalog.tx() as db:
            for stmt in _statements():  # not executescript: it would end the transaction
                db.execute(stmt)
            rows = db.execute(
                "SELECT name, node, namespace, size, ids, job, generation, drained, cache_id "
                "FROM cached_packs ORDER BY rowid"
            ).fetchall()
            deps = db.execute("SELECT job, generation, pack FROM generation_packs").fetchall()
            lost = db.execute("SELECT job, generation, reason FROM lost_generations").fetchall()
            copies = db.execute("SELECT pack, holder, cache_id FROM partner_copies").fetchall()
        self.packs: dict[str, CachedPack] = {
            r[0]: CachedPack(
                r[0], r[1], r[2], int(r[3]), bytes(r[4]), r[5], int(r[6]), bool(r[7]), r[8]
            )
            for r in rows
        }
        # Generations that depended on packs of a lost cache: never in the store.
        self.lost: dict[GenKey, str] = {(j, int(g)): why for j, g, why in lost}
        self.deps: dict[GenKey, set[str]] = {}
        for job, gen, pack in deps:
            self.deps.setdefault((job, int(gen)), set()).add(pack)
        self._ids: dict[tuple[str, str], IdArray] = {}
        # Undrained packs of deleted generations (forget): a late drain report of one is
        # not a lie. In memory only: after a restart such a report is refused, harmlessly.
        self.retired: set[str] = set()
        # Checked partner copies (partners.py): pack -> holder node -> its cache id.
        self.copies: dict[str, dict[str, str]] = {}
        for pack, holder, cid in copies:
            self.copies.setdefault(pack, {})[holder] = cid

    # -- what counts as present -------------------------------------------------------

    def pending_ids(self, node: str, namespace: str) -> IdArray:
        """Sorted unique ids of `node`'s undrained cached packs of a namespace."""
        key = (node, namespace)
        got = self._ids.get(key)
        if got is None:
            parts = [
                as_id_array(p.ids)
                for p in self.packs.values()
                if p.node == node
                and p.namespace == namespace
                and not p.drained
                and p.cache_id != OWNER_LOST
            ]
            got = unique_ids(np.concatenate(parts)) if parts else np.zeros(0, ID_DTYPE)
            self._ids[key] = got
        return got

    def pending_in(self, namespace: str) -> IdArray:
        """Sorted unique ids of every node's undrained cached packs of a namespace."""
        parts = [
            as_id_array(p.ids)
            for p in self.packs.values()
            if p.namespace == namespace and not p.drained
        ]
        return unique_ids(np.concatenate(parts)) if parts else np.zeros(0, ID_DTYPE)

    def locate(
        self, ids: IdArray, namespace: str, node: str = "",
        reachable: Callable[[str], bool] | None = None,
    ) -> tuple[list[str], list[str], npt.NDArray[np.int64]]:  # fmt: skip
        """Where chunks lie in node caches (a read of a generation not yet in the store):
        the undrained cached packs of `namespace` as (names, the node to read each from)
        and per id an index into them, -1 for an id none lists. With `node`: only packs
        that node holds (its own, or partner copies it holds). Else each pack is read from
        its owner while the owner has it and is `reachable`, else from a reachable
        holder of a partner copy, else named with its owner (who is then unreachable)."""
        chosen: list[tuple[CachedPack, str]] = []
        for p in self.packs.values():
            if p.namespace != namespace or p.drained:
                continue
            if node:
                own = p.cache_id != OWNER_LOST
                if (own and p.node == node) or node in self.copies.get(p.name, {}):
                    chosen.append((p, node))
                continue
            chosen.append((p, self.source(p, reachable)))
        where = np.full(ids.size, -1, dtype=np.int64)
        if not chosen or not ids.size:
            return [], [], where
        hay = [as_id_array(p.ids) for p, _ in chosen]
        owner = np.concatenate([np.full(h.size, i, dtype=np.int64) for i, h in enumerate(hay)])
        flat = np.concatenate(hay)
        order = np.argsort(flat, kind="stable")
        flat, owner = np.take(flat, order), np.take(owner, order)
        pos = np.minimum(search_ids(flat, ids), flat.size - 1)
        hit = np.asarray(np.take(flat, pos) == ids)
        where[hit] = np.take(owner, pos[hit])
        return [p.name for p, _ in chosen], [n for _, n in chosen], where

    def undrained(self, nodes: Iterable[str], namespace: str) -> set[str]:
        want = set(nodes)
        return {
            p.name
            for p in self.packs.values()
            if p.node in want
            and p.namespace == namespace
            and not p.drained
            and p.cache_id != OWNER_LOST
        }

    # -- commit ------------------------------------------------------------------------

    def recorder(
        self, job: str, generation: int, own: list[CachedPack], deps: set[str]
    ) -> Callable[[sqlite3.Connection], None]:
        """The writes of a local commit (run inside the catalog's commit transaction)."""

        def write(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT OR IGNORE INTO cached_packs (name, node, namespace, size, ids, job, "
                "generation, cache_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (p.name, p.node, p.namespace, p.size, p.ids, job, generation, p.cache_id)
                    for p in own
                ],
            )
            db.executemany(
                "INSERT OR IGNORE INTO generation_packs (job, generation, pack) VALUES (?, ?, ?)",
                [(job, generation, name) for name in sorted(deps)],
            )

        return write

    def committed(self, job: str, generation: int, own: list[CachedPack], deps: set[str]) -> None:
        """After the commit transaction: the same rows in memory."""
        for p in own:
            self.packs.setdefault(p.name, p)
        self.deps[(job, generation)] = set(deps)
        self._ids.clear()

    # -- drain -------------------------------------------------------------------------

    def drain_items(self, node: str, taken_over: bool = False) -> list[tuple[str, int, list[str]]]:
        """(job, generation, pack names) of `node`'s undrained packs, oldest first; with
        `taken_over`, also the packs of owners that lost them whose copy `node` drains."""
        out: dict[GenKey, list[str]] = {}
        for p in self.packs.values():  # insertion order: commit order
            mine = p.node == node and p.cache_id != OWNER_LOST
            if not p.drained and (mine or (taken_over and self.drains_for(p, node))):
                out.setdefault((p.job, p.generation), []).append(p.name)
        return [(job, gen, names) for (job, gen), names in out.items()]

    def drains_for(self, p: CachedPack, node: str) -> bool:
        """`node` drains `p` in its owner's place: the owner lost it, and `node` is the
        first holder of a copy (one holder, so no pack is drained twice)."""
        holders = sorted(self.copies.get(p.name, {}))
        return p.cache_id == OWNER_LOST and bool(holders) and holders[0] == node

    def ready(self, drained: set[str]) -> list[GenKey]:
        """Generations every pack of which is drained once `drained` are too."""
        done = {n for n, p in self.packs.items() if p.drained} | drained
        return sorted(k for k, names in self.deps.items() if names <= done)

    def apply(self, db: sqlite3.Connection, drained: set[str], raised: list[GenKey]) -> None:
        """Within one transaction: mark packs drained, raise generations to `store`, and
        drop the rows nothing depends on any more."""
        db.executemany(
            "UPDATE cached_packs SET drained = 1 WHERE name = ?", [(n,) for n in drained]
        )
        for job, gen in raised:
            db.execute(
                "UPDATE generations SET level = ? WHERE number = ? AND level != ? AND "
                "job_id = (SELECT id FROM jobs WHERE name = ?)",
                (Level.STORE.value, gen, Level.STORE.value, job),
            )
            db.execute("DELETE FROM generation_packs WHERE job = ? AND generation = ?", (job, gen))
        db.execute(
            "DELETE FROM cached_packs WHERE drained = 1 AND name NOT IN "
            "(SELECT pack FROM generation_packs)"
        )
        db.execute("DELETE FROM partner_copies WHERE pack NOT IN (SELECT name FROM cached_packs)")

    def applied(self, drained: set[str], raised: list[GenKey]) -> None:
        for n in drained:
            p = self.packs.get(n)
            if p is not None:
                self.packs[n] = replace(p, drained=True)
        for k in raised:
            self.deps.pop(k, None)
        live = set().union(*self.deps.values()) if self.deps else set()
        for n in [n for n, p in self.packs.items() if p.drained and n not in live]:
            del self.packs[n]
        for n in [n for n in self.copies if n not in self.packs]:
            del self.copies[n]
        self._ids.clear()

    def forget(self, db: sqlite3.Connection, job: str, generations: list[int]) -> None:
        """Generations deleted (retention, DeleteGeneration), in the transaction that
        deletes their rows: they depend on nothing any more, are no longer lost, and
        undrained packs nothing else depends on need no drain. Those are `retired`: a
        drain report of one that was already under way is taken as a no-op (drain.py),
        and the node's next drain list no longer names it."""
        for gen in generations:
            for table in ("generation_packs", "lost_generations"):
                db.execute(f"DELETE FROM {table} WHERE job = ? AND generation = ?", (job, gen))
            self.deps.pop((job, gen), None)
            self.lost.pop((job, gen), None)
        db.execute("DELETE FROM cached_packs WHERE name NOT IN (SELECT pack FROM generation_packs)")
        live = set().union(*self.deps.values()) if self.deps else set()
        for n in [n for n in self.packs if n not in live]:
            if not self.packs[n].drained:
                self.retired.add(n)
            del self.packs[n]
        self._prune_copies(db)
        self._ids.clear()

    def lose(self, db: sqlite3.Connection, node: str, cache_id: str | None, why: str = "") -> Lost:
        """`node` came back with another cache (Hello.cache_id), or an operator forgot
        the node (`cache_id` None: every cache of it): what those caches held is gone.
        Partner copies it held are dropped (`copies`; the level rule may lower
        generations: partners.py). Its own undrained packs that have a copy on another
        node stay in the ledger, marked OWNER_LOST (read from the copy); the others stop
        counting as present, and the generations that depended on them can never reach
        the store: recorded as lost, with `why`."""
        dropped = [
            (n, h) for n, hs in self.copies.items() for h, cid in hs.items()
            if h == node and (cache_id is None or cid != cache_id)
        ]  # fmt: skip
        rehomed = {  # owner-lost packs whose draining holder (drains_for) is dropped
            n for n, h in dropped
            if (p := self.packs.get(n)) and not p.drained and self.drains_for(p, h)
            and len(self.copies[n]) > 1
        }  # fmt: skip
        db.executemany("DELETE FROM partner_copies WHERE pack = ? AND holder = ?", dropped)
        for n, h in dropped:
            self.copies[n].pop(h, None)
            if not self.copies[n]:
                del self.copies[n]
        mine = {
            n for n, p in self.packs.items()
            if p.node == node and not p.drained and p.cache_id not in (cache_id, OWNER_LOST)
        }  # fmt: skip
        kept = {n for n in mine if self.copies.get(n)}
        orphans = {  # the owner lost them before, and now their last copy is gone
            n for n, p in self.packs.items()
            if p.cache_id == OWNER_LOST and not p.drained and not self.copies.get(n)
        }  # fmt: skip
        db.executemany(
            "UPDATE cached_packs SET cache_id = ? WHERE name = ?",
            [(OWNER_LOST, n) for n in kept],
        )
        for n in kept:
            self.packs[n] = replace(self.packs[n], cache_id=OWNER_LOST)
        gone = (mine - kept) | orphans
        if dropped or mine or orphans:  # the ids present per node may have changed
            self._ids.clear()
        handed = len(kept) + len(rehomed)
        if not gone:
            return Lost([], 0, handed, len(dropped))
        keys = sorted(k for k, names in self.deps.items() if names & gone)
        why = why or f"the node cache of {node} was lost before these packs drained"
        db.executemany("DELETE FROM cached_packs WHERE name = ?", [(n,) for n in gone])
        for job, gen in keys:
            db.execute("DELETE FROM generation_packs WHERE job = ? AND generation = ?", (job, gen))
            db.execute(
                "INSERT OR REPLACE INTO lost_generations (job, generation, reason) "
                "VALUES (?, ?, ?)",
                (job, gen, why),
            )
        for n in gone:
            del self.packs[n]
        for k in keys:
            self.deps.pop(k, None)
            self.lost[k] = why
        return Lost(keys, len(gone), handed, len(dropped))

    # -- partner copies ----------------------------------------------------------------

    def _prune_copies(self, db: sqlite3.Connection) -> None:
        db.execute("DELETE FROM partner_copies WHERE pack NOT IN (SELECT name FROM cached_packs)")
        for n in [n for n in self.copies if n not in self.packs]:
            del self.copies[n]

    def source(self, p: CachedPack, reachable: Callable[[str], bool] | None = None) -> str:
        """The node to read an undrained cached pack from: its owner while it has the
        pack and is `reachable`, else a reachable holder of a copy, else the owner (or,
        when the owner lost it, a holder): who is then unreachable."""
        holders = sorted(self.copies.get(p.name, {}))
        own = p.cache_id != OWNER_LOST
        ok = reachable or (lambda _n: True)
        if own and ok(p.node):
            return p.node
        return next((h for h in holders if ok(h)), p.node if own or not holders else holders[0])

    def nodes_of(
        self, job: str, generation: int, reachable: Callable[[str], bool] | None = None
    ) -> list[str]:
        """The nodes whose caches a read of the generation needs now (`source` of each
        undrained pack it depends on)."""
        names = self.deps.get((job, generation), set())
        return sorted(
            {self.source(p, reachable) for n in names if (p := self.packs.get(n)) and not p.drained}
        )

    def names(self) -> set[str]:
        """Every pack named here (gc keeps such objects in the store: docs/multilevel.md)."""
        return set(self.packs)


def _statements() -> list[str]:
    return [s.strip() for s in _SCHEMA.split(";") if s.strip()]
