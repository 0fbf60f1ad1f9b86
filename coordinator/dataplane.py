"""The coordinator's side of the data plane: what it announces about its store to agents
(Welcome) and what it counts about the bytes that moved.

Announcement: the store's location (a directory as an absolute path, or s3://BUCKET/PREFIX
without endpoint or credentials: each agent takes those from its own environment), its
id (an agent writes nothing to a store with another id), the dedup rule, the size at
which agents seal their packs (DIRECT_PACK_BYTES, the same format as the store's),
whether packs are sealed and, on an mTLS stream only, the data key itself (otherwise
the agent reads it from its own key file). With `Options.direct_data_path` off nothing
is announced and every agent uses the coordinator path.

Counts (`DataPlaneStats`, exported by the metrics collector): committed bytes by data
path and node, bytes that passed through the coordinator, chunks the coordinator read
back and checked across nodes (and how many failed); and for restore reads
(DownloadPages) the bytes by read path and node: chunk bytes the coordinator sent, or
the stored bytes of the chunks it located for an agent to read from the store itself.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from storecore.backend import LocalBackend

# Agents seal their packs at this size (or the store's, if larger). Each reported pack
# costs the coordinator a check (trailer, sampled chunks) and an index insert, and the
# agent an fsync and a directory fsync (or an S3 upload): 16 packs per GiB instead of
# the store's 64. The price is agent memory: up to 4 packs in building or in transit.
DIRECT_PACK_BYTES = 64 << 20

if TYPE_CHECKING:
    from coordinator.store import Repository
    from coordinator.uploads import MemberUpload


def announcement(repo: Repository, send_key: bool) -> dict[str, object]:
    """The Welcome fields that announce the store (empty strings: not offered)."""
    b = repo.backend
    where = os.path.realpath(b.root) if isinstance(b, LocalBackend) else b.location
    sealer = repo.config.sealer
    out: dict[str, object] = {
        "store_location": where,
        "store_id": str(repo.identity["id"]),
        "store_dedup": repo.config.dedup,
        "store_pack_bytes": max(repo.config.pack_size, DIRECT_PACK_BYTES),
        "store_encrypted": sealer is not None,
    }
    if sealer is not None and send_key:
        out["store_key"] = sealer.master
    return out


@dataclass
class DataPlaneStats:
    """Counters since the coordinator started (thread-safe)."""

    committed_bytes: dict[tuple[str, str], int] = field(default_factory=dict)  # (path, node)
    coordinator_bytes: int = 0  # page bytes received on UploadPages streams (committed)
    read_bytes: dict[tuple[str, str], int] = field(default_factory=dict)  # (path, node)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, uploads: Iterable[MemberUpload]) -> None:
        """A generation committed with these member uploads."""
        with self._lock:
            for u in uploads:
                key = (u.data_path, u.node)
                self.committed_bytes[key] = self.committed_bytes.get(key, 0) + u.bytes_stored_new
                self.coordinator_bytes += u.bytes_received

    def record_read(self, node: str, sent: int, located: int) -> None:
        """A restore download of a member captured on `node`: chunk bytes sent through
        the coordinator, stored bytes located for the agent's own read."""
        with self._lock:
            for path, n in (("coordinator", sent), ("direct", located)):
                if n:
                    self.read_bytes[(path, node)] = self.read_bytes.get((path, node), 0) + n

    def snapshot(self) -> tuple[dict[tuple[str, str], int], int]:
        with self._lock:
            return dict(self.committed_bytes), self.coordinator_bytes

    def read_snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self.read_bytes)
