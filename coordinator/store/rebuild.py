"""Rebuild the catalog from the store's objects (a lost catalog, a coordinator moved to
another machine, an S3 bucket opened with a fresh state directory).

What the store holds is enough: a manifest names its job, generation, parent, cut time,
page size, namespace and every member's pages, and the commit order (packs, index, then
manifest, then the catalog flip) means a manifest object exists only once its packs are
durable and every chunk it references was checked present. So each readable manifest
`JOB/NNNNNNNNNN` whose chunks are all in the index (loaded at open from index files and
pack trailers) is a complete generation and becomes a COMMITTED row again, with sizes
recomputed. A manifest that does not decode, names another generation than its file
name, or references chunks the store lacks is skipped and reported, never restored.

What cannot come back (the catalog alone knew it): aborted generations and their
reasons, pins, registered members, and the exact `bytes_new` (recomputed as the stored
bytes of chunks no earlier generation of the namespace referenced, in cut-time order).
Caveat: a manifest is written before the catalog flip, so a generation whose commit
died between the two (or whose catalog row retention had just deleted) comes back as
committed. It is complete and restorable, never partial; gc removes such manifests
while the catalog lives, so only a catalog lost in that window resurrects one.

Rows already in the catalog are left alone, so rebuilding twice changes nothing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np

from coordinator.store import manifest_io
from coordinator.store.catalog import GenerationInfo, Sizes, State
from coordinator.store.manifest import Manifest
from coordinator.store.parts import StoreParts
from coordinator.store.references import sizes_of
from cpcoord.errors import NoSuchGeneration, StoreError
from cpcoord.log import log_event
from storecore.backend import Kind
from storecore.crypt import open_manifest
from storecore.ids import ID_DTYPE, IdArray, member_of

log = logging.getLogger("cpcoord.store")
_NAME = re.compile(r"(?P<job>[^/]+)/(?P<number>[0-9]{10})")


@dataclass(frozen=True)
class RebuildReport:
    restored: tuple[tuple[str, int], ...] = ()  # (job, generation) rows added
    present: int = 0  # manifests whose row the catalog already had
    skipped: tuple[tuple[str, str], ...] = field(default=())  # (manifest name, why)


def _sizes(repo: StoreParts, m: Manifest, ids: IdArray, new_ids: IdArray) -> Sizes:
    _found, locs = repo.index.chunks(m.namespace).lookup(ids)
    new = member_of(ids, new_ids)
    return sizes_of(m, locs, int(locs["stored"][new].sum(dtype=np.uint64)))


def _row_exists(repo: StoreParts, job: str, n: int) -> bool:
    try:
        repo.catalog.get(job, n)
    except NoSuchGeneration:
        return False
    return True


def rebuild_catalog(repo: StoreParts) -> RebuildReport:
    """Add a COMMITTED catalog row for every complete manifest the catalog lacks."""
    skipped: list[tuple[str, str]] = []
    found: list[tuple[str, Manifest]] = []
    present = 0
    with repo.lock:
        for obj in sorted(repo.backend.list(Kind.MANIFESTS), key=lambda o: o.name):
            name = obj.name
            mt = _NAME.fullmatch(name)
            if mt is None:
                skipped.append((name, "not a manifest name (JOB/NNNNNNNNNN)"))
                continue
            job, number = mt["job"], int(mt["number"])
            if _row_exists(repo, job, number):
                present += 1
                continue
            try:
                raw = repo.backend.get(Kind.MANIFESTS, name)
                m = manifest_io.decode(open_manifest(repo.config.sealer, name, raw), name)
            except StoreError as e:  # DataCorrupted, ManifestInvalid, or gone meanwhile
                skipped.append((name, f"unreadable: {e}"))
                continue
            if (m.job, m.generation) != (job, number):
                skipped.append((name, f"holds generation {m.generation} of job {m.job}"))
                continue
            ids = m.chunk_ids()
            ok = repo.index.chunks(m.namespace).contains(ids)
            if not ok.all():
                why = f"{int((~ok).sum())} referenced chunk(s) missing from the store"
                skipped.append((name, why))
                continue
            found.append((name, m))
        # In cut-time order, so "new" means first referenced by this generation.
        found.sort(key=lambda nm: (nm[1].time_ns, nm[1].job, nm[1].generation))
        seen: dict[str, IdArray] = {}
        restored: list[tuple[str, int]] = []
        for name, m in found:
            ids = m.chunk_ids()
            before = seen.get(m.namespace, np.zeros(0, ID_DTYPE))
            new_ids = ids[~member_of(ids, before)]
            seen[m.namespace] = np.union1d(before, ids)
            t = m.time_ns / 1e9
            info = GenerationInfo(
                job=m.job, number=m.generation, parent=m.parent, state=State.COMMITTED,
                reason="", started=t, finished=t, manifest=name, namespace=m.namespace,
                pinned=False, sizes=_sizes(repo, m, ids, new_ids),
            )  # fmt: skip
            if repo.catalog.restore_committed(info):
                restored.append((m.job, m.generation))
    for name, why in skipped:
        log_event(log, logging.WARNING, "manifest not restored", manifest=name, why=why)
    report = RebuildReport(tuple(sorted(restored)), present, tuple(skipped))
    log_event(
        log, logging.INFO, "catalog rebuilt from manifests",
        restored=len(report.restored), present=present, skipped=len(skipped),
    )  # fmt: skip
    return report


def rebuild_if_new(repo: StoreParts) -> RebuildReport | None:
    """Rebuild when the catalog has no generation at all but the store has manifests
    (a new catalog on an existing store); None when there was nothing to do."""
    if repo.catalog.generations():
        return None
    if not any(True for _ in repo.backend.list(Kind.MANIFESTS)):
        return None
    return rebuild_catalog(repo)
