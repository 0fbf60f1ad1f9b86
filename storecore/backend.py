"""Where the store's objects live: the Backend protocol and the local-directory backend.

A backend holds named, immutable objects grouped by kind (packs, index, manifests,
locks, config). It knows nothing of their contents. The protocol is shaped so that an S3
bucket fits it as well as a directory: whole-object `put`, ranged `get`, flat `list`, no
rename, no append, no directories visible to callers.

Error contract (every backend):
  put(kind, name, data)   Atomic and durable on return: a reader sees the old object, or
                          no object, or all of `data`, never a part. Replaces an existing
                          object of that name. I/O failure -> StoreError (nothing visible).
                          `data` is only read during the call: the caller may reuse its
                          buffer once put returns (pack arenas do).
  get(kind, name)         The whole object. Absent -> ObjectNotFound.
  get_range(k, n, off, l) Exactly `l` bytes at `off`. Absent -> ObjectNotFound; object
                          shorter than off+l -> DataCorrupted (a truncated object).
  stat(kind, name)        ObjectInfo. Absent -> ObjectNotFound.
  exists(kind, name)      bool; never raises for absence.
  list(kind)              Every complete object of that kind, in no particular order.
                          Leftovers of unfinished puts are never listed.
  delete(kind, name)      Idempotent (absent is fine). Need not be durable on return: after
                          a crash a deleted object may reappear whole, never partly.
  discard_incomplete()    Remove traces of puts that never finished (temp files, aborted
                          multipart uploads); call only while no put is in flight.
  Names: one or more '/'-separated segments of [A-Za-z0-9._-], none starting with '.',
  at most 255 characters; anything else -> InvalidArgument (no traversal possible).
  Any other I/O failure -> StoreError naming the object and the cause.

LocalBackend: one directory; packs fan out into 256 subdirectories by the first two hex
digits, except packs named under a node's prefix (`nodes/NODE/ID`, names.py), which live
at that path. put writes a temp file (`.tmp-*`, owner-only 0600) in the target directory,
fsyncs it, renames it over the name, and fsyncs the directory; directories are 0700.
Its `remote` is True on a shared file system (NFS, CephFS, Lustre, ...: directio.py's
NETWORK_FS), as S3's always is. Its `gathers` is True when the directory is in memory
(tmpfs: a node cache): put_parts then writes the parts as they are (writev), so a writer
may hand it views of its own buffers rather than copy them first (storecore/writer.py,
borrowed blobs). Its optional `spares` hands put_parts a preallocated file to write a
pack over (a node cache on tmpfs: nodeagent/cache/spares.py); the file is cut to the
pack's size before its fsync.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from cpcoord.errors import DataCorrupted, InvalidArgument, ObjectNotFound, StoreError
from cpcoord.faults import fault_point
from storecore.directio import in_memory, on_network, write_parts
from storecore.names import NODES

Buffer = bytes | bytearray | memoryview

_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_TMP_PREFIX = ".tmp-"
# An agent's put may be in flight whenever gc runs: its leftovers go only once this old.
NODE_TEMP_GRACE = 3600.0


class Kind(StrEnum):
    PACKS = "packs"
    INDEX = "index"
    MANIFESTS = "manifests"
    LOCKS = "locks"
    CONFIG = "config"


@dataclass(frozen=True)
class ObjectInfo:
    kind: Kind
    name: str
    size: int


def check_name(name: str) -> str:
    """Validate an object name (see the module docstring); return it unchanged."""
    if not name or len(name) > 255 or not all(_SEGMENT.fullmatch(s) for s in name.split("/")):
        raise InvalidArgument(f"bad store object name {name!r}")
    return name


class Backend(Protocol):
    """Named immutable objects by kind; error contract in the module docstring."""

    @property
    def location(self) -> str: ...

    @property
    def source(self) -> str:
        """Where the objects are read from, exactly (a resolved directory, or an S3
        endpoint URL with bucket and prefix): the catalog is bound to it (binding.py)."""
        ...

    def put(self, kind: Kind, name: str, data: Buffer) -> None: ...

    def get(self, kind: Kind, name: str) -> bytes: ...

    def get_range(self, kind: Kind, name: str, offset: int, length: int) -> bytes: ...

    def stat(self, kind: Kind, name: str) -> ObjectInfo: ...

    def exists(self, kind: Kind, name: str) -> bool: ...

    def list(self, kind: Kind) -> Iterator[ObjectInfo]: ...

    def delete(self, kind: Kind, name: str) -> None: ...

    def discard_incomplete(self) -> int: ...

    def close(self) -> None: ...

    @property
    def remote(self) -> bool:
        """Whether a read waits on a network (S3, a shared file system): callers with
        several reads to make overlap them on threads; on a local disk the hand-offs
        cost more CPU than the overlap saves (coordinator/store/nodepacks.py)."""
        ...


class MappedBackend(Backend, Protocol):
    """A backend whose objects are files that can be mapped (a directory)."""

    def mapped(self, kind: Kind, name: str) -> AbstractContextManager[memoryview]:
        """The object's bytes, mapped read-only from its file (no copy: page-aligned, so
        O_DIRECT can write them straight on: directio.py). Errors as `get`."""
        ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pread_all(fd: int, offset: int, length: int, what: str) -> bytes:
    """Exactly `length` bytes at `offset` (short reads continued); DataCorrupted if the
    object ends first."""
    parts: list[bytes] = []
    got = 0
    while got < length:
        b = os.pread(fd, length - got, offset + got)
        if not b:
            raise DataCorrupted("object", what, f"ends before {offset + length} bytes")
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def _why(e: OSError) -> str:
    return e.strerror or errno.errorcode.get(e.errno or 0, str(e))


class SpareFiles(Protocol):
    def take(self, dst: Path) -> bool:
        """Rename a preallocated file to `dst`; False when there is none."""
        ...


class LocalBackend:
    """A directory on a local file system (see the module docstring)."""

    def __init__(self, root: Path | str, *, create: bool = True) -> None:
        self.root = Path(root)
        try:
            if create:
                self._mkdirs(self.root)
            elif not self.root.is_dir():
                raise StoreError(f"{self.root} is not a store directory")
            # Owner-only, even if the directory was made by someone with a wider umask.
            os.chmod(self.root, 0o700)
        except OSError as e:
            raise StoreError(f"cannot open {self.root}: {_why(e)}") from e
        self.gathers = in_memory(self.root)  # module docstring
        self.remote = on_network(self.root)
        self.spares: SpareFiles | None = None

    @property
    def location(self) -> str:
        return str(self.root)

    @property
    def source(self) -> str:
        return "file://" + os.path.realpath(self.root)

    def _path(self, kind: Kind, name: str) -> Path:
        kind = Kind(kind)
        check_name(name)
        if kind is Kind.PACKS and "/" not in name:
            return self.root / kind.value / name[:2] / name
        return self.root / kind.value / name

    def _mkdirs(self, path: Path) -> None:
        """Create path and missing parents (0700), fsyncing each parent of a new one."""
        if path.is_dir():
            return
        self._mkdirs(path.parent)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return
        _fsync_dir(path.parent)

    def put(self, kind: Kind, name: str, data: Buffer) -> None:
        self.put_parts(kind, name, [data])

    def put_parts(self, kind: Kind, name: str, parts: Sequence[Buffer]) -> None:
        """`put` of the parts back to back, without joining them first (packs)."""
        path = self._path(kind, name)
        tmp = path.parent / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        try:
            self._mkdirs(path.parent)
            spare = kind is Kind.PACKS and self.spares is not None and self.spares.take(tmp)
            flags = os.O_WRONLY | os.O_CLOEXEC | (0 if spare else os.O_CREAT | os.O_EXCL)
            fd = os.open(tmp, flags, 0o600)
            try:
                write_parts(fd, parts, self.gathers)  # O_DIRECT for big objects on disk
                if spare:  # written over from its start: cut what the pack did not fill
                    os.ftruncate(fd, sum(memoryview(p).nbytes for p in parts))
                os.fsync(fd)
            finally:
                os.close(fd)
            fault_point("store.put")  # tests: a put killed before its rename
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"cannot write {kind}/{name}: {_why(e)}") from e

    def get(self, kind: Kind, name: str) -> bytes:
        path = self._path(kind, name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(kind, name) from None
        except OSError as e:
            raise StoreError(f"cannot read {kind}/{name}: {_why(e)}") from e

    @contextlib.contextmanager
    def mapped(self, kind: Kind, name: str) -> Iterator[memoryview]:
        """MappedBackend.mapped. The file may be deleted meanwhile: the mapping keeps
        its pages."""
        fd = self._open_read(kind, name)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) if size else None
        except OSError as e:
            raise StoreError(f"cannot read {kind}/{name}: {_why(e)}") from e
        finally:
            os.close(fd)
        if mm is None:
            yield memoryview(b"")
            return
        view = memoryview(mm)
        try:
            yield view
        finally:
            # Views of it may outlive the block (an error's traceback holds the frames
            # that made them): then the collector unmaps it, once they are gone.
            with contextlib.suppress(BufferError):
                view.release()
                mm.close()

    def get_range(self, kind: Kind, name: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidArgument(f"bad range {offset}+{length} of {kind}/{name}")
        fd = self._open_read(kind, name)
        try:
            return _pread_all(fd, offset, length, f"{kind}/{name}")
        except OSError as e:
            raise StoreError(f"cannot read {kind}/{name}: {_why(e)}") from e
        finally:
            os.close(fd)

    def get_tail(self, kind: Kind, name: str, length: int) -> tuple[int, bytes]:
        """(object size, its last `length` bytes or all of it): one open."""
        fd = self._open_read(kind, name)
        try:
            size = os.fstat(fd).st_size
            want = min(size, length)
            return size, _pread_all(fd, size - want, want, f"{kind}/{name}")
        except OSError as e:
            raise StoreError(f"cannot read {kind}/{name}: {_why(e)}") from e
        finally:
            os.close(fd)

    def _open_read(self, kind: Kind, name: str) -> int:
        """An fd of the object, for reading: ObjectNotFound, or StoreError naming why."""
        try:
            return os.open(self._path(kind, name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectNotFound(kind, name) from None
        except OSError as e:
            raise StoreError(f"cannot read {kind}/{name}: {_why(e)}") from e

    def stat(self, kind: Kind, name: str) -> ObjectInfo:
        try:
            st = self._path(kind, name).stat()
        except FileNotFoundError:
            raise ObjectNotFound(kind, name) from None
        except OSError as e:
            raise StoreError(f"cannot stat {kind}/{name}: {_why(e)}") from e
        return ObjectInfo(Kind(kind), name, st.st_size)

    def exists(self, kind: Kind, name: str) -> bool:
        return self._path(kind, name).is_file()

    def list(self, kind: Kind) -> Iterator[ObjectInfo]:
        kind = Kind(kind)
        base = self.root / kind.value
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fn in filenames:
                if fn.startswith("."):
                    continue
                p = Path(dirpath) / fn
                rel = p.relative_to(base).as_posix()
                if kind is Kind.PACKS and not rel.startswith(NODES + "/"):
                    rel = fn
                try:
                    size = p.stat().st_size
                except FileNotFoundError:  # deleted while listing
                    continue
                yield ObjectInfo(kind, rel, size)

    def delete(self, kind: Kind, name: str) -> None:
        try:
            self._path(kind, name).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"cannot delete {kind}/{name}: {_why(e)}") from e

    def discard_incomplete(self) -> int:
        """Temp files of unfinished puts. Under `packs/nodes/` (agents' puts, which the
        coordinator cannot see in flight) only those older than NODE_TEMP_GRACE."""
        n = 0
        nodes = self.root / Kind.PACKS.value / NODES
        old = time.time() - NODE_TEMP_GRACE
        for dirpath, _dirs, filenames in os.walk(self.root):
            agents = Path(dirpath).is_relative_to(nodes)
            for fn in filenames:
                if fn.startswith(_TMP_PREFIX):
                    p = Path(dirpath) / fn
                    try:
                        if agents and p.stat().st_mtime > old:
                            continue
                        p.unlink()
                        n += 1
                    except FileNotFoundError:
                        pass
        return n

    def close(self) -> None:
        pass
