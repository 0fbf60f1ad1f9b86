"""docs/operations.md's catalog backup and rebuild procedures, run as written.

The shell snippets under `<!-- backup-catalog -->` and `<!-- rebuild-catalog -->` are
taken from the document, pointed at a store in the test's tmp dir, and run with bash:
the online backup while the store is open and being written (as under a running
coordinator), a restore from it, and a rebuild from the manifests alone. Each must give
back the same committed generations with the same bytes.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.store import Repository
from tests.helpers.store_support import assert_restores, checkpoint, rand

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "operations.md"


def snippet(tag: str) -> str:
    text = DOC.read_text()
    m = re.search(rf"<!-- {tag} -->\n```sh\n(.*?)```", text, re.S)
    assert m, f"no `{tag}` snippet in docs/operations.md"
    return m.group(1)


def run(script: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # `python3` in the document: this interpreter, where cpcoord is importable.
    script = script.replace("python3 ", f"{sys.executable} ")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, f"{script}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def copy_objects(src: Path, dst: Path) -> None:
    """What a file-level backup of the objects copies (everything but the catalog/lock)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("catalog.sqlite*", "lock", "locks"))


def test_online_backup_restore_and_rebuild(tmp_path: Path) -> None:
    store = tmp_path / "store"
    images = {
        1: {"m": {"heap": rand(24, 1)}},
        2: {"m": {"heap": rand(8, 2) + rand(16, 1)[8 * 4096 :]}},
    }
    repo = Repository.open_local(store)
    try:
        for n, image in images.items():
            assert checkpoint(repo, "train", image) == n
        in_flight = repo.begin("train")  # a generation in flight while the backup runs
        backup = tmp_path / "backup" / "catalog.sqlite"
        backup.parent.mkdir()
        run(
            snippet("backup-catalog")
            .replace("/var/lib/cpcoord/store", str(store))
            .replace("/backup/catalog.sqlite", str(backup))
        )
        repo.abort("train", in_flight, "test")
    finally:
        repo.close()

    with sqlite3.connect(backup) as db:
        (ok,) = db.execute("PRAGMA integrity_check").fetchone()
        assert ok == "ok"
        rows = db.execute("SELECT number, state FROM generations ORDER BY number").fetchall()
    assert rows == [(1, "COMMITTED"), (2, "COMMITTED"), (3, "PREPARING")]

    # Restore: the objects, then the catalog backup in place of the catalog.
    restored = tmp_path / "restored"
    copy_objects(store, restored)
    shutil.copy(backup, restored / "catalog.sqlite")
    with Repository.open_local(restored) as r:
        assert [g.number for g in r.generations("train")] == [1, 2]
        for n, image in images.items():
            assert_restores(r, "train", n, image)

    # Rebuild: no catalog at all, only the objects.
    rebuilt = tmp_path / "rebuilt"
    copy_objects(store, rebuilt)
    assert not (rebuilt / "catalog.sqlite").exists()
    out = run(snippet("rebuild-catalog").replace("/var/lib/cpcoord/store", str(rebuilt)))
    assert "restored=(('train', 1), ('train', 2))" in out, out
    with Repository.open_local(rebuilt) as r:
        assert [g.number for g in r.generations("train")] == [1, 2]
        for n, image in images.items():
            assert_restores(r, "train", n, image)
