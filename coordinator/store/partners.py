"""Level `partner` in the repository (docs/multilevel.md, "Partner copies"): the checked
copies holders report, and the level rule over them (the ledger is cached.py).

A holder reports `Partnered` only after it checked each copy in full, so a recorded
copy is a checked copy. A generation at `local` rises to `partner` when every undrained
cached pack it depends on has a copy on a node other than its owner; one at `partner`
falls back to `local` when such a copy is lost (the holder's cache id changed) and
nothing replaces it: the one downgrade, so a level never shows a durability that does
not exist. Each change is one catalog transaction.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from typing import TYPE_CHECKING

from coordinator.store.cached import CachedPacks, GenKey
from coordinator.store.catalog import GenerationInfo, Level
from cpcoord.log import log_event
from storecore.names import node_of

if TYPE_CHECKING:
    from coordinator.store import Repository

log = logging.getLogger("cpcoord.store.partners")


def take_partnered(
    repo: Repository, holder: str, cache_id: str, sender: str, names: Iterable[str]
) -> tuple[list[GenerationInfo], list[str]]:
    """Record `holder`'s checked copies of `sender`'s packs; returns the generations whose
    level changed (at their new level) and the copies recorded (the others are of packs
    drained or forgotten meanwhile: the holder may delete them)."""
    cached = repo.cached
    names = list(names)
    with repo.lock, repo.catalog.tx() as db:
        took = add_copies(cached, db, holder, cache_id, [n for n in names if node_of(n) == sender])
        touched = set(names)  # also packs drained meanwhile: the rule may hold now
        keys = [k for k, deps in cached.deps.items() if deps & touched]
        changed = relevel(db, cached, keys)
    return _infos(repo, changed), took


def add_copies(
    cached: CachedPacks, db: sqlite3.Connection, holder: str, cache_id: str,
    names: Iterable[str],
) -> list[str]:  # fmt: skip
    """Record checked copies of undrained cached packs held by `holder` (not their
    owner); returns the names recorded. Unknown or drained packs are skipped."""
    took = [
        n for n in names
        if (p := cached.packs.get(n)) is not None and not p.drained and p.node != holder
    ]  # fmt: skip
    db.executemany(
        "INSERT OR REPLACE INTO partner_copies (pack, holder, cache_id) VALUES (?, ?, ?)",
        [(n, holder, cache_id) for n in took],
    )
    for n in took:
        cached.copies.setdefault(n, {})[holder] = cache_id
    return took


def covered(cached: CachedPacks, key: GenKey) -> bool:
    """Every undrained pack the generation depends on has a checked copy on a node other
    than its owner (the level rule for `partner`)."""
    names = cached.deps.get(key)
    if not names or key in cached.lost:
        return False
    undrained = [n for n in names if (p := cached.packs.get(n)) and not p.drained]
    return bool(undrained) and all(
        any(h != cached.packs[n].node for h in cached.copies.get(n, {})) for n in undrained
    )


def owed_to_partner(cached: CachedPacks, node: str) -> list[tuple[str, int, list[str]]]:
    """`node`'s undrained packs without a copy elsewhere, per generation, oldest first:
    what it must send its partner."""
    return [
        (job, gen, todo)
        for job, gen, names in cached.drain_items(node)
        if (todo := [n for n in names if not cached.copies.get(n)])
    ]


def committed(repo: Repository, job: str, generation: int) -> list[GenerationInfo]:
    """Right after a commit at `local`: a generation whose packs all have copies already
    (it cached nothing of its own and depends on copied packs) is `partner` at once."""
    cached = repo.cached
    with repo.lock:
        if (job, generation) not in cached.deps:
            return []
        with repo.catalog.tx() as db:
            changed = relevel(db, cached, [(job, generation)])
    return _infos(repo, changed)


def relevel_all(repo: Repository) -> list[GenerationInfo]:
    """After copies were lost (a holder back with another cache): every generation's
    level by the rule again."""
    cached = repo.cached
    with repo.lock:
        if not cached.deps:
            return []
        with repo.catalog.tx() as db:
            changed = relevel(db, cached, list(cached.deps))
    return _infos(repo, changed)


def relevel(db: sqlite3.Connection, cached: CachedPacks, keys: Iterable[GenKey]) -> list[GenKey]:
    """Within a transaction: `local` -> `partner` for covered generations, `partner` ->
    `local` for those no longer covered; the keys that changed."""
    out = []
    for key in sorted(set(keys)):
        job, gen = key
        frm, to = (Level.LOCAL, Level.PARTNER) if covered(cached, key) else (
            Level.PARTNER, Level.LOCAL)  # fmt: skip
        cur = db.execute(
            "UPDATE generations SET level = ? WHERE number = ? AND level = ? AND "
            "state = 'COMMITTED' AND job_id = (SELECT id FROM jobs WHERE name = ?)",
            (to.value, gen, frm.value, job),
        )
        if cur.rowcount:
            out.append(key)
            log_event(log, logging.INFO, "generation level", job=job, generation=gen,
                      durability=to.value)  # fmt: skip
    return out


def _infos(repo: Repository, keys: list[GenKey]) -> list[GenerationInfo]:
    return [repo.catalog.get(job, gen) for job, gen in keys]
