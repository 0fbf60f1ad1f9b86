"""The S3 server dies under the store: SIGKILL of SeaweedFS in the middle of a pack's
multipart upload (after some of its parts are stored), and at a random moment of a busy
ingest. The operation fails with a StoreError naming what it was writing, in bounded
time; after the server is back nothing partial is visible (every listed pack is whole
and hashes to its name, the generation is not committed), gc discards the stale upload,
and the next checkpoint commits and restores byte for byte, also after a reopen."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.store import Repository, StoreConfig, manifest_io
from cpcoord.errors import StoreError
from storecore.backend import Kind
from storecore.packs import pack_id_of
from testbed.seaweed import Seaweed
from tests.helpers.store_support import Image, assert_restores, checkpoint, rand, upload

pytestmark = pytest.mark.integration
MIB = 1 << 20
CONFIG = StoreConfig(pack_size=16 * MIB)
# Few, quick retries: the server stays down, so every attempt is refused.
FAST_FAIL: dict[str, Any] = {"max_attempts": 2, "connect_timeout": 2.0, "read_timeout": 10.0}


def big(seed: int, mib: int = 24) -> Image:
    return {"m": {"heap": rand(mib * 256, seed)}}


def assert_nothing_partial(repo: Repository, committed: list[int]) -> None:
    """Every object is whole and only committed generations are visible. (A manifest
    whose put reached the server just before it died, unacknowledged, may exist: whole,
    not visible, and gc deletes it.)"""
    for o in repo.backend.list(Kind.PACKS):
        data = repo.backend.get(Kind.PACKS, o.name)
        whole = len(data) == o.size and pack_id_of(data).format() == o.name
        assert whole, f"partial pack {o.name}"
    assert [g.number for g in repo.generations("j")] == committed
    names = {o.name for o in repo.backend.list(Kind.MANIFESTS)}
    assert names >= {f"j/{g:010d}" for g in committed}
    for name in names:
        manifest_io.decode(repo.backend.get(Kind.MANIFESTS, name), name)  # whole


def recover_and_go_on(sw: Seaweed, repo: Repository, state: Path, g1: int, img1: Image) -> None:
    """Server back: nothing partial, gc discards leftovers, the next checkpoint commits."""
    sw.start()
    assert_nothing_partial(repo, [g1])
    repo.gc(keep=5)
    assert repo.backend.incomplete_uploads() == []  # type: ignore[attr-defined]
    assert {o.name for o in repo.backend.list(Kind.MANIFESTS)} == {f"j/{g1:010d}"}
    img3 = big(3)
    g3 = checkpoint(repo, "j", img3)
    assert_restores(repo, "j", g3, img3)
    assert_restores(repo, "j", g1, img1)
    assert repo.verify().ok
    prefix = repo.backend.prefix  # type: ignore[attr-defined]
    repo.close()
    with Repository(sw.backend(prefix), state, CONFIG) as again:  # a restarted coordinator
        assert_nothing_partial(again, [g1, g3])
        assert len(list(again.backend.list(Kind.MANIFESTS))) == 2
        assert_restores(again, "j", g3, img3)
        rep = again.gc(keep=5)
        assert rep.chunks_dropped == 0 and rep.orphan_manifests == 0


def test_kill_mid_multipart_pack_upload(
    seaweed_private: Seaweed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sw = seaweed_private
    state = tmp_path / "state"
    backend = sw.backend(part_size=5 * MIB, part_threads=1, **FAST_FAIL)
    repo = Repository(backend, state, CONFIG)
    img1 = {"m": {"heap": rand(256, 1)}}
    g1 = checkpoint(repo, "j", img1)

    killed: list[str] = []
    real = backend._upload_part

    def part_then_kill(key: str, upload_id: str, no: int, chunk: memoryview) -> dict[str, Any]:
        if no == 2 and not killed:  # part 1 is stored; the server dies before part 2
            killed.append(key)
            sw.kill()
        return real(key, upload_id, no, chunk)

    monkeypatch.setattr(backend, "_upload_part", part_then_kill)
    t0 = time.monotonic()
    with pytest.raises(StoreError) as e:
        m2 = upload(repo, "j", big(2))  # a 16 MiB pack is sealed and put meanwhile
        repo.commit(m2)
    elapsed = time.monotonic() - t0
    monkeypatch.undo()
    assert killed, "the kill never happened: no multipart pack upload"
    assert "cannot write packs/" in str(e.value) and e.value.exit_code == 60
    assert elapsed < 30, f"failing took {elapsed:.0f}s: retries are not bounded"
    (n2,) = [g.number for g in repo.catalog.generations("j") if g.state.value == "PREPARING"]
    repo.abort("j", n2, f"store: {e.value}")  # what the coordinator does
    failed_pack = killed[0].rsplit("/", 1)[-1]

    sw.start()
    assert not repo.backend.exists(Kind.PACKS, failed_pack)  # the half-sent pack
    assert any(k == killed[0] for k, _ in backend.incomplete_uploads())  # abort failed
    sw.kill()
    recover_and_go_on(sw, repo, state, g1, img1)


def test_kill_at_a_random_moment_of_a_busy_ingest(seaweed_private: Seaweed, tmp_path: Path) -> None:
    sw = seaweed_private
    state = tmp_path / "state"
    repo = Repository(sw.backend(**FAST_FAIL), state, CONFIG)
    img1 = {"m": {"heap": rand(256, 1)}}
    g1 = checkpoint(repo, "j", img1)
    delay = random.Random().uniform(0.05, 0.8)
    timer = threading.Timer(delay, sw.kill)
    timer.start()
    try:
        with pytest.raises(StoreError):
            for i in range(20):  # ~480 MiB: far longer than the delay
                repo.commit(upload(repo, "j", big(100 + i)))
    finally:
        timer.join()
    for g in repo.catalog.generations("j"):
        if g.state.value == "PREPARING":
            repo.abort("j", g.number, "store unavailable")
    committed = [g.number for g in repo.generations("j")]
    sw.start()
    assert_nothing_partial(repo, committed)
    for n in committed[1:]:  # commits that won the race are whole
        assert_restores(repo, "j", n, big(100 + committed.index(n) - 1))
    if committed != [g1]:  # keep the helper's expectation: only g1 remains
        for n in committed[1:]:
            repo.delete_generation("j", n)
    sw.kill()
    recover_and_go_on(sw, repo, state, g1, img1)
