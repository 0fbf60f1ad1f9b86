"""The local store backend alone (storecore/backend.py): permissions, failed
writes, temporary files, pack fan-out. The contract every backend passes (local and S3):
tests/integration/test_store_backend.py."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cpcoord.errors import StoreError
from storecore.backend import Kind, LocalBackend

PACK = "ab" + "0" * 62


def test_local_permissions_are_owner_only(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        b = LocalBackend(tmp_path / "s")
        b.put(Kind.PACKS, PACK, b"secret")
        b.put(Kind.MANIFESTS, "job/0000000001", b"m")
    finally:
        os.umask(old)
    for p in [tmp_path / "s", *(tmp_path / "s").rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o077 == 0, f"{p} is {oct(mode)}"


def test_local_failed_put_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = LocalBackend(tmp_path / "s")
    b.put(Kind.INDEX, "i1", b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StoreError, match="No space left"):
        b.put(Kind.INDEX, "i1", b"new")
    with pytest.raises(StoreError):
        b.put(Kind.INDEX, "i2", b"new")
    monkeypatch.undo()
    assert b.get(Kind.INDEX, "i1") == b"old"
    assert not b.exists(Kind.INDEX, "i2")
    assert [p.name for p in (tmp_path / "s" / "index").iterdir()] == ["i1"]


def test_local_temp_files_are_invisible_and_discarded(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "s")
    b.put(Kind.PACKS, PACK, b"x")
    leftover = tmp_path / "s" / "packs" / "ab" / ".tmp-deadbeef"
    leftover.write_bytes(b"partial")
    assert [o.name for o in b.list(Kind.PACKS)] == [PACK]
    assert b.discard_incomplete() == 1
    assert not leftover.exists()
    assert b.get(Kind.PACKS, PACK) == b"x"


def test_local_packs_fan_out(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "s")
    b.put(Kind.PACKS, PACK, b"x")
    assert (tmp_path / "s" / "packs" / "ab" / PACK).is_file()
