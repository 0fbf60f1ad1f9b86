"""Partner copies in the coordinator (coordinator/partners.py, coordinator/store/
cached.py): the ring of partners (joins, leaves, one node, agents without a cache or a
listener), the level rule over checked copies (covered, lost copies, a lost owner), what
a node owes its partner, and where a read finds a chunk whose owner is gone."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from coordinator.partners import ring, senders
from coordinator.store.cached import OWNER_LOST, CachedPack, CachedPacks, Lost
from coordinator.store.catalog import Catalog
from coordinator.store.partners import add_copies, covered, owed_to_partner
from cpcoord.gen.v1 import agent_pb2
from storecore.ids import digest_all


def _hello(node: str, cache: bool = True, listen: bool = True) -> agent_pb2.Hello:
    return agent_pb2.Hello(
        node=node, cache_id="c-" + node if cache else "",
        partner_address=f"127.0.0.1:{len(node)}" if listen else "",
    )  # fmt: skip


def test_ring_pairs_each_node_with_the_next_by_name_never_itself() -> None:
    assert ring([_hello("b"), _hello("c"), _hello("a")]) == {
        "a": ("b", "127.0.0.1:1"), "b": ("c", "127.0.0.1:1"), "c": ("a", "127.0.0.1:1"),
    }  # fmt: skip
    assert ring([_hello("a")]) == {}  # one node: no partner
    assert ring([]) == {}
    two = ring([_hello("x"), _hello("y")])
    assert two["x"][0] == "y" and two["y"][0] == "x"
    # Without a cache or a listener an agent is never in the ring (neither way).
    got = ring([_hello("a"), _hello("b", listen=False), _hello("c", cache=False), _hello("d")])
    assert {k: v[0] for k, v in got.items()} == {"a": "d", "d": "a"}
    # A node leaves: its predecessor's partner becomes its successor.
    assert ring([_hello("a"), _hello("c")])["a"][0] == "c"
    now = ring([_hello("a"), _hello("b"), _hello("c")])
    assert [senders(now, n) for n in "abcd"] == [("c",), ("a",), ("b",), ()]


def _ids(n: int) -> np.ndarray:
    return digest_all([os.urandom(64) for _ in range(n)])


def _ledger(tmp: Path) -> tuple[CachedPacks, list[CachedPack], np.ndarray, np.ndarray]:
    ledger = CachedPacks(Catalog(tmp / "c.sqlite"))
    a, b = _ids(4), _ids(3)
    packs = [
        CachedPack("nodes/a/p1", "a", "job:j", 1, a.tobytes(), "j", 1, cache_id="ca"),
        CachedPack("nodes/b/p2", "b", "job:j", 1, b.tobytes(), "j", 1, cache_id="cb"),
    ]
    with ledger.catalog.tx() as db:
        ledger.recorder("j", 1, packs, {p.name for p in packs})(db)
    ledger.committed("j", 1, packs, {p.name for p in packs})
    return ledger, packs, a, b


def test_a_generation_is_covered_once_every_pack_has_a_copy_on_another_node(
    tmp_path: Path,
) -> None:
    ledger, _, _, _ = _ledger(tmp_path)
    assert not covered(ledger, ("j", 1))
    assert [i[:2] for i in owed_to_partner(ledger, "a")] == [("j", 1)]
    with ledger.catalog.tx() as db:
        assert add_copies(ledger, db, "b", "cb", ["nodes/a/p1"]) == ["nodes/a/p1"]
        assert add_copies(ledger, db, "b", "cb", ["nodes/b/p2"]) == []  # its own: no copy
        assert add_copies(ledger, db, "c", "cc", ["nodes/x/unknown"]) == []
    assert not covered(ledger, ("j", 1)) and owed_to_partner(ledger, "a") == []
    with ledger.catalog.tx() as db:
        add_copies(ledger, db, "a", "ca", ["nodes/b/p2"])
    assert covered(ledger, ("j", 1))
    again = CachedPacks(ledger.catalog)  # persisted: a restarted coordinator agrees
    assert covered(again, ("j", 1)) and again.copies == ledger.copies


def test_a_holder_back_with_another_cache_loses_its_copies_the_rule_falls(
    tmp_path: Path,
) -> None:
    ledger, _, _, _ = _ledger(tmp_path)
    with ledger.catalog.tx() as db:
        add_copies(ledger, db, "b", "cb", ["nodes/a/p1"])
        add_copies(ledger, db, "a", "ca", ["nodes/b/p2"])
        assert ledger.lose(db, "b", "cb") == Lost([])  # the same cache: nothing happens
    assert covered(ledger, ("j", 1))
    with ledger.catalog.tx() as db:
        # b's cache was replaced: its copy of a's pack and its own p2 are gone from b,
        # but p2 has a copy on a: kept (read from there), only a's copy on b is lost.
        assert ledger.lose(db, "b", "cb-new") == Lost([], 0, handed=1)  # a drains p2
    assert not covered(ledger, ("j", 1))  # p1 has no copy elsewhere any more
    assert ledger.packs["nodes/b/p2"].cache_id == OWNER_LOST
    assert "nodes/a/p1" not in ledger.copies and ledger.copies["nodes/b/p2"] == {"a": "ca"}
    assert owed_to_partner(ledger, "b") == []  # b cannot send what it lost
    assert ledger.drain_items("b") == []
    # a sends p1 to its new partner: covered again.
    with ledger.catalog.tx() as db:
        add_copies(ledger, db, "c", "cc", ["nodes/a/p1"])
    assert covered(ledger, ("j", 1))
    # Now a's cache is lost too: p2's last copy is gone -> the generation is lost.
    with ledger.catalog.tx() as db:
        assert ledger.lose(db, "a", "ca-new") == Lost([("j", 1)], 1, handed=1)  # p1 on c
    assert ("j", 1) in ledger.lost and not covered(ledger, ("j", 1))


def test_a_read_takes_the_owner_else_a_reachable_holder(tmp_path: Path) -> None:
    ledger, _, a, b = _ledger(tmp_path)
    with ledger.catalog.tx() as db:
        add_copies(ledger, db, "c", "cc", ["nodes/b/p2"])
    want = np.concatenate([a[:1], b[:2]])
    names, nodes, where = ledger.locate(want, "job:j")
    assert [nodes[i] for i in where.tolist()] == ["a", "b", "b"]  # owners first
    up = {"a", "c"}.__contains__
    names, nodes, where = ledger.locate(want, "job:j", reachable=up)  # b's agent is gone
    assert [nodes[i] for i in where.tolist()] == ["a", "c", "c"]
    assert [names[i] for i in where.tolist()] == ["nodes/a/p1", "nodes/b/p2", "nodes/b/p2"]
    assert ledger.nodes_of("j", 1) == ["a", "b"] and ledger.nodes_of("j", 1, up) == ["a", "c"]
    names, nodes, where = ledger.locate(want, "job:j", reachable={"a"}.__contains__)
    assert [nodes[i] for i in where.tolist()] == ["a", "b", "b"]  # nobody: the owner named
    names, _, where = ledger.locate(want, "job:j", "c")  # c's own view: its copies
    assert [names[i] if i >= 0 else None for i in where.tolist()] == [None] + ["nodes/b/p2"] * 2
    with ledger.catalog.tx() as db:
        ledger.lose(db, "b", "cb-new")
    names, nodes, where = ledger.locate(want, "job:j")
    assert [nodes[i] for i in where.tolist()] == ["a", "c", "c"]  # the owner lost it
    names, _, where = ledger.locate(want, "job:j", "b")
    assert (where < 0).all()
    assert ledger.pending_ids("b", "job:j").size == 0  # never dedup against a lost pack


def test_the_level_follows_copies_and_drains_whatever_comes_first(tmp_path: Path) -> None:
    """The rule is evaluated where copies or drains change: node a's pack drains before
    anyone reports a copy of it, node b's pack has a copy: `partner` then, not `local`
    forever (a race met under load); a lost copy lowers it again."""
    from coordinator.store.catalog import Level, Sizes
    from coordinator.store.partners import relevel

    ledger, _, _, _ = _ledger(tmp_path)
    cat = ledger.catalog
    cat.ensure_job("j")
    n = cat.allocate("j", None, "job:j")
    assert n == 1
    cat.commit("j", 1, "j/1", Sizes(), Level.LOCAL)
    with cat.tx() as db:
        add_copies(ledger, db, "c", "cc", ["nodes/b/p2"])
        assert relevel(db, ledger, [("j", 1)]) == []  # a's pack has no copy yet
        ledger.apply(db, {"nodes/a/p1"}, [])  # a's pack drained: needs no copy
    ledger.applied({"nodes/a/p1"}, [])
    with cat.tx() as db:
        assert relevel(db, ledger, [("j", 1)]) == [("j", 1)]
    assert cat.get("j", 1).level is Level.PARTNER
    with cat.tx() as db:
        ledger.lose(db, "c", "cc-new")  # the holder's cache is gone: the copy too
        assert relevel(db, ledger, [("j", 1)]) == [("j", 1)]
    assert cat.get("j", 1).level is Level.LOCAL


def test_forgetting_a_node_keeps_what_has_copies_and_drops_what_it_held(
    tmp_path: Path,
) -> None:
    """`cpcoord forget b` (lose with no cache id): b's own pack with a copy on a stays,
    read from the copy (OWNER_LOST); b's copy of a's pack is gone, so the generation is
    no longer covered but not lost; forgetting a too then loses it."""
    ledger, _, _, _ = _ledger(tmp_path)
    with ledger.catalog.tx() as db:
        add_copies(ledger, db, "b", "cb", ["nodes/a/p1"])
        add_copies(ledger, db, "a", "ca", ["nodes/b/p2"])
        assert ledger.lose(db, "b", None, "forgotten") == Lost([], 0, handed=1)
    assert ledger.packs["nodes/b/p2"].cache_id == OWNER_LOST
    assert "nodes/a/p1" not in ledger.copies and not covered(ledger, ("j", 1))
    with ledger.catalog.tx() as db:
        assert ledger.lose(db, "a", None, "forgotten") == Lost([("j", 1)], 2)
    assert ledger.lost[("j", 1)] == "forgotten"


def test_lose_hands_packs_to_a_holder_only_when_one_must_drain_them_anew(
    tmp_path: Path,
) -> None:
    """`Lost.handed` counts the packs a holder drains in a new owner's place: marked
    OWNER_LOST now, or owner-lost already and their draining holder's copy dropped (the
    next holder drains); nothing else (the caller tells holders only then)."""
    ledger, _, _, _ = _ledger(tmp_path)
    with ledger.catalog.tx() as db:
        add_copies(ledger, db, "a", "ca", ["nodes/b/p2"])
        add_copies(ledger, db, "c", "cc", ["nodes/b/p2"])
        assert ledger.lose(db, "b", "cb").handed == 0  # same cache
        assert ledger.lose(db, "b", "cb-new").handed == 1  # p2: a drains it now
        owed = ledger.drain_items("a", taken_over=True)
        assert owed == [("j", 1, ["nodes/a/p1", "nodes/b/p2"])]
        assert ledger.lose(db, "b", "cb-newer").handed == 0  # nothing more of b's
        assert ledger.lose(db, "c", "cc-new") == Lost([])  # c was not draining p2
        add_copies(ledger, db, "c", "cc-new", ["nodes/b/p2"])
        # a loses its cache: its own p1 has no copy (lost), p2 goes to c to drain
        got = ledger.lose(db, "a", "ca-new")
    assert got == Lost([("j", 1)], 1, handed=1)
    assert ledger.drain_items("c", taken_over=True) == [("j", 1, ["nodes/b/p2"])]
