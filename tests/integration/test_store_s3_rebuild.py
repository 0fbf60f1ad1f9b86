"""Rebuilding the catalog from the store's objects, on the local and the S3 backend:
delete the SQLite catalog, reopen, and the same generations are listed and restore byte
for byte; damaged or incomplete manifests are reported, never restored."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.store import Repository, StoreConfig
from coordinator.store.catalog import GenerationInfo
from coordinator.store.location import open_repository
from coordinator.store.rebuild import rebuild_catalog
from storecore.backend import Backend, Kind, LocalBackend
from testbed.seaweed import BUCKET, Seaweed
from tests.helpers.store_support import assert_restores, checkpoint, rand, upload

pytestmark = pytest.mark.integration
CONFIG = StoreConfig(pack_size=1 << 18)
Opener = Callable[[], Backend]


@pytest.fixture(params=["local", "s3"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens the same store again each call (a new backend object, as after a restart)."""
    if request.param == "local":
        return lambda: LocalBackend(tmp_path / "store")
    sw: Seaweed = request.getfixturevalue("seaweed")
    prefix = sw.backend().prefix
    return lambda: sw.backend(prefix)


def drop_catalog(state: Path) -> None:
    for f in state.glob("catalog.sqlite*"):
        f.unlink()


def visible(info: GenerationInfo) -> tuple[object, ...]:
    """What must survive a rebuild (bytes_new and times are recomputed)."""
    s = info.sizes
    return (info.job, info.number, info.parent, info.manifest, info.namespace,
            s.members, s.pages, s.zero_pages, s.bytes_logical, s.bytes_stored)  # fmt: skip


def test_rebuild_lists_the_same_generations_readable(opener: Opener, tmp_path: Path) -> None:
    state = tmp_path / "state"
    imgs = {
        ("j", 1): {"a": {"r": rand(32, 1), "z": bytes(8 * 4096)}, "b": {"r": rand(8, 2)}},
        ("j", 2): {"a": {"r": rand(32, 3), "z": bytes(8 * 4096)}, "b": {"r": rand(8, 2)}},
        ("k", 1): {"x": {"heap": rand(16, 4)}},
    }
    with Repository(opener(), state, CONFIG) as repo:
        gens = {key: checkpoint(repo, key[0], img) for key, img in imgs.items()}
        checkpoint(repo, "j", {"a": {"r": rand(4, 5)}})  # j/3, dropped by retention
        repo.gc(keep=2)
        m = upload(repo, "k", {"x": {"heap": rand(16, 6)}})  # k/2 in flight, never done
        repo.flush()
        before = [visible(g) for g in repo.generations()]
        assert [(g.job, g.number) for g in repo.generations()] == [("j", 2), ("j", 3), ("k", 1)]
    assert m.generation == 2
    drop_catalog(state)

    with Repository(opener(), state, CONFIG) as repo:
        report = rebuild_catalog(repo)
        assert report.restored == (("j", 2), ("j", 3), ("k", 1))
        assert report.skipped == () and report.present == 0
        assert [visible(g) for g in repo.generations()] == before
        assert_restores(repo, "j", gens[("j", 2)], imgs[("j", 2)])
        assert_restores(repo, "k", gens[("k", 1)], imgs[("k", 1)])
        assert repo.verify().ok
        again = rebuild_catalog(repo)  # idempotent
        assert again.restored == () and again.present == 3
        # numbering goes on after the restored ones; the next commit works
        g = checkpoint(repo, "k", {"x": {"heap": rand(16, 7)}})
        assert g == 2 and repo.catalog.get("k", g).parent == 1
        assert repo.gc(keep=5).orphan_manifests == 0


def test_damaged_and_incomplete_manifests_are_skipped(opener: Opener, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Repository(opener(), state, CONFIG) as repo:
        g1 = checkpoint(repo, "j", {"m": {"r": rand(16, 1)}})
        g2 = checkpoint(repo, "j", {"m": {"r": rand(16, 2)}})
        g3 = checkpoint(repo, "j", {"m": {"r": rand(16, 3)}})
        b = repo.backend
        name2, name3 = f"j/{g2:010d}", f"j/{g3:010d}"
        b.put(Kind.MANIFESTS, name2, b.get(Kind.MANIFESTS, name2)[:-1])  # truncated
        b.put(Kind.MANIFESTS, "j/0000000099", b.get(Kind.MANIFESTS, name3))  # misnamed copy
        b.put(Kind.MANIFESTS, "stray", b"junk")
        m3 = repo.manifest("j", g3)
    # g3's chunks vanish from the store: its packs are deleted
    b = opener()
    ns = m3.namespace
    with Repository(b, state, CONFIG) as repo:
        doomed = {repo.index.pack(int(p)).name for p in repo.index.chunks(ns).lookup(
            m3.chunk_ids())[1]["pack"]}  # fmt: skip
    for p in doomed:
        b.delete(Kind.PACKS, p)
    drop_catalog(state)
    with Repository(opener(), state, CONFIG) as repo:
        report = rebuild_catalog(repo)
        assert report.restored == (("j", g1),)
        why = dict(report.skipped)
        assert set(why) == {name2, name3, "j/0000000099", "stray"}
        assert "unreadable" in why[name2]
        assert "missing" in why[name3]
        assert "holds generation 3" in why["j/0000000099"]
        assert [g.number for g in repo.generations()] == [g1]
        assert_restores(repo, "j", g1, {"m": {"r": rand(16, 1)}})


def test_open_repository_rebuilds_a_new_catalog_from_the_bucket(
    seaweed: Seaweed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator moved to another machine: the same bucket, a new state directory."""
    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    url = f"s3://{BUCKET}/{seaweed.backend().prefix}/store"
    img = {"m": {"r": rand(64, 1)}}
    repo, report = open_repository(url, state_dir=tmp_path / "machine-a", config=CONFIG)
    assert report is None
    g1 = checkpoint(repo, "j", img)
    g2 = checkpoint(repo, "j", img)
    repo.close()
    repo, report = open_repository(url, state_dir=tmp_path / "machine-b", config=CONFIG)
    assert report is not None and report.restored == (("j", g1), ("j", g2))
    assert [g.number for g in repo.generations("j")] == [g1, g2]
    assert_restores(repo, "j", g2, img)
    assert repo.catalog.get("j", g2).sizes.bytes_new == 0  # nothing new: all deduplicated
    assert repo.catalog.get("j", g1).sizes.bytes_new > 0
    assert checkpoint(repo, "j", img) == g2 + 1
    repo.close()
    repo, report = open_repository(url, state_dir=tmp_path / "machine-b", config=CONFIG)
    assert report is None  # the catalog is there now
    repo.close()
