"""The repository contract: tests that take nothing but a `repo` fixture (and tmp_path).
A test module that defines `repo` binds them all with
`from tests.helpers.repo_contract import *`: on a directory in
tests/unit/test_store_repository.py, on S3 (SeaweedFS) in
tests/integration/test_store_s3_repository.py. Ingest, commit, restore, dedup, zero
pages, refusal of bad input, gc (also with a checkpoint in flight) and stats.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from coordinator.store import PageTable, Repository
from coordinator.store.manifest import MemberMap, RegionMap
from cpcoord.errors import (
    ChunkMismatch,
    ChunkMissing,
    GenerationStateError,
    InvalidArgument,
    InvalidName,
    ManifestInvalid,
    NoSuchGeneration,
)
from storecore.backend import Kind
from storecore.ids import as_id_array, digest, zero_mask
from tests.helpers.store_support import PS, assert_restores, checkpoint, rand, upload


def test_full_then_incremental_restore_exactly(repo: Repository) -> None:
    img1 = {"rank-0": {"heap": rand(64, 1), "stack": rand(8, 2)}, "rank-1": {"heap": rand(32, 3)}}
    g1 = checkpoint(repo, "j", img1)
    heap = bytearray(img1["rank-0"]["heap"])
    heap[5 * PS : 6 * PS] = rand(1, 9)  # one page changed
    img2 = {**img1, "rank-0": {**img1["rank-0"], "heap": bytes(heap)}}
    m2 = upload(repo, "j", img2)
    info = repo.commit(m2)
    assert info.parent == g1 and info.state.value == "COMMITTED"
    assert 0 < info.sizes.bytes_new <= 4 * PS  # only the changed chunk was stored
    assert_restores(repo, "j", g1, img1)
    assert_restores(repo, "j", info.number, img2)
    assert [g.number for g in repo.generations("j")] == [g1, info.number]


def test_iter_pages_marks_zero_runs(repo: Repository) -> None:
    data = bytearray(16 * PS)
    data[9 * PS] = 7
    g = checkpoint(repo, "j", {"m": {"r": bytes(data)}})
    runs = [(r.offset, r.count, r.data is None) for r in repo.iter_pages("j", g)]
    assert runs == [(0, 4, True), (4, 4, True), (8, 4, False), (12, 4, True)]


def test_mismatching_chunk_refuses_the_whole_batch(repo: Repository) -> None:
    g = repo.begin("j")
    good, evil = rand(1, 1), rand(1, 2)
    ids = as_id_array([digest(good), digest(good[::-1])])
    with pytest.raises(ChunkMismatch, match=digest(good[::-1]).hex()):
        repo.add_chunks("j", g, ids, [good, evil])
    repo.flush()
    assert repo.stats().chunks == 0 and list(repo.backend.list(Kind.PACKS)) == []
    assert repo.missing("j", g, ids).size == 2


def test_bad_ingest_arguments(repo: Repository) -> None:
    g = repo.begin("j")
    with pytest.raises(InvalidArgument, match="ZERO"):
        repo.add_chunks("j", g, [bytes(32)], [bytes(PS)])
    with pytest.raises(InvalidArgument):
        repo.add_chunks("j", g, [digest(b"x")], [b"x", b"y"])
    with pytest.raises(GenerationStateError):
        repo.add_chunks("j", g + 1, [digest(b"x")], [b"x"])
    with pytest.raises(InvalidName):
        repo.begin("../etc")


def test_dedup_across_members_and_generations(repo: Repository) -> None:
    same = rand(64, 5)
    g1 = checkpoint(repo, "j", {"a": {"heap": same}, "b": {"heap": same}})
    st = repo.stats()
    assert st.chunk_bytes == len(same)  # stored once for two members
    assert repo.catalog.get("j", g1).sizes.bytes_logical == 2 * len(same)
    assert st.dedup_ratio == pytest.approx(2.0)
    g2 = checkpoint(repo, "j", {"a": {"heap": same}, "b": {"heap": same}})
    assert repo.catalog.get("j", g2).sizes.bytes_new == 0
    assert repo.stats().chunk_bytes == len(same)


def test_all_zero_region_stores_nothing(repo: Repository) -> None:
    zero = bytes(1024 * PS)  # 4 MiB of zero pages
    g = checkpoint(repo, "j", {"m": {"big": zero}})
    st = repo.stats()
    assert st.chunks == 0 and st.packs == 0 and st.chunk_bytes == 0
    info = repo.catalog.get("j", g)
    assert info.sizes.zero_pages == 1024 and info.sizes.bytes_stored == 0
    assert_restores(repo, "j", g, {"m": {"big": zero}})


def test_commit_refuses_missing_chunks_then_succeeds(repo: Repository) -> None:
    data = rand(8, 1)
    m = upload(repo, "j", {"m": {"r": data}})
    other = rand(4, 2)
    extra = RegionMap("extra", 0x1000, 0x1000 + 4 * PS, PageTable.of([0], [4], [digest(other)]))
    m2 = type(m)(
        m.job, m.generation, m.parent, m.time_ns, PS, (*m.members, MemberMap("x", (extra,)))
    )
    with pytest.raises(ChunkMissing):
        repo.commit(m2)
    assert repo.generations("j") == []
    repo.add_chunks("j", m.generation, [digest(other)], [other])
    assert repo.commit(m2).sizes.members == 2


def test_commit_refuses_entries_reading_past_their_chunk(repo: Repository) -> None:
    m = upload(repo, "j", {"m": {"r": rand(4, 1)}})  # one 4-page chunk
    r = m.members[0].regions[0]
    t = PageTable.of([0], [4], r.pages.ids, [1])  # skip 1 + 4 pages > 4
    bad = type(m)(
        m.job, m.generation, None, 0, PS, (MemberMap("m", (RegionMap("r", r.start, r.end, t),)),)
    )
    with pytest.raises(ManifestInvalid, match="past its chunk"):
        repo.commit(bad)


def test_commit_checks_generation_state(repo: Repository) -> None:
    m = upload(repo, "j", {"m": {"r": rand(4, 1)}})
    repo.commit(m)
    with pytest.raises(GenerationStateError):
        repo.commit(m)
    m2 = upload(repo, "j", {"m": {"r": rand(4, 1)}})
    repo.abort("j", m2.generation, "agent lost")
    with pytest.raises(GenerationStateError):
        repo.commit(m2)
    with pytest.raises(GenerationStateError):
        repo.manifest("j", m2.generation)


def test_concurrent_uploads(repo: Repository) -> None:
    g = repo.begin("j")
    images = {f"rank-{i}": {"heap": rand(256, i)} for i in range(4)}
    manifests = {}

    def member(name: str) -> None:
        manifests[name] = upload(repo, "j", {name: images[name]}, generation=g).members[0]

    threads = [threading.Thread(target=member, args=(n,)) for n in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m = upload(repo, "j", {}, generation=g)
    m = type(m)(m.job, g, m.parent, m.time_ns, PS, tuple(manifests[n] for n in sorted(images)))
    repo.commit(m)
    assert_restores(repo, "j", g, images)


def test_gc_retention_keeps_last_n_and_pinned(repo: Repository, tmp_path: Path) -> None:
    gens, imgs = [], []
    for i in range(5):
        img = {"m": {"r": rand(64, 100 + i)}}  # nothing shared between generations
        imgs.append(img)
        gens.append(checkpoint(repo, "j", img))
    repo.pin("j", gens[0])
    before = repo.stats().pack_bytes
    rep = repo.gc(keep=2)
    assert sorted(rep.dropped) == [("j", gens[1]), ("j", gens[2])]
    assert [g.number for g in repo.generations("j")] == [gens[0], gens[3], gens[4]]
    for i in (0, 3, 4):
        assert_restores(repo, "j", gens[i], imgs[i])
    with pytest.raises(NoSuchGeneration):
        repo.manifest("j", gens[1])
    after = repo.stats()
    assert after.chunk_bytes == 3 * 64 * PS
    assert after.pack_bytes < before * 0.7 and rep.bytes_freed > 0
    assert repo.verify().ok
    assert {o.name for o in repo.backend.list(Kind.MANIFESTS)} == {
        f"j/{g:010d}" for g in (gens[0], gens[3], gens[4])
    }
    with pytest.raises(InvalidArgument):
        repo.gc(keep=0)


def test_gc_alongside_a_checkpoint_in_flight(repo: Repository) -> None:
    old, kept = rand(32, 1), rand(32, 2)
    checkpoint(repo, "j", {"m": {"r": old}})  # g1: the only holder of `old`
    g2 = checkpoint(repo, "j", {"m": {"r": kept}})
    # g3 is in flight: missing() says `old` is present (so it is not sent), and a new
    # chunk is uploaded but not committed yet
    fresh = rand(8, 3)
    m3 = upload(repo, "j", {"m": {"r": old, "s": fresh}})
    assert m3.parent == g2
    rep = repo.gc(keep=1)  # drops g1, whose chunks g3 still needs
    assert rep.dropped == (("j", 1),)
    repo.commit(m3)
    assert_restores(repo, "j", m3.generation, {"m": {"r": old, "s": fresh}})
    assert repo.verify().ok
    # once nothing needs `old`, it goes
    checkpoint(repo, "j", {"m": {"r": kept}})
    repo.gc(keep=1)
    assert repo.stats().chunk_bytes == len(kept)


def test_gc_keeps_the_parent_of_a_generation_in_flight(repo: Repository) -> None:
    img = {"m": {"r": rand(16, 1)}}
    g1 = checkpoint(repo, "j", img)
    checkpoint(repo, "j", {"m": {"r": rand(16, 2)}})
    g3 = repo.begin("j", parent=g1)  # incremental on top of g1 (e.g. restore, then resume)
    repo.gc(keep=1)
    assert [g.number for g in repo.generations("j")] == [g1, g1 + 1]
    # the coordinator copies g1's unchanged entries into g3's complete manifest
    m1 = repo.manifest("j", g1)
    repo.commit(type(m1)("j", g3, g1, 0, PS, m1.members))
    assert_restores(repo, "j", g3, img)


def test_gc_removes_aborted_leftovers(repo: Repository) -> None:
    g1 = checkpoint(repo, "j", {"m": {"r": rand(16, 1)}})
    m = upload(repo, "j", {"m": {"r": rand(64, 2)}})
    repo.flush()
    repo.abort("j", m.generation, "agent lost")
    assert repo.stats().chunk_bytes == 80 * PS
    rep = repo.gc(keep=5)
    assert rep.chunks_dropped == 16
    assert repo.stats().chunk_bytes == 16 * PS
    assert_restores(repo, "j", g1, {"m": {"r": rand(16, 1)}})


def test_stats(repo: Repository) -> None:
    text = b"all work & play!" * (PS)  # 16 pages; every 4-page chunk is the same
    checkpoint(repo, "j", {"m": {"t": text, "z": bytes(16 * PS), "r": rand(16, 1)}})
    st = repo.stats()
    assert st.generations == 1 and st.logical_bytes == 48 * PS
    assert st.chunk_bytes == 20 * PS  # one text chunk, four random ones, no zero pages
    assert st.compression_ratio is not None and st.compression_ratio > 1.2
    assert st.dedup_ratio is not None and st.dedup_ratio > 1.5
    assert st.index_memory_bytes == st.chunks * 49
    assert np.all(~zero_mask(as_id_array([digest(text[:PS])])))


def test_gc_keeps_a_doomed_pack_stored_again_meanwhile(repo: Repository) -> None:
    old = {"m": {"r": rand(16, 1)}}
    checkpoint(repo, "j", old)  # g1 alone fills one pack P
    g2 = checkpoint(repo, "j", {"m": {"r": rand(16, 2)}})
    names = {o.name for o in repo.backend.list(Kind.PACKS)}
    g3: list[int] = []

    def meanwhile(step: str) -> None:
        if step == "gc:marked" and not g3:  # gc has planned to delete P ...
            # ... and a checkpoint uploads the same chunks in the same order: same bytes,
            # same pack name P
            g3.append(checkpoint(repo, "j", old))

    repo.fault = meanwhile
    rep = repo.gc(keep=1)
    repo.fault = None
    assert rep.dropped == (("j", 1),) and g3
    assert {o.name for o in repo.backend.list(Kind.PACKS)} == names  # P was stored again
    assert_restores(repo, "j", g3[0], old)
    assert repo.verify().ok
    assert [g.number for g in repo.generations("j")] == [g2, g3[0]]


def test_delete_generation(repo: Repository) -> None:
    img = {"m": {"r": rand(16, 1)}}
    g1 = checkpoint(repo, "j", img)
    g2 = checkpoint(repo, "j", {"m": {"r": rand(16, 2)}})
    repo.pin("j", g2)
    with pytest.raises(GenerationStateError, match="pinned"):
        repo.delete_generation("j", g2)
    g3 = repo.begin("j", parent=g1)
    with pytest.raises(GenerationStateError, match="in flight"):
        repo.delete_generation("j", g3)
    with pytest.raises(GenerationStateError, match="parent"):
        repo.delete_generation("j", g1)
    repo.abort("j", g3, "test")
    repo.delete_generation("j", g1)
    with pytest.raises(NoSuchGeneration):
        repo.manifest("j", g1)
    assert repo.gc(keep=5).chunks_dropped == 4
    assert repo.verify().ok


def test_caller_may_reuse_its_buffer_after_add_chunks(repo: Repository) -> None:
    g = repo.begin("j")
    buf = bytearray(rand(4, 1))
    cid = digest(bytes(buf))
    repo.add_chunks("j", g, [cid], [memoryview(buf)])
    buf[:] = bytes(len(buf))  # reused before the pack is sealed
    t = PageTable.of([0], [4], [cid])
    m = upload(repo, "j", {}, generation=g)
    region = RegionMap("r", 0x10000, 0x10000 + 4 * PS, t)
    repo.commit(type(m)("j", g, None, 0, PS, (MemberMap("m", (region,)),)))
    assert repo.read_region("j", g, "m", "r") == rand(4, 1)


def test_gc_merges_small_packs(repo: Repository) -> None:
    imgs = [{"m": {"r": rand(4, i)}} for i in range(12)]  # each commit seals a 16 KiB pack
    gens = [checkpoint(repo, "j", img) for img in imgs]
    assert repo.stats().packs == 12
    rep = repo.gc(keep=100)
    assert rep.chunks_dropped == 0 and rep.packs_written == 1 and repo.stats().packs == 1
    for g, img in zip(gens, imgs, strict=True):
        assert_restores(repo, "j", g, img)
    assert repo.gc(keep=100).packs_deleted == 0  # converged


# Every test above: a module binds them all with `from tests.helpers.repo_contract import *`.
__all__ = sorted(n for n in dir() if n.startswith("test_"))
