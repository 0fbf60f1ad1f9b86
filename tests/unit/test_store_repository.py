"""The repository facade: ingest, commit, restore, dedup, zero pages, refusal of bad
input, gc (also with a checkpoint in flight), verify and stats."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.store import GcReport, Repository, StoreConfig
from cpcoord.errors import (
    StoreLocked,
)
from storecore.backend import Kind
from storecore.ids import chunk_ids_of
from tests.helpers.repo_contract import *  # noqa: F403 - the contract, on this `repo`
from tests.helpers.store_support import PS, assert_restores, checkpoint, rand, upload


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    r = Repository.open_local(tmp_path / "store", StoreConfig(pack_size=1 << 20))
    yield r
    r.close()


def test_dedup_is_per_job_unless_configured(tmp_path: Path) -> None:
    data = rand(8, 1)
    ids, _ = chunk_ids_of(data, 4 * PS)
    with Repository.open_local(tmp_path / "a") as repo:
        checkpoint(repo, "tenant-a", {"m": {"r": data}})
        g = repo.begin("tenant-b")
        assert repo.missing("tenant-b", g, ids).size == 2  # b learns nothing about a
    with Repository.open_local(tmp_path / "b", StoreConfig(dedup="store")) as repo:
        checkpoint(repo, "tenant-a", {"m": {"r": data}})
        g = repo.begin("tenant-b")
        assert repo.missing("tenant-b", g, ids).size == 0
        repo.commit(upload(repo, "tenant-b", {"m": {"r": data}}, generation=g))
        assert repo.stats().chunk_bytes == len(data)


def test_one_process_per_store(tmp_path: Path, repo: Repository) -> None:
    with pytest.raises(StoreLocked):
        Repository.open_local(tmp_path / "store")


def test_reopen_aborts_in_flight_and_rebuilds_index(tmp_path: Path) -> None:
    root = tmp_path / "s"
    repo = Repository.open_local(root)
    img = {"m": {"r": rand(16, 1)}}
    g1 = checkpoint(repo, "j", img)
    g2 = upload(repo, "j", img).generation
    repo.close()
    for f in (root / "index").iterdir():  # index files are a cache
        f.unlink()
    repo = Repository.open_local(root)
    assert repo.catalog.get("j", g2).state.value == "ABORTED"
    assert "reopened" in repo.catalog.get("j", g2).reason
    assert_restores(repo, "j", g1, img)
    assert len(list((root / "index").iterdir())) == 1  # rebuilt from the pack trailers
    g3 = checkpoint(repo, "j", img)
    assert repo.catalog.get("j", g3).parent == g1
    repo.close()


def test_damaged_index_file_is_ignored(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with Repository.open_local(root) as repo:
        img = {"m": {"r": rand(16, 1)}}
        g = checkpoint(repo, "j", img)
    (f,) = (root / "index").iterdir()
    f.write_bytes(f.read_bytes()[:-1] + b"!")
    with Repository.open_local(root) as repo:
        assert_restores(repo, "j", g, img)
        assert repo.verify().ok


# -- gc ------------------------------------------------------------------------------


def test_gc_repacks_partly_dead_packs(tmp_path: Path) -> None:
    with Repository.open_local(tmp_path / "s", StoreConfig(pack_size=1 << 22)) as repo:
        shared = rand(32, 1)
        g1 = checkpoint(repo, "j", {"m": {"a": shared, "b": rand(96, 2)}})
        g2 = checkpoint(repo, "j", {"m": {"a": shared, "b": rand(8, 3)}})
        packs_before = {o.name for o in repo.backend.list(Kind.PACKS)}
        rep = repo.gc(keep=1)
        assert rep.dropped == (("j", g1),) and rep.packs_repacked >= 1
        assert not packs_before <= {o.name for o in repo.backend.list(Kind.PACKS)}
        assert_restores(repo, "j", g2, {"m": {"a": shared, "b": rand(8, 3)}})
        assert repo.stats().chunk_bytes == 40 * PS
        assert repo.verify().ok
    with Repository.open_local(tmp_path / "s") as repo:  # the compacted index reloads
        assert_restores(repo, "j", g2, {"m": {"a": shared, "b": rand(8, 3)}})


# -- verify and stats ----------------------------------------------------------------


def test_verify_names_the_damaged_generation_and_member(repo: Repository, tmp_path: Path) -> None:
    shared, own = rand(8, 1), rand(8, 2)
    g1 = checkpoint(repo, "j", {"a": {"r": shared}, "b": {"r": rand(8, 3)}})
    g2 = checkpoint(repo, "j", {"a": {"r": shared}, "b": {"r": own}})
    assert repo.verify().ok
    # damage one chunk of `shared`: a byte inside its blob in the pack
    cid = chunk_ids_of(shared, 4 * PS)[0][:1]
    _found, loc = repo.index.chunks("job:j").lookup(cid)
    pack = repo.index.pack(int(loc["pack"][0])).name
    path = tmp_path / "store" / "packs" / pack[:2] / pack
    raw = bytearray(path.read_bytes())
    raw[int(loc["offset"][0]) + 100] ^= 0xFF
    path.write_bytes(bytes(raw))
    rep = repo.verify()
    assert not rep.ok
    assert {(d.job, d.generation, d.member) for d in rep.damage} == {("j", g1, "a"), ("j", g2, "a")}
    assert all(d.chunks == 1 and d.first_chunk == cid.tobytes().hex() for d in rep.damage)
    assert [p for p, _ in rep.damaged_packs] == [pack]
    with pytest.raises(Exception, match="does not match"):
        repo.read_region("j", g2, "a", "r")


def test_verify_reports_missing_pack_and_damaged_manifest(repo: Repository, tmp_path: Path) -> None:
    g1 = checkpoint(repo, "j", {"a": {"r": rand(8, 1)}})
    g2 = checkpoint(repo, "k", {"a": {"r": rand(8, 2)}})
    man = tmp_path / "store" / "manifests" / "k" / f"{g2:010d}"
    man.write_bytes(man.read_bytes()[:-3])
    for p in (tmp_path / "store" / "packs").rglob("*"):
        if p.is_file() and repo.index.pack_number(bytes.fromhex(p.name)) is not None:
            pid = repo.index.pack_number(bytes.fromhex(p.name))
            if repo.index.pack(pid).namespace == "job:j":  # type: ignore[arg-type]
                p.unlink()
    rep = repo.verify()
    whys = {(d.job, d.generation, d.member): d.why for d in rep.damage}
    assert "manifest" in whys[("k", g2, "*")]
    assert "unreadable" in whys[("j", g1, "a")] or "missing" in whys[("j", g1, "a")]


def test_rebuild_index_from_pack_trailers(repo: Repository, tmp_path: Path) -> None:
    img = {"a": {"r": rand(64, 1)}, "b": {"r": rand(32, 2)}}
    g = checkpoint(repo, "j", img)
    chunks = repo.stats().chunks
    assert repo.rebuild_index() == chunks
    assert len(list((tmp_path / "store" / "index").iterdir())) == 1
    assert_restores(repo, "j", g, img)
    assert repo.verify().ok


def test_read_survives_a_repack_between_lookup_and_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Repository.open_local(tmp_path / "s", StoreConfig(pack_size=1 << 22)) as repo:
        shared = rand(32, 1)
        checkpoint(repo, "j", {"m": {"a": shared, "b": rand(96, 2)}})
        g2 = checkpoint(repo, "j", {"m": {"a": shared}})
        real = repo.backend.get_range
        calls: list[GcReport] = []

        def racing_get_range(kind: Kind, name: str, offset: int, length: int) -> bytes:
            if not calls:  # the lookup is done; now gc repacks that very pack
                calls.append(repo.gc(keep=1))
            return real(kind, name, offset, length)

        monkeypatch.setattr(repo.backend, "get_range", racing_get_range)
        assert repo.read_region("j", g2, "m", "a") == shared
        assert calls[0].packs_repacked == 1


class _HookedLock:
    """The repository's lock, running `hook` once when it is next released outermost:
    what another thread could do in the gap between two locked sections."""

    def __init__(self, lock: Any) -> None:
        self.lock, self.depth, self.hook = lock, 0, None

    def __enter__(self) -> None:
        self.lock.__enter__()
        self.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        outer = self.depth == 0
        self.lock.__exit__(*exc)
        if outer and self.hook is not None:
            hook, self.hook = self.hook, None
            hook()


def test_missing_sees_a_pack_indexed_while_it_asks(tmp_path: Path) -> None:
    """A chunk in a pack the writer is storing counts as present, even when another
    upload's call indexes that pack while `missing` runs (it looked the index up and
    the writer's packs up under two holds of the lock: a pack moved between them in
    the gap was in neither, and 4 concurrent uploads failed with ChunkMissing)."""
    repo = Repository.open_local(tmp_path / "store", StoreConfig(pack_size=1 << 16))
    try:
        gate = threading.Event()
        put_parts = repo.backend.put_parts  # type: ignore[attr-defined]

        def slow_put(*a: Any, **k: Any) -> Any:
            gate.wait(10)
            return put_parts(*a, **k)

        repo.backend.put_parts = slow_put  # type: ignore[attr-defined]
        n = repo.begin("j")
        chunks = [rand(16, seed=i) for i in range(8)]  # 64 KiB each: a pack each
        ids = np.concatenate([chunk_ids_of(c, PS * 16)[0] for c in chunks])
        repo.add_chunks("j", n, ids, chunks)
        lock = repo.lock
        hooked = _HookedLock(lock)

        def other_upload() -> None:  # the puts end and another call indexes the packs
            gate.set()
            with lock:
                repo.integrate(block=True)

        hooked.hook = other_upload
        repo.lock = hooked  # type: ignore[assignment]
        assert repo.missing("j", n, ids).size == 0
        repo.lock = lock
        gate.set()
    finally:
        repo.close()


def test_gc_never_deletes_a_pack_the_cached_ledger_names(tmp_path: Path) -> None:
    """A pack object that the ledger of node caches names (a local generation's pack,
    drained but its report not taken) outlives gc even when no kept manifest
    references its chunks; once the ledger lets it go, gc removes it."""
    from coordinator.store.cached import CachedPack

    def objects() -> set[str]:
        return {o.name for o in repo.backend.list(Kind.PACKS)}

    with Repository.open_local(tmp_path / "s", StoreConfig(pack_size=1 << 22)) as repo:
        checkpoint(repo, "j", {"m": {"a": rand(16, 1)}})
        (name,) = objects()  # generation 1's pack, unreferenced once 1 is dropped
        g2 = checkpoint(repo, "j", {"m": {"a": rand(16, 2)}})
        held = CachedPack(name, "b", "job:j", 1, b"", "j", g2, drained=True)
        repo.cached.committed("j", g2, [held], {name})  # generation 2 depends on it
        rep = repo.gc(keep=1)
        assert rep.dropped == (("j", 1),) and rep.packs_deleted == 0, rep
        assert name in objects()
        del repo.cached.packs[name], repo.cached.deps[("j", g2)]
        assert repo.gc(keep=1).packs_deleted == 1
        assert name not in objects()
        assert_restores(repo, "j", g2, {"m": {"a": rand(16, 2)}})
