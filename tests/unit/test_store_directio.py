"""The store's bulk path: the local backend's O_DIRECT writes (coordinator/store/
directio.py) land every size and alignment byte for byte, also where the filesystem
refuses O_DIRECT; sealed parts equal the sealed pack; chunk views are kept uncopied only
where that is safe and cheap."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import numpy as np
import pytest

from storecore import directio
from storecore.backend import Kind

SIZES = [0, 1, 4095, 4096, directio.DIRECT_MIN - 1, directio.DIRECT_MIN + 123,
         directio.BOUNCE + directio.ALIGN, 2 * directio.BOUNCE + 77]  # fmt: skip


def _write(path: Path, data: bytes | memoryview) -> bytes:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        directio.write_all(fd, data)
        os.fsync(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        assert not flags & os.O_DIRECT, "O_DIRECT must be cleared after the bulk write"
    finally:
        os.close(fd)
    return path.read_bytes()


@pytest.mark.parametrize("size", SIZES)
def test_every_size_lands(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    assert _write(tmp_path / "x", data) == data
    # A view that does not start on a page (a slice of a bigger object) as well.
    assert _write(tmp_path / "y", memoryview(b"z" + data)[1:]) == data


def test_refused_o_direct_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = fcntl.fcntl

    def refuse(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT not supported")
        return real(fd, cmd, arg)

    monkeypatch.setattr(directio.fcntl, "fcntl", refuse)
    data = os.urandom(directio.BOUNCE + 5000)
    assert _write(tmp_path / "x", data) == data


def test_refused_first_direct_write_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.write
    calls = {"n": 0}

    def write(fd: int, buf: bytes | memoryview) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            calls["n"] += 1
            raise OSError(errno.EINVAL, "refused")
        return real(fd, buf)

    monkeypatch.setattr(directio.os, "write", write)
    data = os.urandom(directio.DIRECT_MIN + 4096 * 3 + 1)
    assert _write(tmp_path / "x", data) == data
    assert calls["n"] == 1


@pytest.mark.parametrize("n", [1, 40])
def test_sealed_parts_equal_the_sealed_pack(tmp_path: Path, n: int) -> None:
    import numpy as np

    from storecore import packs
    from storecore.backend import Kind, LocalBackend
    from storecore.ids import digest_all

    chunks = [os.urandom(65536 - 7 * i) for i in range(n)]
    ids = digest_all(chunks)

    def writer() -> packs.PackWriter:
        w = packs.PackWriter("job:t")
        w.add(ids, np.zeros(n, np.uint8), chunks, np.array([len(c) for c in chunks]))
        return w

    whole, parts = writer().seal(), writer().seal_parts()
    assert parts.id == whole.id and parts.size == len(whole.data)
    b = LocalBackend(tmp_path)
    b.put_parts(Kind.PACKS, parts.id.format(), parts.parts)
    got = b.get(Kind.PACKS, parts.id.format())
    assert got == whole.data
    packs.verify_pack(got, parts.id.format())


def test_compress_batch_keeps_views_only_of_mostly_kept_messages() -> None:
    """Chunks that are read-only views of a received message are stored without a copy
    when they make up most of it; a few raw chunks must not pin a whole message, and a
    view of a mutable buffer is always copied."""
    from storecore import compress, packs

    msg = os.urandom(1 << 20)
    views = [memoryview(msg)[i : i + 65536] for i in range(0, len(msg), 65536)]
    _, blobs = compress.compress_batch(views)
    assert all(isinstance(b, memoryview) and b.obj is msg for b in blobs)
    _, blobs = compress.compress_batch(views[:3])
    assert all(isinstance(b, bytes) for b in blobs)
    # A view of a mutable buffer is the pack writer's to copy: into bytes, or into its
    # arena when it has one; either way a later change of the buffer cannot reach it.
    from storecore.arena import Arena
    from storecore.ids import digest_all

    for arena in (None, Arena(1 << 20)):
        buf = bytearray(os.urandom(65536))
        want = bytes(buf)
        methods, blobs = compress.compress_batch([memoryview(buf)])
        w = packs.PackWriter("ns", arena)
        w.add(digest_all([want]), methods, blobs, np.array([len(want)], dtype=np.uint32))
        buf[:] = bytes(len(buf))
        data = w.seal().data
        assert want in data
        if arena is not None:
            assert arena.pos == len(data)  # the whole pack, laid out flat


@pytest.mark.parametrize("arena_size", [4 << 20, 300_000, 100_000])
def test_a_pack_lies_flat_in_its_arena_when_it_fits(tmp_path: Path, arena_size: int) -> None:
    """With room for all of it, the sealed pack is one page-aligned view of the arena,
    compressed (immutable) blobs copied in too; with too little room it falls back to
    parts, and either way the bytes, the id and a second seal are the same, and the
    local backend writes exactly those bytes (the O_DIRECT path without a bounce)."""
    from storecore import compress, packs
    from storecore.arena import Arena
    from storecore.backend import LocalBackend
    from storecore.ids import digest_all

    chunks = [os.urandom(65536), bytes(65536), os.urandom(65536), b"x" * 65536, os.urandom(65536)]
    stage = bytearray(b"".join(chunks))
    views = [memoryview(stage)[i : i + 65536] for i in range(0, len(stage), 65536)]
    methods, blobs = compress.compress_batch(views)
    assert set(methods.tolist()) == {packs.METHOD_RAW, packs.METHOD_ZSTD}
    plain = packs.PackWriter("ns")
    plain.add(digest_all(chunks), methods, blobs, np.full(5, 65536, dtype=np.uint32))
    want = plain.seal()

    arena = Arena(arena_size)
    w = packs.PackWriter("ns", arena)
    ids = digest_all(chunks)
    w.add(ids[:2], methods[:2], blobs[:2], np.full(2, 65536, dtype=np.uint32))
    w.add(ids[2:], methods[2:], blobs[2:], np.full(3, 65536, dtype=np.uint32))
    stage[:] = bytes(len(stage))  # the caller reuses its buffer
    sp = w.seal_parts()
    flat = len(want.data) <= arena_size
    assert (len(sp.parts) == 1) is flat
    if flat:
        assert int(np.frombuffer(sp.parts[0], np.uint8).ctypes.data) % 4096 == 0
    assert b"".join(sp.parts) == want.data and sp.id == want.id and sp.size == len(want.data)
    again = w.seal_parts()
    assert b"".join(again.parts) == want.data and again.id == want.id

    big = Arena(8 << 20)  # past DIRECT_MIN, so the write takes the O_DIRECT path
    w = packs.PackWriter("ns", big)
    many = [os.urandom(65536) for _ in range(40)]
    w.add(digest_all(many), np.zeros(40, np.uint8), many, np.full(40, 65536, dtype=np.uint32))
    sp = w.seal_parts()
    assert len(sp.parts) == 1 and sp.size > (1 << 20)
    be = LocalBackend(tmp_path)
    be.put_parts(Kind.PACKS, sp.id.format(), sp.parts)
    got = be.get(Kind.PACKS, sp.id.format())
    assert got == bytes(sp.parts[0])
    packs.verify_pack(got, sp.id.format())


@pytest.mark.parametrize("compressed_at", [None, 3])
def test_whole_page_parts_go_to_disk_with_o_direct_as_they_lie(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compressed_at: int | None
) -> None:
    """A borrowed pack (header page, raw blobs that are views of page-aligned staging,
    pack version 3) is written by O_DIRECT writev straight from those views, with no
    bounce copy, up to the first part that is not whole pages where it lies (a
    compressed blob); that part and the rest (the trailer) are bounced. The file holds
    the parts byte for byte and verifies under its name."""
    import mmap

    from storecore import packs
    from storecore.backend import LocalBackend
    from storecore.ids import digest_all

    if directio.in_memory(tmp_path):
        pytest.fail("tmp_path is on tmpfs here: O_DIRECT to disk cannot be tested")
    staging = mmap.mmap(-1, 64 * 65536)
    rng = np.random.default_rng(5)
    staging[:] = rng.bytes(len(staging))
    chunks: list[bytes | memoryview] = [
        memoryview(staging)[i : i + 65536] for i in range(0, len(staging), 65536)
    ]
    methods = np.zeros(len(chunks), np.uint8)
    if compressed_at is not None:
        # A blob that is not whole pages, as a compressed one is (stored raw here: its
        # method does not matter to the write).
        chunks[compressed_at] = b"abc" * 1000
    ids = digest_all(chunks)
    w = packs.PackWriter("job:t", borrow=True)
    w.add(ids, methods, chunks, np.array([len(c) for c in chunks]))
    sealed = w.seal_parts()
    direct: list[int] = []
    real = os.writev

    def writev(fd: int, views: list[memoryview]) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct.append(sum(len(v) for v in views))
        return real(fd, views)

    monkeypatch.setattr(directio.os, "writev", writev)
    b = LocalBackend(tmp_path)
    b.put_parts(Kind.PACKS, sealed.id.format(), sealed.parts)
    got = b.get(Kind.PACKS, sealed.id.format())
    assert got == b"".join(bytes(p) for p in sealed.parts)
    packs.verify_pack(got, sealed.id.format())
    whole = len(chunks) if compressed_at is None else compressed_at  # blobs before it
    assert sum(direct) == packs.HEADER_BYTES + whole * 65536


def test_a_directory_is_remote_only_on_a_shared_file_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`remote` (reads worth overlapping on threads: coordinator/store/nodepacks.py) comes
    from the file system's statfs type: a local disk or tmpfs is not remote; a type in
    NETWORK_FS is (shown by putting this directory's own type there: no NFS server)."""
    from storecore.backend import LocalBackend
    from storecore.s3 import S3Backend

    assert not directio.on_network(tmp_path) and not LocalBackend(tmp_path / "a").remote
    assert not directio.on_network("/dev/shm")
    assert not directio.on_network(tmp_path / "does-not-exist")
    here = directio.fs_type(tmp_path)
    assert here is not None and directio.fs_type(tmp_path / "does-not-exist") is None
    monkeypatch.setattr(directio, "NETWORK_FS", frozenset({here}))
    assert directio.on_network(tmp_path) and LocalBackend(tmp_path / "b").remote
    assert S3Backend.remote  # every S3 request crosses the network
