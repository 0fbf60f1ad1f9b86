"""Partner copies held on this node (`cpcoord agent --partner-listen`): other nodes'
cached packs, so a generation survives the loss of the node that captured it (level
`partner`, docs/multilevel.md, "Partner copies").

Layout: DIR/partner/SENDER/ is a LocalBackend per sender (packs at
DIR/partner/SENDER/packs/nodes/SENDER/ID, put atomically and durably: temp file,
fsync, rename, fsync of the directory), beside the node's own cache in DIR. A pack is
checked in full before it is written (storecore verify_pack: its hash is its name, the
trailer parses, every chunk decodes to its id, sealed packs with the store key), so a
copy on disk is always a checked copy; only then does the holder report it. Partner
copies count against the cache's `--cache-size`.

Thread-safe (one lock for the sizes); pack I/O happens outside it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from cpcoord.errors import InvalidArgument, ObjectNotFound, PartnerFull
from storecore import packs
from storecore.backend import Buffer, Kind, LocalBackend, ObjectInfo
from storecore.crypt import Sealer
from storecore.names import node_of, node_prefix

SUBDIR = "partner"


class PartnerStore:
    """Copies of other nodes' packs, one LocalBackend per sender."""

    def __init__(self, cache_root: Path, used: Callable[[], int] = lambda: 0, size: int = 0):
        self.root = Path(cache_root) / SUBDIR
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.size = size  # the cache's bound (0: none but the file system)
        self._used = used  # bytes of the node's own cache
        self._lock = threading.Lock()
        self._backends: dict[str, LocalBackend] = {}
        self._sizes: dict[str, int] = {}
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for o in self.backend(d.name).list(Kind.PACKS):
                self._sizes[o.name] = o.size

    def backend(self, sender: str) -> LocalBackend:
        node_prefix(sender)  # a valid node name: no path tricks
        with self._lock:
            b = self._backends.get(sender)
            if b is None:
                b = self._backends[sender] = LocalBackend(self.root / sender)
            return b

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._sizes

    def lacks(self, sender: str, names: Sequence[str]) -> list[str]:
        for n in names:
            check_pack_name(sender, n)
        with self._lock:
            return [n for n in names if n not in self._sizes]

    def put(self, sender: str, name: str, data: Buffer, sealer: Sealer | None) -> None:
        """Check a pack in full, then write it durably; InvalidArgument or
        DataCorrupted for a bad pack, ResourceExhausted when it does not fit."""
        check_pack_name(sender, name)
        nbytes = memoryview(data).nbytes
        packs.verify_pack(data, name, sealer)
        used = self._used()  # before our lock: the cache's lock is never taken inside it
        with self._lock:
            if name in self._sizes:
                return
            if self.size and used + sum(self._sizes.values()) + nbytes > self.size:
                raise PartnerFull(name, nbytes)
            self._sizes[name] = nbytes
        try:
            self.backend(sender).put(Kind.PACKS, name, data)
        except BaseException:
            with self._lock:
                self._sizes.pop(name, None)
            raise

    def get(self, name: str) -> bytes:
        sender = node_of(name)
        if sender is None or not self.has(name):
            raise ObjectNotFound("packs", name)
        return self.backend(sender).get(Kind.PACKS, name)

    def delete(self, name: str) -> None:
        sender = node_of(name)
        with self._lock:
            if sender is None or self._sizes.pop(name, None) is None:
                return
        self.backend(sender).delete(Kind.PACKS, name)


def check_pack_name(sender: str, name: str) -> None:
    if not name.startswith(node_prefix(sender)) or node_of(name) != sender:
        raise InvalidArgument(f"pack {name!r} is not under node {sender}'s prefix")


class CacheView:
    """The node cache and the partner copies as one read-only backend for packread
    (a restore or a relay reads a chunk from whichever holds its pack)."""

    def __init__(self, own: LocalBackend, partner: PartnerStore | None) -> None:
        self.own, self.partner = own, partner

    def _pick(self, name: str) -> LocalBackend:
        if self.partner is not None and self.partner.has(name):
            sender = node_of(name)
            assert sender is not None
            return self.partner.backend(sender)
        return self.own

    @property
    def location(self) -> str:
        return self.own.location

    @property
    def source(self) -> str:
        return self.own.source

    @property
    def remote(self) -> bool:
        return self.own.remote  # the partner copies are under the same cache root

    def get(self, kind: Kind, name: str) -> bytes:
        return self._pick(name).get(kind, name)

    def get_range(self, kind: Kind, name: str, offset: int, length: int) -> bytes:
        return self._pick(name).get_range(kind, name, offset, length)

    def mapped(self, kind: Kind, name: str) -> AbstractContextManager[memoryview]:
        return self._pick(name).mapped(kind, name)

    def stat(self, kind: Kind, name: str) -> ObjectInfo:
        return self._pick(name).stat(kind, name)

    def exists(self, kind: Kind, name: str) -> bool:
        return self._pick(name).exists(kind, name)

    def list(self, kind: Kind) -> Iterator[ObjectInfo]:
        return self.own.list(kind)

    def put(self, kind: Kind, name: str, data: Buffer) -> None:
        raise InvalidArgument("the node cache's read view takes no puts")

    def delete(self, kind: Kind, name: str) -> None:
        raise InvalidArgument("the node cache's read view deletes nothing")

    def discard_incomplete(self) -> int:
        return 0

    def close(self) -> None:
        pass
