"""Retention and garbage collection, safe alongside checkpoints in flight.

Steps of `collect(repo, keep)`:
  1. Retention: per job, keep the last `keep` COMMITTED generations, the pinned ones and
     the parents of generations in flight; delete the other rows (one transaction: they
     vanish for readers at once), then their manifests. ABORTED rows older than the
     oldest kept generation are pruned too.
  2. Load every kept manifest (outside the lock). An unreadable kept manifest stops gc
     before anything is swept: its chunks cannot be told from garbage.
  3. Under the repository lock: discard incomplete puts; delete orphan manifests (no
     COMMITTED row, not in flight: leftovers of a crash between manifest and catalog);
     mark live = ids of kept manifests + ids claimed by in-flight generations (see
     inflight.py); drop every other id from the index (from now on `missing()` reports
     them missing, so they are uploaded again if needed); plan: packs with no live
     chunk are deleted, packs whose dead share >= repack_threshold are repacked, and
     small packs (under a quarter of the pack size; every commit seals one) are merged
     once a namespace has SMALL_PACKS of them.
  4. Repack: copy the live blobs (verified: decompressed and re-hashed) of planned packs
     into new packs, put them, then swap index entries to the new packs under the lock.
     A pack with any damage is not repacked (verify reports it; nothing is lost by gc).
  5. Write one index file for all packs, delete the older index files, delete the packs.
A crash anywhere leaves extra objects only: unknown packs are re-indexed from their
trailers at open, orphan manifests and dead chunks go at the next gc.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from coordinator.store import index_io
from coordinator.store.catalog import State
from coordinator.store.index import PackInfo
from coordinator.store.parts import MAINTENANCE
from cpcoord.errors import DataCorrupted, InvalidArgument, StoreError
from cpcoord.log import log_event
from storecore import packs
from storecore.backend import Kind
from storecore.ids import IdArray, member_of
from storecore.names import pack_hex
from storecore.writer import StoredPack

if TYPE_CHECKING:
    from coordinator.store.parts import StoreParts

log = logging.getLogger("cpcoord.store.gc")
SMALL_PACKS = 8


@dataclass(frozen=True)
class GcReport:
    dropped: tuple[tuple[str, int], ...]  # generations removed by retention
    orphan_manifests: int  # manifests without a COMMITTED row (crash leftovers)
    chunks_dropped: int
    packs_deleted: int  # whole packs deleted (all dead, or repacked)
    packs_repacked: int
    packs_written: int
    bytes_freed: int  # pack bytes deleted minus pack bytes written
    index_files_replaced: int
    incomplete_discarded: int


def _manifest_key(name: str) -> tuple[str, int] | None:
    job, _, num = name.rpartition("/")
    return (job, int(num)) if job and num.isdigit() else None


def _retention(repo: StoreParts, keep: int) -> list[tuple[str, int, str]]:
    dropped: list[tuple[str, int, str]] = []
    with repo.lock:
        for job in repo.catalog.jobs():
            gens = repo.catalog.generations(job, State.COMMITTED)
            kept = {g.number for g in gens[-keep:]} | {g.number for g in gens if g.pinned}
            kept |= repo.inflight.protected_parents(job)
            drop = [g for g in gens if g.number not in kept]
            oldest = min(kept, default=None)
            old_aborted = [
                g.number
                for g in repo.catalog.generations(job, State.ABORTED)
                if oldest is not None and g.number < oldest
            ]
            if drop or old_aborted:
                nums = [g.number for g in drop] + old_aborted
                forget = functools.partial(_forget_cached, repo, job, nums)
                repo.catalog.delete(job, nums, forget)
            dropped += [(job, g.number, g.manifest or "") for g in drop]
    for _, _, name in dropped:
        repo.forget_manifest(name)
        if name:
            repo.backend.delete(Kind.MANIFESTS, name)
    return dropped


def _forget_cached(repo: StoreParts, job: str, nums: list[int], db: sqlite3.Connection) -> None:
    repo.cached.forget(db, job, nums)  # in the transaction that deletes the rows


def _references(repo: StoreParts, names: set[str], known: dict[str, tuple[str, IdArray]]) -> None:
    for name in names - known.keys():
        try:
            m = repo.load_manifest(name)
        except StoreError as e:
            raise DataCorrupted("manifest", name, f"gc stopped before sweeping: {e}") from e
        known[name] = (m.namespace, m.chunk_ids())


def collect(repo: StoreParts, keep: int) -> GcReport:
    if keep < 1:
        raise InvalidArgument(f"keep must be at least 1, not {keep}")
    with MAINTENANCE:
        return _collect(repo, keep)


def _collect(repo: StoreParts, keep: int) -> GcReport:
    dropped = _retention(repo, keep)
    repo.step("gc:retention")
    refs: dict[str, tuple[str, IdArray]] = {}
    _references(repo, repo.catalog.committed_manifests(), refs)

    with repo.lock:
        repo.integrate(block=True)  # no put in flight while incomplete ones are discarded
        incomplete = repo.backend.discard_incomplete()
        repo.recent_puts.clear()
        committed = repo.catalog.committed_manifests()
        _references(repo, committed, refs)  # generations committed meanwhile
        orphans = 0
        for obj in list(repo.backend.list(Kind.MANIFESTS)):
            key = _manifest_key(obj.name)
            if obj.name in committed or (key and repo.inflight.is_in_flight(*key)):
                continue
            repo.backend.delete(Kind.MANIFESTS, obj.name)
            orphans += 1
        packs_now = repo.index.packs()
        live_bytes = np.zeros(max(packs_now, default=0) + 1, dtype=np.uint64)
        dropped_chunks = 0
        survivors: list[tuple[IdArray, np.ndarray]] = []
        for ns, ci in repo.index.namespaces.items():
            parts = [ids for n, (space, ids) in refs.items() if space == ns and n in committed]
            parts.append(repo.inflight.protected_ids(ns))
            live = np.unique(np.concatenate(parts))
            ids, locs = ci.all()
            alive = member_of(ids, live)
            dropped_chunks += ci.remove(ids[~alive])
            np.add.at(live_bytes, locs["pack"][alive], locs["stored"][alive].astype(np.uint64))
            survivors.append((ids[alive], locs[alive]))
        doomed = [n for n in packs_now if live_bytes[n] == 0]
        threshold = repo.config.repack_threshold
        to_repack = [
            n
            for n, p in packs_now.items()
            if live_bytes[n] and 1.0 - float(live_bytes[n]) / max(p.blob_bytes, 1) >= threshold
        ]
        to_repack += _small_packs(repo, packs_now, live_bytes, set(to_repack))
        repack_live: dict[int, tuple[IdArray, np.ndarray]] = {}
        want = np.zeros(live_bytes.size, dtype=bool)
        want[to_repack] = True
        for ids, locs in survivors:
            sel = np.flatnonzero(want[locs["pack"]])
            pk = locs["pack"][sel]
            order = sel[np.argsort(pk, kind="stable")]
            for part in np.split(order, np.flatnonzero(np.diff(locs["pack"][order])) + 1):
                if part.size:
                    repack_live[int(locs["pack"][part[0]])] = (ids[part], locs[part])
        del survivors

    repo.step("gc:marked")
    written, repacked = _repack(repo, to_repack, repack_live)
    repo.step("gc:repacked")
    freed = 0
    with repo.lock:
        # A pack stored since the mark may have the very bytes, hence the name, of a pack
        # planned for deletion (same chunks uploaded again in the same order; or a repack
        # output equal to a crashed gc's leftover): such a pack is live, keep it.
        repo.integrate(block=True)
        keep_names = repo.recent_puts | {s.id.hex() for s in written}
        # A pack the cached-pack ledger names may be needed by a generation at level
        # local whatever the index says (drained, its report not taken: re-indexed at
        # open): never swept while the ledger names it (docs/multilevel.md).
        keep_names |= repo.cached.names()
        gone = [n for n in doomed + repacked if repo.index.pack(n).name not in keep_names]
        infos = [repo.index.pack(n) for n in gone]
        freed = sum(p.size for p in infos) - sum(s.size for s in written)
        repo.index.remove_packs(gone)
        for s in written:
            repo.index.add_pack(s.id, s.size, s.contents)
        _, replaced = index_io.write_full(repo)
        for p in infos:
            repo.backend.delete(Kind.PACKS, p.name)
    report = GcReport(
        dropped=tuple((j, n) for j, n, _ in dropped),
        orphan_manifests=orphans,
        chunks_dropped=dropped_chunks,
        packs_deleted=len(infos),
        packs_repacked=len(repacked),
        packs_written=len(written),
        bytes_freed=freed,
        index_files_replaced=replaced,
        incomplete_discarded=incomplete,
    )
    log_event(
        log, logging.INFO, "gc done", **{k: v for k, v in report.__dict__.items() if k != "dropped"}
    )
    return report


def _small_packs(
    repo: StoreParts, packs_now: dict[int, PackInfo], live_bytes: np.ndarray, chosen: set[int]
) -> list[int]:
    """Live packs under a quarter of the pack size (each commit seals one), when a
    namespace has at least SMALL_PACKS of them: merged, so their number stays bounded."""
    by_ns: dict[str, list[int]] = {}
    for n, p in packs_now.items():
        if live_bytes[n] and n not in chosen and p.size < repo.config.pack_size // 4:
            by_ns.setdefault(p.namespace, []).append(n)
    return [n for group in by_ns.values() if len(group) >= SMALL_PACKS for n in group]


def _repack(
    repo: StoreParts, numbers: list[int], live: dict[int, tuple[IdArray, np.ndarray]]
) -> tuple[list[StoredPack], list[int]]:
    """Copy live blobs of the given packs into new packs; returns (new packs, packs whose
    live blobs were all copied). New packs are stored but not yet indexed."""
    written: list[StoredPack] = []
    done: list[int] = []
    writers: dict[str, packs.PackWriter] = {}

    def seal(w: packs.PackWriter) -> None:
        s = w.seal()
        with repo.lock:  # every put happens under the lock (discard_incomplete contract)
            repo.backend.put(Kind.PACKS, s.id.format(), s.data)
        written.append(StoredPack(s.id.digest, len(s.data), s.contents))  # drop the bytes

    for no in numbers:
        info = repo.index.pack(no)
        try:
            data = repo.backend.get(Kind.PACKS, info.name)
            if packs.pack_id_of(data).format() != pack_hex(info.name):
                raise DataCorrupted("pack", info.name, "content hash does not match its name")
            ids, locs = live[no]
            blobs = []
            for cid, loc in zip(ids, locs, strict=True):
                blob = data[int(loc["offset"]) : int(loc["offset"]) + int(loc["stored"])]
                packs.decode_chunk(
                    int(loc["method"]),
                    blob,
                    int(loc["raw"]),
                    cid.tobytes(),
                    info.name,
                    repo.config.sealer,
                    info.namespace,
                )
                blobs.append(blob)
        except StoreError as e:
            log_event(log, logging.WARNING, "not repacking a damaged pack", pack=info.name, why=e)
            continue
        w = writers.get(info.namespace)
        if w is None:
            w = writers[info.namespace] = packs.PackWriter(info.namespace)
        w.add(ids, locs["method"], blobs, locs["raw"])
        done.append(no)
        if w.size >= repo.config.pack_size:
            seal(writers.pop(info.namespace))
    for w in writers.values():
        seal(w)
    return written, done
