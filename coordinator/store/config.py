"""Store settings (StoreConfig), the store's identity file, and dedup namespaces.

Dedup namespaces: every chunk lives in one namespace; `missing()` answers and commits
resolve only within the generation's namespace, and a pack holds chunks of one
namespace only. With `dedup="job"` (the default) each job has its own namespace
(`job:NAME`): a tenant cannot learn, by asking which ids are missing, whether another job
holds a page. With `dedup="store"` every job shares the namespace `shared` and identical
pages dedup across jobs. Chunk ids stay plain BLAKE3 in both cases (the agent computes
them without any key); the namespace is recorded in each manifest, so changing the
setting only affects new generations and never breaks old ones. Per-job packs are also
the unit a per-job encryption key would cover.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Literal

from cpcoord.errors import InvalidArgument, ObjectNotFound, StoreInvalid
from storecore.backend import Backend, Kind
from storecore.crypt import Sealer
from storecore.identity import CONFIG_NAME, STORE_FORMAT

SHARED_NAMESPACE = "shared"

DedupScope = Literal["job", "store"]


@dataclass(frozen=True)
class StoreConfig:
    dedup: DedupScope = "job"
    pack_size: int = 16 << 20  # seal a pack when its blobs reach this size
    compression_level: int = 1  # zstd level: 1 favours ingest speed; 3+ packs tighter
    threads: int = 0  # zstd threads per ingest batch; 0 = min(4, cpus)
    repack_threshold: float = 0.25  # gc rewrites a pack when this share of it is dead
    # Encryption at rest (crypt.py): None = plaintext packs and manifests.
    sealer: Sealer | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.dedup not in ("job", "store"):
            raise InvalidArgument(f"dedup scope must be 'job' or 'store', not {self.dedup!r}")
        if not 1 << 16 <= self.pack_size <= 1 << 30:
            raise InvalidArgument(f"pack size {self.pack_size} is outside 64 KiB..1 GiB")
        if not -7 <= self.compression_level <= 22:
            raise InvalidArgument(f"zstd level {self.compression_level} is outside -7..22")
        if not 0 <= self.threads <= 64:
            raise InvalidArgument(f"threads {self.threads} is outside 0..64")
        if not 0.0 < self.repack_threshold <= 1.0:
            raise InvalidArgument(f"repack threshold {self.repack_threshold} is outside (0, 1]")

    def namespace(self, job: str) -> str:
        return SHARED_NAMESPACE if self.dedup == "store" else f"job:{job}"


def load_or_init_identity(backend: Backend) -> tuple[dict[str, object], bool]:
    """Read the store's identity file, creating it for a new store (and giving a store
    of an older version without an id one); refuse other formats. Returns it and
    whether it was created just now (the store had none: it is new to us)."""
    try:
        raw = backend.get(Kind.CONFIG, CONFIG_NAME)
    except ObjectNotFound:
        ident: dict[str, object] = {
            "format": STORE_FORMAT,
            "id": secrets.token_hex(16),
            "created": time.time(),
        }
        backend.put(Kind.CONFIG, CONFIG_NAME, json.dumps(ident).encode())
        return ident, True
    try:
        ident = json.loads(raw)
        fmt = ident["format"]
    except (ValueError, KeyError, TypeError) as e:
        raise StoreInvalid(backend.location, f"unreadable {CONFIG_NAME}: {e}") from None
    if fmt != STORE_FORMAT:
        raise StoreInvalid(
            backend.location, f"store format {fmt}, this version reads {STORE_FORMAT}"
        )
    if not isinstance(ident.get("id"), str) or not ident["id"]:
        ident = {**ident, "id": secrets.token_hex(16)}
        backend.put(Kind.CONFIG, CONFIG_NAME, json.dumps(ident).encode())
    return dict(ident), False
