"""The agent's packs on the direct data path (nodeagent/upload/direct.py): the member
uploads of one generation on a node share their packs, so a chunk two members hold is
put once, also after the first upload's packs are stored; every stream reports every
pack it may need."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nodeagent.upload.direct import DirectStore, PackBuilder
from storecore import packs
from storecore.backend import Kind, LocalBackend
from storecore.ids import digest_all


def test_identical_members_on_one_node_put_their_chunks_once(tmp_path: Path) -> None:
    store = DirectStore(LocalBackend(tmp_path), "n1", "id", "loc", "job", 16 << 20, None)
    rng = np.random.default_rng(1)
    chunks = [rng.bytes(65536) for _ in range(64)]
    ids = digest_all(chunks)
    a, b = PackBuilder(store, "j", 1), PackBuilder(store, "j", 1)
    a.add(ids, chunks)
    ra = a.finish()
    b.add(ids, chunks)  # after a's pack is stored: the sink alone has forgotten its ids
    rb = b.finish()
    assert [p.name for p in ra.packs.packs] == [p.name for p in rb.packs.packs]
    assert len(list(LocalBackend(tmp_path).list(Kind.PACKS))) == 1
    assert all(p.name.startswith("nodes/n1/") for p in rb.packs.packs)
    a.close()
    b.close()
    assert not store._gens  # released with its last user
    c = PackBuilder(store, "j", 2)
    assert not c.finish().packs.packs  # an empty last report still says "direct"
    c.close()


def test_a_whole_round_added_at_once_still_makes_packs_of_the_stores_size(
    tmp_path: Path,
) -> None:
    """A direct batch is a whole MissingChunks round (up to 64 MiB): its chunks go into
    packs in pieces, so packs keep about the store's size, not one pack per round."""
    pack = 1 << 20
    store = DirectStore(LocalBackend(tmp_path), "n1", "id", "loc", "job", pack, None)
    rng = np.random.default_rng(2)
    chunks = [rng.bytes(65536) for _ in range(160)]  # 10 MiB at once
    b = PackBuilder(store, "j", 1)
    b.add(digest_all(chunks), chunks)
    sizes = [p.size for p in b.finish().packs.packs]
    b.close()
    assert len(sizes) >= 5 and max(sizes) < 2 * pack + (64 << 10), sizes


def test_pieces_end_where_the_open_pack_fills_so_packs_overshoot_by_less_than_a_chunk(
    tmp_path: Path,
) -> None:
    """GenerationPacks.add cuts a batch into pieces at the chunk that fills the open
    pack: every pack but the last holds at least the pack size of blobs and less than
    that plus its last chunk, whatever the pieces' limit (PIECE) is."""
    pack = 1 << 20
    store = DirectStore(LocalBackend(tmp_path), "n1", "id", "loc", "job", pack, None)
    rng = np.random.default_rng(4)
    sizes = (rng.integers(1, 65, size=300) * 4096).tolist()  # 4-256 KiB, ~38 MiB
    chunks = [rng.bytes(n) for n in sizes]
    b = PackBuilder(store, "j", 1)
    b.add(digest_all(chunks), chunks)
    names = [p.name for p in b.finish().packs.packs]
    b.close()
    backend = LocalBackend(tmp_path)
    blob_bytes = sorted((packs.read_contents(backend, n).blob_bytes for n in names), reverse=True)
    assert sum(blob_bytes) == sum(sizes)
    for got in blob_bytes[:-1]:  # the last holds what was left
        assert pack - packs.HEADER_BYTES <= got < pack + max(sizes), blob_bytes
