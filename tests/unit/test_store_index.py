"""The chunk index against a dict model, prefix collisions, packs, and index files."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.store.index import (
    BYTES_PER_ENTRY,
    LOC_DTYPE,
    ChunkIndex,
    Index,
    decode_index,
    encode_index,
)
from cpcoord.errors import DataCorrupted
from storecore.ids import ID_DTYPE, as_id_array, ids_to_bytes
from storecore.packs import LOCATED_DTYPE, PackContents


def locs_for(n: int, pack: int) -> np.ndarray:
    loc = np.zeros(n, dtype=LOC_DTYPE)
    loc["pack"] = pack
    loc["offset"] = np.arange(n) * 100 + 8
    loc["stored"] = 100
    loc["raw"] = 4096
    return loc


def test_budget_is_49_bytes_per_entry() -> None:
    assert BYTES_PER_ENTRY == 49
    ci = ChunkIndex()
    ci.add(as_id_array(os.urandom(32 * 1000)), locs_for(1000, 0))
    assert ci.nbytes == 49 * 1000
    # the columns really are that size (no hidden per-entry objects)
    assert sum(r.keys.nbytes + r.tails.nbytes + r.locs.nbytes for r in ci._runs) == 49 * 1000


# ids drawn from a small pool, so batches repeat ids and hit existing ones
pool = [os.urandom(32) for _ in range(40)]
# ... and ids sharing the 8-byte search key, differing only later
pool += [pool[0][:8] + os.urandom(24) for _ in range(5)]
batches = st.lists(st.lists(st.sampled_from(pool), max_size=12), min_size=1, max_size=25)


@settings(max_examples=80, deadline=None)
@given(batches, st.lists(st.sampled_from(pool), max_size=10))
def test_chunk_index_matches_a_dict(batches: list[list[bytes]], removed: list[bytes]) -> None:
    ci = ChunkIndex()
    model: dict[bytes, int] = {}
    for pack, batch in enumerate(batches):
        if not batch:
            continue
        new = ci.add(as_id_array(batch), locs_for(len(batch), pack))
        expect_new = []
        for b in batch:
            expect_new.append(b not in model)
            model.setdefault(b, pack)
        assert list(new) == expect_new
    assert ci.remove(as_id_array(removed) if removed else np.zeros(0, ID_DTYPE)) == len(
        set(removed) & model.keys()
    )
    for b in removed:
        model.pop(b, None)
    found, locs = ci.lookup(as_id_array(pool))
    for i, b in enumerate(pool):
        assert bool(found[i]) == (b in model)
        if b in model:
            assert int(locs["pack"][i]) == model[b]
    ids, _ = ci.all()
    assert sorted(ids_to_bytes(ids)) == sorted(model)
    assert len(ci) == len(model)


def test_runs_stay_logarithmic() -> None:
    ci = ChunkIndex()
    for i in range(200):
        ci.add(as_id_array(os.urandom(32 * 50)), locs_for(50, i))
    assert len(ci) == 10000
    assert len(ci._runs) <= 8


def contents(n: int, ns: str = "job:a") -> tuple[bytes, PackContents]:
    e = np.zeros(n, dtype=LOCATED_DTYPE)
    e["id"] = np.frombuffer(os.urandom(32 * n), dtype=ID_DTYPE)
    e["method"] = 1
    e["stored"] = 10
    e["raw"] = 4096
    e["offset"] = 8 + 10 * np.arange(n)
    return os.urandom(32), PackContents(ns, e)


def test_index_packs_and_removal() -> None:
    ix = Index()
    p1, c1 = contents(5)
    p2, c2 = contents(3, "job:b")
    assert ix.add_pack(p1, 1000, c1) == 5
    assert ix.add_pack(p1, 1000, c1) == 0  # known pack
    assert ix.add_pack(p2, 500, c2) == 3
    assert len(ix.chunks("job:a")) == 5 and len(ix.chunks("job:b")) == 3
    # namespaces do not see each other's chunks
    assert not ix.chunks("job:a").contains(np.ascontiguousarray(c2.entries["id"])).any()
    no = ix.pack_number(p1)
    assert no is not None
    assert ix.remove_packs([no]) == 5
    assert len(ix.chunks("job:a")) == 0 and ix.pack_number(p1) is None
    assert len(ix.chunks("job:b")) == 3


def test_index_file_round_trip_and_damage() -> None:
    ix = Index()
    for ns in ("job:a", "job:a", "shared"):
        pid, c = contents(7, ns)
        ix.add_pack(pid, 2000, c)
    data = encode_index(ix.pack_entries(sorted(ix.packs())))
    rows = decode_index(data, "f")
    assert len(rows) == 3
    ix2 = Index()
    for name, size, c in rows:
        ix2.add_pack(bytes.fromhex(name), size, c, name)
    for ns in ("job:a", "shared"):
        a, _la = ix.chunks(ns).all()
        b, _lb = ix2.chunks(ns).all()
        assert sorted(ids_to_bytes(a)) == sorted(ids_to_bytes(b))
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(DataCorrupted):
            decode_index(data[:cut], "f")
    for pos in range(0, len(data), max(1, len(data) // 50)):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(DataCorrupted):
            decode_index(bytes(bad), "f")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.sampled_from(["job:a", "job:b"])), min_size=1,
                max_size=12), st.data())  # fmt: skip
def test_pack_entries_of_some_packs_equal_a_scan_of_every_entry(
    packs: list[tuple[int, str]], data: st.DataObject
) -> None:
    """pack_entries joins only the ids of the packs asked for (ChunkIndex.in_packs);
    it lists exactly what a scan of every entry of every namespace lists for them,
    sorted by offset, whatever the runs merged into and after packs are removed."""
    ix = Index()
    for n, ns in packs:
        pid, c = contents(n, ns)
        ix.add_pack(pid, 2000, c)
    known = sorted(ix.packs())
    if len(known) > 2:
        ix.remove_packs([data.draw(st.sampled_from(known))])
        known = sorted(ix.packs())
    asked = data.draw(st.lists(st.sampled_from(known), unique=True, min_size=1))
    for no, (info, e) in zip(asked, ix.pack_entries(asked), strict=True):
        assert info == ix.pack(no)
        want = []
        for ci in ix.namespaces.values():
            ids, locs = ci.all()
            sel = locs["pack"] == no
            want += sorted(zip(locs["offset"][sel].tolist(), ids_to_bytes(ids[sel]), strict=True))
        assert list(zip(e["offset"].tolist(), ids_to_bytes(e["id"]), strict=True)) == sorted(want)
