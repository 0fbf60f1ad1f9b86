"""The coordinator's ledger of cached packs (coordinator/store/cached.py) as a reader
asks it: which undrained cached pack lists each chunk (of one node, or of any), which
nodes a local generation still needs; drained packs and other namespaces never answer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from coordinator.store.cached import CachedPack, CachedPacks, Lost
from coordinator.store.catalog import Catalog
from storecore.ids import digest_all


def _ids(n: int) -> np.ndarray:
    return digest_all([os.urandom(64) for _ in range(n)])


def test_locate_names_the_listing_pack_per_node_and_nodes_of_a_generation(
    tmp_path: Path,
) -> None:
    ledger = CachedPacks(Catalog(tmp_path / "c.sqlite"))
    a, b, other, done = _ids(5), _ids(4), _ids(3), _ids(2)
    packs = [
        CachedPack("nodes/a/p1", "a", "job:j", 1, a.tobytes(), "j", 1),
        CachedPack("nodes/b/p2", "b", "job:j", 1, b.tobytes(), "j", 1),
        CachedPack("nodes/a/p3", "a", "job:k", 1, other.tobytes(), "k", 1),
        CachedPack("nodes/a/p4", "a", "job:j", 1, done.tobytes(), "j", 1, drained=True),
    ]
    ledger.committed("j", 1, packs, {p.name for p in packs})
    want = np.concatenate([b[:2], a[3:], other[:1], done[:1], _ids(1)])
    names, nodes, where = ledger.locate(want, "job:j")
    got = [names[i] if i >= 0 else None for i in where.tolist()]
    assert got == ["nodes/b/p2"] * 2 + ["nodes/a/p1"] * 2 + [None] * 3
    assert sorted(set(nodes)) == ["a", "b"]
    names, _, where = ledger.locate(want, "job:j", "a")  # node a's cache only
    assert [names[i] if i >= 0 else None for i in where.tolist()] == (
        [None] * 2 + ["nodes/a/p1"] * 2 + [None] * 3
    )
    assert ledger.nodes_of("j", 1) == ["a", "b"]  # undrained packs only (p1, p2)
    assert ledger.nodes_of("j", 2) == []


def test_lose_by_cache_id_spares_the_new_cache_and_forget_loses_every_cache(
    tmp_path: Path,
) -> None:
    """Hello with another cache id loses only the packs of the node's other caches; an
    operator's forget (cache id None) loses those of every cache of the node. Either
    way drained packs and other nodes' packs stay, and each generation that needed a
    lost pack is lost with the reason given."""
    catalog = Catalog(tmp_path / "c.sqlite")
    ledger = CachedPacks(catalog)
    old = CachedPack("nodes/b/p1", "b", "job:j", 1, _ids(2).tobytes(), "j", 1, cache_id="c1")
    new = CachedPack("nodes/b/p2", "b", "job:j", 1, _ids(2).tobytes(), "j", 2, cache_id="c2")
    gone = CachedPack("nodes/b/p3", "b", "job:j", 1, _ids(1).tobytes(), "j", 1, True, "c1")
    other = CachedPack("nodes/a/p4", "a", "job:j", 1, _ids(1).tobytes(), "j", 3, cache_id="c1")
    ledger.committed("j", 1, [old, gone], {old.name, gone.name})
    ledger.committed("j", 2, [new], {new.name})
    ledger.committed("j", 3, [other], {other.name})
    with catalog.tx() as db:
        assert ledger.lose(db, "b", "c2") == Lost([("j", 1)], 1)
    assert "cache of b" in ledger.lost[("j", 1)] and ("j", 2) not in ledger.lost
    with catalog.tx() as db:
        assert ledger.lose(db, "b", None, "forgotten") == Lost([("j", 2)], 1)
        assert ledger.lose(db, "b", None, "forgotten") == Lost([])  # nothing left
    assert ledger.lost[("j", 2)] == "forgotten" and ("j", 3) not in ledger.lost
    assert set(ledger.packs) == {gone.name, other.name}


def test_forget_of_deleted_generations_retires_only_packs_nothing_else_needs(
    tmp_path: Path,
) -> None:
    """Deleting generations drops their dependencies and lost marks; an undrained pack
    no kept generation needs is retired (a late drain report of it is no lie), one that
    a kept generation still needs stays, drained packs are never retired."""
    catalog = Catalog(tmp_path / "c.sqlite")
    ledger = CachedPacks(catalog)
    p1 = CachedPack("nodes/b/p1", "b", "job:j", 1, _ids(2).tobytes(), "j", 1)
    p2 = CachedPack("nodes/b/p2", "b", "job:j", 1, _ids(2).tobytes(), "j", 2)
    p3 = CachedPack("nodes/b/p3", "b", "job:j", 1, _ids(1).tobytes(), "j", 1, drained=True)
    ledger.committed("j", 1, [p1, p3], {p1.name, p3.name})
    ledger.committed("j", 2, [p2], {p1.name, p2.name})  # 2 depends on 1's pack too
    with catalog.tx() as db:
        ledger.lose(db, "x", None)  # another node: nothing
        ledger.forget(db, "j", [1])
    assert ledger.retired == set() and set(ledger.packs) == {p1.name, p2.name}
    with catalog.tx() as db:
        ledger.forget(db, "j", [2])
    assert ledger.retired == {p1.name, p2.name} and not ledger.packs and not ledger.deps
    reopened = CachedPacks(catalog)  # the rows went in the same transactions
    assert not reopened.packs and not reopened.deps and not reopened.lost


def test_lose_counts_the_partner_copies_it_drops(tmp_path: Path) -> None:
    """Lost.copies says how many partner copies the node held and lost with its cache:
    with handed and keys it tells whether any level may move (nodeloss.py re-levels
    only then); a node that lost nothing reports nothing."""
    catalog = Catalog(tmp_path / "c.sqlite")
    ledger = CachedPacks(catalog)
    p = CachedPack("nodes/a/p1", "a", "job:j", 1, _ids(2).tobytes(), "j", 1, cache_id="ca")
    ledger.committed("j", 1, [p], {p.name})
    ledger.copies[p.name] = {"b": "cb1"}
    with catalog.tx() as db:
        nothing = ledger.lose(db, "c", "cc1")
        assert (nothing.keys, nothing.packs, nothing.handed, nothing.copies) == ([], 0, 0, 0)
        same = ledger.lose(db, "b", "cb1")  # b back with the cache that holds the copy
        assert same.copies == 0 and p.name in ledger.copies
        lost = ledger.lose(db, "b", "cb2")
        assert lost.copies == 1 and p.name not in ledger.copies
