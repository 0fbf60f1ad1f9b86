"""Crash consistency, in process: fail after each step of commit and of gc, reopen the
store as a restarted coordinator would, and check that no partial generation is
visible, what was committed restores exactly, and gc reclaims every leftover.
(tests/integration/test_store_crash.py does the same with real process deaths.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.store import Repository
from storecore.backend import Kind
from tests.helpers.store_crash import (
    COMMIT_STEPS,
    CONFIG,
    GC_STEPS,
    assert_clean,
    crash_during_commit,
    crash_during_gc,
)
from tests.helpers.store_support import checkpoint, rand


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_crash_after_each_commit_step(tmp_path: Path, step: str) -> None:
    crash_during_commit(lambda: Repository.open_local(tmp_path / "s", CONFIG), step)


@pytest.mark.parametrize("step", GC_STEPS)
def test_crash_after_each_gc_step(tmp_path: Path, step: str) -> None:
    crash_during_gc(lambda: Repository.open_local(tmp_path / "s", CONFIG), step)


def test_interrupted_put_leaves_no_visible_object(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with Repository.open_local(root, CONFIG) as repo:
        g = checkpoint(repo, "j", {"m": {"r": rand(8, 1)}})
    (root / "manifests" / "j" / ".tmp-0123456789abcdef").write_bytes(b"half a manif")
    (root / "packs" / ".tmp-fedcba9876543210").write_bytes(b"half a pack")
    with Repository.open_local(root, CONFIG) as repo:
        assert [o.name for o in repo.backend.list(Kind.MANIFESTS)] == [f"j/{g:010d}"]
        assert not list(root.rglob(".tmp-*"))
        assert_clean(repo)
