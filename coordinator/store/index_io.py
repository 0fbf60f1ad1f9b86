"""Index files of a repository: loaded at open, written for new packs, compacted by gc,
rebuilt from the packs' trailers on demand. They are a cache of what the packs say.

At open: every readable index file contributes the packs it lists that still exist with
the same size (a damaged file is skipped, with a warning); then every stored pack no
index file covered has its trailer read (crash leftovers, packs whose index file was
lost), and one new index file records those, so the next open is fast again. Packs
whose trailer cannot be read are remembered in `repo.unreadable_packs` (verify reports
them). `rebuild` ignores the index files altogether.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from coordinator.store.index import Index, decode_index, encode_index
from cpcoord.errors import InvalidArgument, StoreError
from cpcoord.log import log_event
from storecore import packs
from storecore.backend import Kind
from storecore.ids import digest
from storecore.names import node_of, pack_id

if TYPE_CHECKING:
    from coordinator.store.parts import StoreParts

log = logging.getLogger("cpcoord.store")


def load(repo: StoreParts, *, use_index_files: bool = True) -> None:
    stored = {p.name: p.size for p in repo.backend.list(Kind.PACKS)}
    for f in list(repo.backend.list(Kind.INDEX)) if use_index_files else []:
        try:
            rows = decode_index(repo.backend.get(Kind.INDEX, f.name), f.name)
        except StoreError as e:
            log_event(log, logging.WARNING, "ignoring damaged index file", file=f.name, why=e)
            continue
        # The coordinator's packs first: where a chunk is in several packs, the first
        # indexed serves it, and one of ours needs no verification (nodepacks.py).
        for name, size, contents in sorted(rows, key=lambda r: node_of(r[0]) is not None):
            if stored.get(name) == size:
                repo.index.add_pack(pack_id(name), size, contents, name)
    for name, size in sorted(stored.items(), key=lambda kv: node_of(kv[0]) is not None):
        try:
            pid = pack_id(name)
        except InvalidArgument:
            repo.unreadable_packs[name] = "name is not a pack id"
            continue
        if repo.index.pack_number(name) is not None:
            continue
        try:
            contents = packs.read_contents(repo.backend, name, size)
        except StoreError as e:
            repo.unreadable_packs[name] = str(e)
            log_event(log, logging.WARNING, "unreadable pack trailer", pack=name, why=e)
            continue
        repo.index.add_pack(pid, size, contents, name)
        no = repo.index.pack_number(name)
        assert no is not None
        repo.unindexed.append(no)
    if repo.unindexed:
        log_event(log, logging.INFO, "indexed packs from trailers", packs=len(repo.unindexed))
        persist_new(repo)


def persist_new(repo: StoreParts) -> None:
    """Write an index file covering the packs stored since the last one."""
    known = repo.index.packs()
    nos = [n for n in repo.unindexed if n in known]
    repo.unindexed = []
    if nos:
        data = encode_index(repo.index.pack_entries(nos))
        repo.backend.put(Kind.INDEX, digest(data).hex(), data)


def write_full(repo: StoreParts) -> tuple[str, int]:
    """Write one index file for every known pack and delete all others; returns (its
    name, how many files it replaced)."""
    old = [f.name for f in repo.backend.list(Kind.INDEX)]
    data = encode_index(repo.index.pack_entries(sorted(repo.index.packs())))
    name = digest(data).hex()
    repo.backend.put(Kind.INDEX, name, data)
    repo.step("gc:index")
    repo.unindexed = []
    for f in old:
        if f != name:
            repo.backend.delete(Kind.INDEX, f)
    return name, len([f for f in old if f != name])


def rebuild(repo: StoreParts) -> int:
    """Re-index from pack trailers only (caller holds the repository lock)."""
    repo.integrate(block=True)
    repo.index = Index()
    repo.unreadable_packs.clear()
    repo.unindexed = []
    load(repo, use_index_files=False)
    write_full(repo)
    return sum(len(ci) for ci in repo.index.namespaces.values())
