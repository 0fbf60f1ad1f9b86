"""`verify`: re-read and re-hash everything, report damage by generation and member;
`stats`: what the store holds (chunks, packs, bytes, dedup and compression ratios).

verify reads every committed manifest from the backend (not a cache), looks up every
chunk they reference, reads every pack once in full, checks the pack's hash against its
name, and decompresses and re-hashes every referenced chunk against its id. A chunk that
is missing, undecodable or different is attributed to every (generation, member) that
references it. Damaged packs that no manifest needs are reported too. verify excludes gc
(one lock), so a pack deleted by gc mid-read is never mistaken for damage. Chunks of a
generation at level `local` that are still in node caches (not drained yet,
docs/multilevel.md) are not the store's to hold: they are not reported missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from coordinator.store import manifest_io
from coordinator.store.catalog import State
from coordinator.store.index import BYTES_PER_ENTRY
from coordinator.store.manifest import Manifest
from coordinator.store.parts import MAINTENANCE
from cpcoord.errors import StoreError
from storecore import packs
from storecore.backend import Kind
from storecore.crypt import open_manifest
from storecore.ids import IdArray, ids_to_bytes, member_of
from storecore.names import pack_hex

if TYPE_CHECKING:
    from coordinator.store.parts import StoreParts


@dataclass(frozen=True)
class Damage:
    job: str
    generation: int
    member: str  # "*" when the manifest itself is unreadable
    chunks: int  # damaged or missing chunks this member references
    first_chunk: str  # hex id of one of them ("" for a manifest)
    why: str


@dataclass(frozen=True)
class VerifyReport:
    generations: int
    chunks: int  # distinct chunks checked
    packs: int  # packs read
    bytes_read: int
    damage: tuple[Damage, ...]
    damaged_packs: tuple[tuple[str, str], ...]  # (pack name, why), referenced or not

    @property
    def ok(self) -> bool:
        return not self.damage and not self.damaged_packs


def verify(repo: StoreParts) -> VerifyReport:
    with MAINTENANCE:
        return _verify(repo)


def _verify(repo: StoreParts) -> VerifyReport:
    damage: list[Damage] = []
    loaded: list[tuple[str, int, Manifest]] = []
    gens = repo.catalog.generations(state=State.COMMITTED)
    for g in gens:
        try:
            data = repo.backend.get(Kind.MANIFESTS, g.manifest or "")
            data = open_manifest(repo.config.sealer, g.manifest or "", data)
            loaded.append((g.job, g.number, manifest_io.decode(data, g.manifest or "")))
        except StoreError as e:
            damage.append(Damage(g.job, g.number, "*", 0, "", f"manifest: {e}"))

    bad: dict[str, dict[bytes, str]] = {}  # namespace -> id -> why
    wanted: dict[int, list[tuple[str, IdArray, np.ndarray]]] = {}
    checked = 0
    for ns in {m.namespace for _, _, m in loaded}:
        ids = np.unique(np.concatenate([m.chunk_ids() for _, _, m in loaded if m.namespace == ns]))
        checked += ids.size
        with repo.lock:
            found, locs = repo.index.chunks(ns).lookup(ids)
            # Level local: chunks still in node caches are not the store's to hold yet.
            lost = ids[~found]
            lost = lost[~member_of(lost, repo.cached.pending_in(ns))]
        bad[ns] = dict.fromkeys(ids_to_bytes(lost), "missing from the store")
        pk = locs["pack"][found]
        for no in np.unique(pk):
            sel = pk == no
            wanted.setdefault(int(no), []).append((ns, ids[found][sel], locs[found][sel]))

    damaged_packs = [(name, why) for name, why in repo.unreadable_packs.items()]
    with repo.lock:
        all_packs = repo.index.packs()
    nread = nbytes = 0
    for no, info in all_packs.items():
        try:
            data = repo.backend.get(Kind.PACKS, info.name)
        except StoreError as e:
            why = f"pack {info.name} unreadable: {e}"
            damaged_packs.append((info.name, why))
            for ns, ids, _ in wanted.get(no, []):
                bad[ns].update(dict.fromkeys(ids_to_bytes(ids), why))
            continue
        nread += 1
        nbytes += len(data)
        if packs.pack_id_of(data).format() != pack_hex(info.name):
            damaged_packs.append((info.name, "content hash does not match its name"))
        for ns, ids, locs in wanted.get(no, []):
            for cid, loc in zip(ids_to_bytes(ids), locs, strict=True):
                off, st = int(loc["offset"]), int(loc["stored"])
                try:
                    packs.decode_chunk(
                        int(loc["method"]),
                        data[off : off + st],
                        int(loc["raw"]),
                        cid,
                        info.name,
                        repo.config.sealer,
                        ns,
                    )
                except StoreError as e:
                    bad[ns][cid] = str(e)

    for job, number, m in loaded:
        sorted_bad = np.unique(np.frombuffer(b"".join(bad.get(m.namespace, {})), dtype="V32"))
        for mem in m.members:
            ids = m.chunk_ids(mem.name)
            hit = ids[member_of(ids, sorted_bad)]
            if hit.size:
                first = hit[0].tobytes()
                damage.append(
                    Damage(
                        job, number, mem.name, int(hit.size), first.hex(), bad[m.namespace][first]
                    )
                )
    return VerifyReport(len(gens), checked, nread, nbytes, tuple(damage), tuple(damaged_packs))


@dataclass(frozen=True)
class StoreStats:
    chunks: int
    packs: int
    pack_bytes: int  # bytes of all pack objects
    chunk_bytes: int  # plain bytes of the distinct stored chunks
    stored_chunk_bytes: int  # their bytes as stored (compressed or raw)
    generations: int  # committed
    logical_bytes: int  # sum over committed generations of pages * page size
    index_memory_bytes: int
    dedup_ratio: float | None  # logical / chunk bytes (zero pages count as deduplicated)
    compression_ratio: float | None  # chunk bytes / stored chunk bytes


def stats(repo: StoreParts) -> StoreStats:
    with repo.lock:
        chunks = raw = stored = 0
        for ci in repo.index.namespaces.values():
            _, locs = ci.all()
            chunks += locs.size
            raw += int(locs["raw"].sum(dtype=np.uint64))
            stored += int(locs["stored"].sum(dtype=np.uint64))
        all_packs = repo.index.packs()
    gens = repo.catalog.generations(state=State.COMMITTED)
    logical = sum(g.sizes.bytes_logical for g in gens)
    return StoreStats(
        chunks=chunks,
        packs=len(all_packs),
        pack_bytes=sum(p.size for p in all_packs.values()),
        chunk_bytes=raw,
        stored_chunk_bytes=stored,
        generations=len(gens),
        logical_bytes=logical,
        index_memory_bytes=chunks * BYTES_PER_ENTRY,
        dedup_ratio=logical / raw if raw else None,
        compression_ratio=raw / stored if stored else None,
    )
