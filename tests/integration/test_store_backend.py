"""The shared Backend suite: every backend must pass it (the error contract in
storecore/backend.py). Add a backend by adding a param to the `backend` fixture;
the S3 one is a real SeaweedFS server. Tests of the local backend alone:
tests/unit/test_store_backend.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cpcoord.errors import DataCorrupted, InvalidArgument, ObjectNotFound
from storecore.backend import Backend, Kind, LocalBackend

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        b: Backend = LocalBackend(tmp_path / "store")
    elif request.param == "s3":  # a real SeaweedFS server (tests/helpers/seaweed.py)
        b = request.getfixturevalue("seaweed").backend()
    else:  # pragma: no cover - other backends join here
        raise AssertionError(request.param)
    yield b
    b.close()


PACK = "ab" + "0" * 62


def test_put_get_roundtrip_and_overwrite(backend: Backend) -> None:
    backend.put(Kind.PACKS, PACK, b"hello")
    assert backend.get(Kind.PACKS, PACK) == b"hello"
    backend.put(Kind.PACKS, PACK, memoryview(b"replaced!"))
    assert backend.get(Kind.PACKS, PACK) == b"replaced!"
    assert backend.stat(Kind.PACKS, PACK).size == 9


def test_kinds_are_separate_namespaces(backend: Backend) -> None:
    backend.put(Kind.INDEX, "x", b"1")
    backend.put(Kind.MANIFESTS, "x", b"22")
    assert backend.get(Kind.INDEX, "x") == b"1"
    assert backend.get(Kind.MANIFESTS, "x") == b"22"
    assert not backend.exists(Kind.LOCKS, "x")


def test_absent_objects(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound):
        backend.get(Kind.MANIFESTS, "nope")
    with pytest.raises(ObjectNotFound):
        backend.get_range(Kind.PACKS, PACK, 0, 1)
    with pytest.raises(ObjectNotFound):
        backend.stat(Kind.INDEX, "nope")
    assert not backend.exists(Kind.INDEX, "nope")
    backend.delete(Kind.INDEX, "nope")  # idempotent


def test_get_range(backend: Backend) -> None:
    data = bytes(range(256)) * 64
    backend.put(Kind.PACKS, PACK, data)
    assert backend.get_range(Kind.PACKS, PACK, 0, 10) == data[:10]
    assert backend.get_range(Kind.PACKS, PACK, 1000, 3000) == data[1000:4000]
    assert backend.get_range(Kind.PACKS, PACK, len(data) - 1, 1) == data[-1:]
    assert backend.get_range(Kind.PACKS, PACK, 5, 0) == b""
    with pytest.raises(DataCorrupted):
        backend.get_range(Kind.PACKS, PACK, len(data) - 5, 10)


def test_list_names_and_sizes(backend: Backend) -> None:
    backend.put(Kind.MANIFESTS, "job-a/0000000001", b"a")
    backend.put(Kind.MANIFESTS, "job-b/0000000002", b"bb")
    backend.put(Kind.PACKS, PACK, b"ccc")
    backend.put(Kind.PACKS, "cd" + "1" * 62, b"dddd")
    got = {(o.name, o.size) for o in backend.list(Kind.MANIFESTS)}
    assert got == {("job-a/0000000001", 1), ("job-b/0000000002", 2)}
    assert {o.name for o in backend.list(Kind.PACKS)} == {PACK, "cd" + "1" * 62}
    assert list(backend.list(Kind.LOCKS)) == []


def test_delete(backend: Backend) -> None:
    backend.put(Kind.INDEX, "i1", b"x")
    backend.delete(Kind.INDEX, "i1")
    assert not backend.exists(Kind.INDEX, "i1")
    assert list(backend.list(Kind.INDEX)) == []


@pytest.mark.parametrize(
    "name", ["", "../x", "a/../b", ".hidden", "a//b", "/abs", "a/", "sp ace", "x" * 256, "a\0b"]
)
def test_bad_names_are_refused(backend: Backend, name: str) -> None:
    with pytest.raises(InvalidArgument):
        backend.put(Kind.MANIFESTS, name, b"x")
    with pytest.raises(InvalidArgument):
        backend.get(Kind.MANIFESTS, name)


def test_large_object(backend: Backend) -> None:
    data = os.urandom(5 << 20)
    backend.put(Kind.PACKS, PACK, data)
    assert backend.get(Kind.PACKS, PACK) == data
    assert backend.get_range(Kind.PACKS, PACK, 4 << 20, 1 << 20) == data[4 << 20 :]


def test_discard_incomplete_keeps_complete_objects(backend: Backend) -> None:
    backend.put(Kind.INDEX, "i1", b"x")
    backend.discard_incomplete()
    assert backend.get(Kind.INDEX, "i1") == b"x"


# -- LocalBackend specifics ------------------------------------------------------------
