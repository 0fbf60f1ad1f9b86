"""Encryption at rest (storecore/crypt.py) through real daemons: with a store key,
bytes of a member's memory appear nowhere in the store's files (packs, manifests, index,
catalog), while export still returns them exactly and `verify` passes; without the key
the same bytes are found (so the grep can find what it looks for); a wrong key refuses
to read. Cluster helpers: tests/helpers/cluster.py."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.store.config import StoreConfig
from cpcoord.errors import DataCorrupted
from cpcoord.image import load_image, region_bytes
from storecore.crypt import ENV_KEY, Sealer
from testbed.cluster import Cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEY = "8f" * 32


def store_holds(c: Cluster, needle: bytes) -> list[str]:
    """Names of the store's files (or S3 objects and state files) that hold `needle`."""
    return [name for name, data in c.store_objects() if needle in data]


def checkpoint_and_export(c: Cluster, t: Any, tmp: Path) -> tuple[np.ndarray, np.ndarray]:
    m = t.mapping("data")
    c.cli("attach", "--job", "j", "--member", "m", "--pid", str(t.pid), "--node", "node-a",
          "--range", f"{m.addr:#x}-{m.end:#x}")  # fmt: skip
    want = t.read("data", 0, 32).reshape(-1)
    g = c.cli_json("checkpoint", "--job", "j")
    assert g["state"] == "committed", g
    out = tmp / f"export-{c.root.name}"
    c.cli("export", "--job", "j", "--generation", str(g["generation"]), "--out", str(out))
    image = load_image(out)
    region = next(r for r in image.member("m").regions if r.start == m.addr)
    return np.array(region_bytes(image, "m", region.name)).reshape(-1), want


def test_no_page_content_in_an_encrypted_store(
    cluster_factory: Callable[..., Cluster],
    target_factory: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Random pages: zstd stores them raw, so a plaintext store holds them verbatim.
    t = target_factory(maps=["data:32:anon:random:11"])
    monkeypatch.delenv(ENV_KEY, raising=False)
    plain = cluster_factory(nodes=("node-a",))
    got, want = checkpoint_and_export(plain, t, tmp_path)
    assert np.array_equal(got, want)
    markers = [want[p * 4096 + 100 : p * 4096 + 164].tobytes() for p in (0, 7, 31)]
    assert all(len(mk) == 64 for mk in markers) and want.size == 32 * 4096
    assert all(store_holds(plain, mk) for mk in markers)  # the control
    plain.close()

    monkeypatch.setenv(ENV_KEY, KEY)  # the coordinator daemon inherits it
    sealed = cluster_factory(nodes=("node-a",))
    got, want = checkpoint_and_export(sealed, t, tmp_path)
    assert np.array_equal(got, want)
    markers = [want[p * 4096 + 100 : p * 4096 + 164].tobytes() for p in (0, 7, 31)]
    for mk in markers:
        assert store_holds(sealed, mk) == []
    # Owner-only permissions on everything the store keeps on this machine (S3 objects
    # have no Unix permissions: there, the catalog's state directory).
    assert sealed.local_dir.is_dir()
    for dirpath, _, names in os.walk(sealed.local_dir):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) & 0o077 == 0, dirpath
        for n in names:
            assert stat.S_IMODE(os.stat(Path(dirpath) / n).st_mode) & 0o077 == 0, n
    v = sealed.cli("verify")
    assert v.returncode == 0, v.stderr
    sealed.close()

    # Offline: with the wrong key reading refuses (authenticated encryption), with the
    # right one the pages come back.
    for key, ok in ((b"\x01" * 32, False), (bytes.fromhex(KEY), True)):
        repo = sealed.open_repository(StoreConfig(sealer=Sealer(key)))
        try:
            g = repo.generations("j")[-1]
            if ok:
                runs = list(repo.iter_pages("j", g.number, member="m"))
                assert b"".join(bytes(r.data) for r in runs if r.data is not None) == want.tobytes()
            else:
                with pytest.raises(DataCorrupted):
                    repo.manifest("j", g.number)
        finally:
            repo.close()
