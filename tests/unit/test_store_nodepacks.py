"""Packs agents put themselves (coordinator/store/nodepacks.py) against a real directory
store: what a report must hold to be taken, and the rule that another node's chunk
counts only once read back and verified."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.store import Repository
from coordinator.store.nodepacks import Report
from cpcoord.errors import ChunkMismatch, InvalidArgument, NodeDataBad
from storecore.backend import Kind
from storecore.ids import as_id_array, digest
from storecore.names import node_of, node_prefix, pack_id
from storecore.packs import PackWriter

PAGE = 4096


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    r = Repository.open_local(tmp_path / "store")
    try:
        yield r
    finally:
        r.close()


def put_pack(
    repo: Repository, node: str, chunks: list[bytes], lie: bool = False, owner: str = ""
) -> tuple[Report, list[bytes]]:
    ids = [digest(c) for c in chunks]
    blobs = [os.urandom(len(c)) if lie else c for c in chunks]
    w = PackWriter("job:j")
    n = len(chunks)
    w.add(as_id_array(ids), np.zeros(n, np.uint8), blobs, np.full(n, PAGE, np.uint32))
    sp = w.seal()
    name = node_prefix(owner or node) + sp.id.format()
    repo.backend.put(Kind.PACKS, name, sp.data)
    return Report(name, len(sp.data), b"".join(ids)), ids


def pages(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(PAGE) for _ in range(n)]


def test_names_say_who_wrote_a_pack() -> None:
    h = "ab" * 32
    assert node_of(f"nodes/n1/{h}") == "n1" and node_of(h) is None
    assert pack_id(f"nodes/n1/{h}") == bytes.fromhex(h) == pack_id(h)
    for bad in ("nodes/n1/xyz", f"other/{h}", f"nodes/{h}"):
        with pytest.raises(InvalidArgument):
            pack_id(bad)


def test_a_report_is_taken_only_when_the_store_holds_what_it_says(repo: Repository) -> None:
    n = repo.begin("j")
    rep, ids = put_pack(repo, "n1", pages(8, 1))
    with pytest.raises(InvalidArgument, match="prefix"):
        repo.take_packs("j", n, "n2", [rep])  # n2 reports n1's pack
    with pytest.raises(InvalidArgument, match="bytes"):
        repo.take_packs("j", n, "n1", [Report(rep.name, rep.size + 1, rep.ids)])
    with pytest.raises(InvalidArgument, match="other chunks"):
        repo.take_packs("j", n, "n1", [Report(rep.name, rep.size, rep.ids[:-32])])
    liar, _ = put_pack(repo, "n1", pages(4, 2), lie=True)
    with pytest.raises(ChunkMismatch):
        repo.take_packs("j", n, "n1", [liar])
    assert repo.take_packs("j", n, "n1", [rep, rep])[0] == 8  # twice in one report: once
    assert repo.take_packs("j", n, "n1", [rep]) == (0, 0)  # from another stream: once
    assert repo.missing("j", n, as_id_array(ids), "n1").size == 0


def test_another_nodes_chunk_counts_once_verified(repo: Repository) -> None:
    n = repo.begin("j")
    good, gids = put_pack(repo, "n1", pages(6, 3))
    repo.take_packs("j", n, "n1", [good])
    assert repo.missing("j", n, as_id_array(gids), "n2").size == 0  # read back: fine
    assert repo.trust.checked == 6 and repo.trust.failed == 0


def test_a_lie_found_by_another_node_drops_the_chunks_and_marks_the_liar(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coordinator.store import nodepacks

    monkeypatch.setattr(nodepacks, "SAMPLE", 0)  # a liar the sample missed
    n = repo.begin("j")
    liar, ids = put_pack(repo, "n1", pages(5, 4), lie=True)
    repo.take_packs("j", n, "n1", [liar])
    assert repo.missing("j", n, as_id_array(ids), "n1").size == 0  # its own: trusted
    assert repo.missing("j", n, as_id_array(ids), "n2").size == 5  # n2 must upload
    assert repo.trust.failed == 5 and "n1" in repo.bad_nodes("j", n)
    assert repo.missing("j", n, as_id_array(ids), "n1").size == 5  # gone from the index
    from coordinator.store import Manifest

    with pytest.raises(NodeDataBad):
        repo.commit(Manifest("j", n, None, 1, PAGE, ()))


def test_the_sample_is_consecutive_entries_each_as_likely() -> None:
    from coordinator.store.nodepacks import SAMPLE, sample

    n, draws = 5, 4000
    seen = np.zeros(n, int)
    for _ in range(draws):
        s = sample(n)
        assert len(s) == SAMPLE and len(set(s.tolist())) == SAMPLE
        assert sorted(((s - s[0]) % n).tolist()) in ([0, 1], [0, n - 1])  # neighbours, mod n
        seen[s] += 1
    share = seen / (draws * SAMPLE / n)  # 1.0: as likely as independent picks
    assert np.all((share > 0.85) & (share < 1.15)), share
    assert sample(1).tolist() == [0] and sample(0).size == 0


@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4, 5], [0, 5], [2, 3]])
def test_sampled_rows_read_at_once_still_check_each_chunk(
    repo: Repository, rows: list[int]
) -> None:
    """Adjacent entries are one ranged read, sliced back into chunks: an honest pack
    passes whole, and one lying chunk among honest neighbours is named."""
    from coordinator.store import nodepacks
    from storecore.packs import read_contents

    chunks = pages(6, 7)
    rep, ids = put_pack(repo, "n1", chunks)
    e = read_contents(repo.backend, rep.name).entries
    assert nodepacks._bad_rows(repo, rep.name, e[rows], "job:j") == []
    # the same chunks, one of them (the last sampled) replaced by other bytes
    ids = [digest(c) for c in chunks]
    blobs = list(chunks)
    blobs[rows[-1]] = os.urandom(PAGE)
    w = PackWriter("job:j")
    w.add(as_id_array(ids), np.zeros(6, np.uint8), blobs, np.full(6, PAGE, np.uint32))
    sp = w.seal()
    name = node_prefix("n1") + sp.id.format()
    repo.backend.put(Kind.PACKS, name, sp.data)
    e = read_contents(repo.backend, name).entries
    assert nodepacks._bad_rows(repo, name, e[rows], "job:j") == [ids[rows[-1]].hex()]


def test_a_packs_size_and_trailer_come_from_one_read(repo: Repository) -> None:
    from storecore.packs import read_contents, read_sized_contents

    rep, _ = put_pack(repo, "n1", pages(20, 8))
    size, contents = read_sized_contents(repo.backend, rep.name)
    assert size == rep.size
    assert np.array_equal(contents.entries, read_contents(repo.backend, rep.name).entries)
    data = repo.backend.get(Kind.PACKS, rep.name)
    assert repo.backend.get_tail(Kind.PACKS, rep.name, 100) == (len(data), data[-100:])
    assert repo.backend.get_tail(Kind.PACKS, rep.name, 10**9) == (len(data), data)
    from cpcoord.errors import ObjectNotFound

    with pytest.raises(ObjectNotFound):
        repo.backend.get_tail(Kind.PACKS, node_prefix("n1") + "ab" * 32, 100)
