"""The commit's reference check: every chunk a manifest references is indexed and long
enough for every entry that reads it, and the generation's sizes for its catalog row.
Checked before the manifest is written, so a committed manifest never points at a
missing chunk or past a chunk's end.
"""

from __future__ import annotations

import numpy as np

from coordinator.store.catalog import Sizes
from coordinator.store.index import Index
from coordinator.store.manifest import Manifest
from cpcoord.errors import ChunkMissing, ManifestInvalid
from storecore.ids import IdArray, member_of, search_ids


def check_references(
    m: Manifest, index: Index, bytes_new: int, cached: IdArray | None = None
) -> Sizes:
    """Raise ChunkMissing or ManifestInvalid, else the sizes (`bytes_new`: what the
    generation stored itself). `cached`: sorted ids that may be absent from the store
    because they are in agents' node caches (a commit at level `local`: their extent is
    checked when they are drained, cached.py)."""
    ids = m.chunk_ids()
    found, locs = index.chunks(m.namespace).lookup(ids)
    ok = found if cached is None or not cached.size else found | member_of(ids, cached)
    if not ok.all():
        lost = ids[~ok]
        raise ChunkMissing(lost.size, m.generation, m.job, lost[0].tobytes().hex())
    ps = m.page_size
    for member, r in m.tables():
        t = r.pages
        nz = ~t.zero
        at = search_ids(ids, np.compress(nz, t.ids))
        have = found[at]
        raw = locs["raw"][at].astype(np.uint64)
        need = (t.skips[nz].astype(np.uint64) + t.counts[nz]) * np.uint64(ps)
        if np.any((need > raw) & have):
            raise ManifestInvalid(
                m.generation,
                m.job,
                f"member {member} region {r.name}: an entry reads past its chunk",
            )
    return sizes_of(m, locs[found], bytes_new)


def sizes_of(m: Manifest, locs: np.ndarray, bytes_new: int) -> Sizes:
    """A generation's catalog sizes: `locs` are the index locations of its chunk ids
    (every one found), `bytes_new` what it stored itself."""
    return Sizes(
        members=len(m.members),
        pages=m.page_count,
        zero_pages=m.zero_pages,
        bytes_logical=m.logical_bytes,
        bytes_stored=int(locs["stored"].sum(dtype=np.uint64)),
        bytes_new=bytes_new,
    )
