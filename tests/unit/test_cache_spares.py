"""Spare pack files of a node cache on tmpfs (nodeagent/cache/spares.py) and packs that
borrow the agent's staging (storecore/writer.py, "Borrowed blobs"): a pack written over
a spare is exactly its bytes, cut to size; spares never push the cache past its size;
a pack holding views of a failed upload's staging is stored before the staging may be
reused, so a later write into the staging cannot change a stored pack. Real files on
/dev/shm (tmpfs) and in a disk directory; no daemons."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cpcoord.errors import ObjectNotFound, UploadFailed
from nodeagent.cache.store import NodeCache, TieredBackend
from nodeagent.upload.direct import DirectStore, PackBuilder
from storecore import directio, packs
from storecore.backend import Kind, LocalBackend
from storecore.ids import digest_all


@pytest.fixture
def shm() -> Iterator[Path]:
    if not directio.in_memory("/dev/shm"):
        pytest.fail("/dev/shm is not tmpfs here")
    d = Path(tempfile.mkdtemp(prefix="cpcoord-test-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _wait_spares(cache: NodeCache, n: int) -> None:
    deadline = time.monotonic() + 30
    while cache.spares.count < n:
        assert time.monotonic() < deadline, f"{cache.spares.count} of {n} spares after 30 s"
        time.sleep(0.01)


def test_memory_file_systems_are_told_apart(shm: Path, tmp_path: Path) -> None:
    assert directio.in_memory(shm) and LocalBackend(shm / "s").gathers
    disk = not directio.in_memory(tmp_path)
    assert LocalBackend(tmp_path / "s").gathers is not disk
    assert not directio.in_memory(tmp_path / "does-not-exist")


@pytest.mark.parametrize("count", [1, 3, 1500])  # 1500: more than one writev (IOV_MAX)
def test_gathered_parts_land_byte_for_byte(shm: Path, count: int) -> None:
    rng = np.random.default_rng(count)
    parts = [rng.bytes(int(n)) for n in rng.integers(0, 9000, count)]
    fd = os.open(shm / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        directio.write_parts(fd, [memoryview(p) for p in parts], gather=True)
    finally:
        os.close(fd)
    assert (shm / "f").read_bytes() == b"".join(parts)


def test_a_pack_written_over_a_spare_is_its_bytes_cut_to_size(shm: Path) -> None:
    cache = NodeCache(shm / "cache", size=64 << 20)
    cache.prepare(4 << 20, 8 << 20)
    _wait_spares(cache, 2)
    assert cache.spares.bytes == 8 << 20
    store = LocalBackend(shm / "store")
    data = np.random.default_rng(1).bytes((1 << 20) + 5)
    TieredBackend(cache, store, "j", 1).put_parts(Kind.PACKS, "nodes/n/p1", [data[:7], data[7:]])
    assert cache.spares.count == 1, "the put did not take a spare"
    assert cache.backend.get(Kind.PACKS, "nodes/n/p1") == data
    assert cache.backend.stat(Kind.PACKS, "nodes/n/p1").size == len(data)
    assert not list((shm / "cache").rglob(".tmp-*"))
    cache.committed("j", 1)  # refills for the next checkpoint
    _wait_spares(cache, 2)


def test_spares_never_push_the_cache_past_its_size(shm: Path) -> None:
    cache = NodeCache(shm / "cache", size=10 << 20)
    cache.prepare(4 << 20, 64 << 20)  # wants 64 MiB of spares, room for 2
    deadline = time.monotonic() + 10
    while cache.spares._filling and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.spares.count == 2
    # A pack that takes a spare still fits; the spares count as bytes in use.
    store = LocalBackend(shm / "store")
    TieredBackend(cache, store, "j", 1).put_parts(Kind.PACKS, "nodes/n/a", [b"x" * (4 << 20)])
    assert cache.cached("j", 1) == ["nodes/n/a"] and cache.full == 0
    TieredBackend(cache, store, "j", 1).put_parts(Kind.PACKS, "nodes/n/b", [b"y" * (4 << 20)])
    TieredBackend(cache, store, "j", 1).put_parts(Kind.PACKS, "nodes/n/c", [b"z" * (4 << 20)])
    assert cache.full == 1 and store.exists(Kind.PACKS, "nodes/n/c")
    on_disk = sum(p.stat().st_size for p in (shm / "cache").rglob("*") if p.is_file())
    assert on_disk <= 10 << 20


def test_a_disk_cache_keeps_no_spares(tmp_path: Path) -> None:
    if directio.in_memory(tmp_path):
        pytest.fail("tmp_path is on tmpfs here: the disk case cannot be told")
    cache = NodeCache(tmp_path / "cache")
    cache.prepare(4 << 20, 8 << 20)
    assert cache.backend.spares is None and cache.spares.count == 0
    assert not (tmp_path / "cache" / "spare").exists(), "an empty spare directory on disk"


def test_a_failed_uploads_borrowed_chunks_are_stored_before_its_staging_is_reused(
    shm: Path,
) -> None:
    """Two members' uploads share a generation's packs. Member a's upload ends without
    finishing (it failed) while b's goes on: a's `close` stores the open pack that holds
    views of a's staging, so that a's next capture, writing into that staging, cannot
    change a pack b stores later. Every pack stored verifies."""
    cache = NodeCache(shm / "cache")
    store = DirectStore(LocalBackend(shm / "store"), "n1", "id", "loc", "job", 8 << 20,
                        None, cache=cache)  # fmt: skip
    assert store.borrows
    staging = np.frombuffer(bytearray(np.random.default_rng(2).bytes(2 << 20)), np.uint8)
    views = [staging[i : i + 65536].data for i in range(0, staging.size, 65536)]
    a, b = PackBuilder(store, "j", 1, "a"), PackBuilder(store, "j", 1, "b")
    a.add(digest_all(views), views)  # 2 MiB: stays in the open pack
    a.close()  # a failed: its staging is released after this
    with pytest.raises(UploadFailed):
        a.add(digest_all(views[:1]), views[:1])
    staging[:] = 0  # the next capture writes into it
    other = [np.random.default_rng(3).bytes(65536) for _ in range(4)]
    b.add(digest_all(other), other)
    b.finish()
    b.close()
    names = [o.name for o in cache.backend.list(Kind.PACKS)]
    assert len(names) == 2
    for name in names:
        packs.verify_pack(cache.backend.get(Kind.PACKS, name), name)


def test_a_mapped_cache_pack_goes_to_a_disk_store_with_o_direct_from_its_pages(
    shm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain maps a cached pack (LocalBackend.mapped) instead of reading it into
    fresh memory: a store on disk writes the mapping's pages with O_DIRECT as they lie,
    no bounce copy. The bytes land exact; the mapping outlives the file's deletion; a
    missing object is ObjectNotFound; an empty one maps to no bytes."""
    if directio.in_memory(tmp_path):
        pytest.fail("tmp_path is on tmpfs here: the disk case cannot be told")
    cache, store = LocalBackend(shm / "cache"), LocalBackend(tmp_path / "store")
    data = np.random.default_rng(3).bytes(3 * directio.BOUNCE + 5000)
    cache.put(Kind.PACKS, "p1", data)
    direct: list[tuple[int, int]] = []  # (address, length) of each O_DIRECT write
    real = os.write

    def write(fd: int, buf: bytes | memoryview) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct.append((np.frombuffer(buf, np.uint8).ctypes.data, len(buf)))
        return real(fd, buf)

    monkeypatch.setattr(directio.os, "write", write)
    with cache.mapped(Kind.PACKS, "p1") as view:
        cache.delete(Kind.PACKS, "p1")  # eviction meanwhile: the pages stay mapped
        start = np.frombuffer(view, np.uint8).ctypes.data
        store.put(Kind.PACKS, "p1", view)
    assert store.get(Kind.PACKS, "p1") == data
    # Every O_DIRECT write came from the mapping itself (no bounce buffer), all of it
    # but the last partial block.
    assert sum(n for _, n in direct) == len(data) // directio.ALIGN * directio.ALIGN
    assert all(start <= a and a + n <= start + len(data) for a, n in direct)
    with pytest.raises(ObjectNotFound), cache.mapped(Kind.PACKS, "gone"):
        pass
    cache.put(Kind.PACKS, "empty", b"")
    with cache.mapped(Kind.PACKS, "empty") as view:
        assert len(view) == 0
