"""The repository on the S3 backend (a real SeaweedFS server): the repository contract
(tests/helpers/repo_contract.py: tests that need nothing but a `repo`), run again here with
an S3-backed one; crash after each commit and gc step; verify finding damage written
into the bucket; reopening a store from the bucket alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.store import Repository, StoreConfig
from cpcoord.errors import StoreLocked
from storecore.backend import Kind
from storecore.ids import chunk_ids_of
from testbed.seaweed import Seaweed
from tests.helpers.repo_contract import *  # noqa: F403 - the contract, on this `repo`
from tests.helpers.store_crash import (
    COMMIT_STEPS,
    CONFIG,
    GC_STEPS,
    crash_during_commit,
    crash_during_gc,
)
from tests.helpers.store_support import assert_restores, checkpoint, rand

pytestmark = pytest.mark.integration


@pytest.fixture
def repo(seaweed: Seaweed, tmp_path: Path) -> Iterator[Repository]:
    """What the reused tests get: the same store config as in the unit tests, on S3."""
    r = seaweed.repository(tmp_path / "state", StoreConfig(pack_size=1 << 20))
    yield r
    r.close()


# -- crash consistency on S3 (tests/helpers/store_crash.py, as on a directory) ---------


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_crash_after_each_commit_step(seaweed: Seaweed, tmp_path: Path, step: str) -> None:
    prefix = seaweed.backend().prefix
    crash_during_commit(lambda: Repository(seaweed.backend(prefix), tmp_path, CONFIG), step)


@pytest.mark.parametrize("step", GC_STEPS)
def test_crash_after_each_gc_step(seaweed: Seaweed, tmp_path: Path, step: str) -> None:
    prefix = seaweed.backend().prefix
    crash_during_gc(lambda: Repository(seaweed.backend(prefix), tmp_path, CONFIG), step)


# -- S3-specific ------------------------------------------------------------------------


def test_verify_finds_damage_written_into_the_bucket(repo: Repository) -> None:
    shared = rand(8, 1)
    g1 = checkpoint(repo, "j", {"a": {"r": shared}, "b": {"r": rand(8, 3)}})
    g2 = checkpoint(repo, "k", {"a": {"r": rand(8, 2)}})
    assert repo.verify().ok
    cid = chunk_ids_of(shared, 4 * 4096)[0][:1]
    _found, loc = repo.index.chunks("job:j").lookup(cid)
    pack = repo.index.pack(int(loc["pack"][0])).name
    raw = bytearray(repo.backend.get(Kind.PACKS, pack))
    raw[int(loc["offset"][0]) + 100] ^= 0xFF  # a bit flip at rest, in the bucket
    repo.backend.put(Kind.PACKS, pack, bytes(raw))
    man = f"k/{g2:010d}"
    repo.backend.put(Kind.MANIFESTS, man, repo.backend.get(Kind.MANIFESTS, man)[:-3])
    rep = repo.verify()
    assert not rep.ok
    got = {(d.job, d.generation, d.member) for d in rep.damage}
    assert got == {("j", g1, "a"), ("k", g2, "*")}
    assert [p for p, _ in rep.damaged_packs] == [pack]


def test_reopen_from_the_bucket_rebuilds_the_index(seaweed: Seaweed, tmp_path: Path) -> None:
    """A second coordinator run on the same bucket and state: the index files are a
    cache, the packs in the bucket are the truth; the lock is the state directory's."""
    prefix = seaweed.backend().prefix
    img = {"m": {"r": rand(32, 1)}}
    with Repository(seaweed.backend(prefix), tmp_path) as repo:
        g1 = checkpoint(repo, "j", img)
        with pytest.raises(StoreLocked):
            Repository(seaweed.backend(prefix), tmp_path)
        for o in list(repo.backend.list(Kind.INDEX)):
            repo.backend.delete(Kind.INDEX, o.name)
    with Repository(seaweed.backend(prefix), tmp_path) as repo:
        assert_restores(repo, "j", g1, img)
        assert len(list(repo.backend.list(Kind.INDEX))) == 1  # rebuilt from the trailers
        assert repo.verify().ok
