"""The coordinator's page store, modeled on restic and borg (docs/store.md).

Layers, each a small module behind a narrow interface:
  ids        chunk ids (BLAKE3-256 of plain content), pack ids, the ZERO marker
  backend    named immutable objects by kind (Backend protocol, LocalBackend)
  packs      append-only packs of zstd-compressed chunks with a trailer index
  index      chunk id -> pack location, per dedup namespace, 49 bytes per chunk
  manifest   a generation's complete map (model); manifest_io: its framed-protobuf file
  catalog    jobs, members, generations in SQLite (catalog_rows: schema, row values)
  inflight   generations in flight and what they protect from gc
  repository the facade the coordinator uses; gc and verify hold the rest
"""

from coordinator.store.catalog import GenerationInfo, Sizes, State
from coordinator.store.config import StoreConfig
from coordinator.store.gc import GcReport
from coordinator.store.ingest import AddResult
from coordinator.store.manifest import Manifest, MemberMap, PageTable, RegionMap, overlay
from coordinator.store.repository import PageRun, Repository
from coordinator.store.verify import Damage, StoreStats, VerifyReport
from storecore.backend import Backend, Kind, LocalBackend, ObjectInfo
from storecore.ids import ZERO, ChunkId, PackId, chunk_ids_of

__all__ = [
    "ZERO",
    "AddResult",
    "Backend",
    "ChunkId",
    "Damage",
    "GcReport",
    "GenerationInfo",
    "Kind",
    "LocalBackend",
    "Manifest",
    "MemberMap",
    "ObjectInfo",
    "PackId",
    "PageRun",
    "PageTable",
    "RegionMap",
    "Repository",
    "Sizes",
    "State",
    "StoreConfig",
    "StoreStats",
    "VerifyReport",
    "chunk_ids_of",
    "overlay",
]
