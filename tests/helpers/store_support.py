"""Helpers shared by the store tests: upload memory images the way an agent does."""

from __future__ import annotations

import time

import numpy as np

from coordinator.store import Manifest, MemberMap, PageTable, RegionMap, Repository
from storecore.ids import chunk_ids_of, member_of

PS = 4096
Image = dict[str, dict[str, bytes]]  # member -> region -> bytes (multiple of PS)


def region_start(i: int) -> int:
    return 0x7F0000000000 + i * 0x100000000


def upload(
    repo: Repository, job: str, image: Image, *, chunk_pages: int = 4, generation: int | None = None
) -> Manifest:
    """Begin (unless `generation` is given), upload like an agent (ZERO for all-zero
    chunks, only missing ids sent) and return the complete manifest, not committed."""
    g = repo.begin(job) if generation is None else generation
    parent = repo.catalog.get(job, g).parent
    members = []
    for mname, regions in image.items():
        rmaps = []
        for i, (rname, data) in enumerate(regions.items()):
            assert len(data) % PS == 0
            ids, chunks = chunk_ids_of(data, chunk_pages * PS)
            todo = repo.missing(job, g, ids)
            sel = np.flatnonzero(member_of(ids, todo))
            if sel.size:
                repo.add_chunks(job, g, ids[sel], [chunks[int(k)] for k in sel])
            counts = np.array([len(c) // PS for c in chunks], dtype=np.uint32)
            offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.uint64)
            start = region_start(i)
            rmaps.append(
                RegionMap(rname, start, start + len(data), PageTable.of(offsets, counts, ids))
            )
        members.append(MemberMap(mname, tuple(rmaps)))
    return Manifest(job, g, parent, time.time_ns(), PS, tuple(members))


def checkpoint(repo: Repository, job: str, image: Image, **kw: int) -> int:
    m = upload(repo, job, image, **kw)
    return repo.commit(m).number


def assert_restores(repo: Repository, job: str, generation: int, image: Image) -> None:
    for mname, regions in image.items():
        for rname, data in regions.items():
            got = repo.read_region(job, generation, mname, rname)
            assert got == data, f"{job} gen {generation} {mname}/{rname} differs"


def rand(pages: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(pages * PS)
