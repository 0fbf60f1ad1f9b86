"""Crash consistency of the store, one scenario per step: fail after a step of commit or
of gc, reopen the store as a restarted coordinator would, and check that no partial
generation is visible, what was committed restores exactly, and gc reclaims every
leftover. The same scenarios run on a directory (tests/unit/test_store_crash.py) and on
S3 (tests/integration/test_store_s3_repository.py); `open_repo()` opens that store.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.store import Repository, StoreConfig
from coordinator.store.catalog import State
from cpcoord.errors import GenerationStateError
from storecore.backend import Kind
from testbed.stores import StoreArgs, open_store
from tests.helpers.store_support import assert_restores, checkpoint, rand, upload

COMMIT_STEPS = ["packs", "index", "manifest", "catalog"]
GC_STEPS = ["gc:retention", "gc:marked", "gc:repacked", "gc:index"]
CONFIG = StoreConfig(pack_size=1 << 18)


class Crash(Exception):
    pass


def crash_at(step: str) -> Callable[[str], None]:
    def fault(s: str) -> None:
        if s == step:
            raise Crash(s)

    return fault


def assert_clean(repo: Repository, keep: int = 100, one_index: bool = True) -> None:
    """Every stored object is needed: packs hold only live chunks (gc keeping `keep`
    generations drops nothing), manifests are exactly the committed ones, the index is
    one object (`one_index`), and everything verifies."""
    rep = repo.gc(keep=keep)
    assert rep.chunks_dropped == 0 and rep.orphan_manifests == 0 and rep.packs_deleted == 0
    committed = {g.manifest for g in repo.generations()}
    assert {o.name for o in repo.backend.list(Kind.MANIFESTS)} == committed
    if one_index:
        assert len(list(repo.backend.list(Kind.INDEX))) == 1
    assert repo.verify().ok


def image(seed: int) -> dict[str, dict[str, bytes]]:
    """Two members' regions, seeded: a heap, a zero region, a small heap."""
    return {"a": {"heap": rand(96, seed), "zero": bytes(32 * 4096)}, "b": {"heap": rand(16, 1)}}


def open_repo(root: Path, where: StoreArgs) -> Repository:
    """The store at `root`, or on S3 when store_select says so (tests/helpers/stores.py)."""
    return open_store(
        root, where.get("store_url"), where.get("extra_env"), StoreConfig(pack_size=1 << 18)
    )


def crash_during_commit(open_repo: Callable[[], Repository], step: str) -> None:
    img1 = {"a": {"r": rand(64, 1)}, "b": {"r": rand(16, 2)}}
    img2 = {"a": {"r": rand(64, 3)}, "b": {"r": rand(16, 2)}}
    repo = open_repo()
    g1 = checkpoint(repo, "j", img1)
    m2 = upload(repo, "j", img2)
    repo.fault = crash_at(step)
    with pytest.raises(Crash):
        repo.commit(m2)
    repo.close()  # the process is gone; nothing else of it survives

    repo = open_repo()
    visible = [g.number for g in repo.generations("j")]
    if step == "catalog":  # the flip happened: the generation is complete
        assert visible == [g1, m2.generation]
        assert_restores(repo, "j", m2.generation, img2)
    else:
        assert visible == [g1]
        assert repo.catalog.get("j", m2.generation).state is State.ABORTED
        with pytest.raises(GenerationStateError):
            repo.manifest("j", m2.generation)
        rep = repo.gc(keep=5)
        assert rep.chunks_dropped == 16  # img2's new chunks of "a"; "b" was deduplicated
        assert rep.orphan_manifests == (1 if step == "manifest" else 0)
    assert_restores(repo, "j", g1, img1)
    assert_clean(repo)
    g3 = checkpoint(repo, "j", img2)  # the next checkpoint commits and is exact
    assert_restores(repo, "j", g3, img2)
    assert_clean(repo)
    repo.close()


def crash_during_gc(open_repo: Callable[[], Repository], step: str) -> None:
    shared = rand(16, 7)
    imgs = [{"m": {"s": shared, "r": rand(48, i)}} for i in range(4)]
    repo = open_repo()
    gens = [checkpoint(repo, "j", img) for img in imgs]
    repo.fault = crash_at(step)
    with pytest.raises(Crash):
        repo.gc(keep=2)
    repo.close()

    repo = open_repo()
    for g, img in zip(gens[2:], imgs[2:], strict=True):
        assert_restores(repo, "j", g, img)
    repo.gc(keep=2)
    assert [g.number for g in repo.generations("j")] == gens[2:]
    assert repo.stats().chunk_bytes == (16 + 2 * 48) * 4096
    assert_clean(repo)
    repo.close()
