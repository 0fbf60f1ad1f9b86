"""The coordinator's ledger of cached packs (coordinator/store/cached.py) as a reader
asks it: which undrained cached pack lists each chunk (of one node, or of any), which
nodes a local generation still needs; drained packs and other namespaces never answer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from coordinator.store.cached import CachedPack, CachedPacks
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
