"""Pack arenas (storecore/arena.py): copies, bounds, reuse."""

from __future__ import annotations

import os

import numpy as np

from storecore.arena import Arena, ArenaPool
from storecore.backend import Kind, LocalBackend
from storecore.ids import digest_all
from storecore.packs import read_contents, verify_pack
from storecore.writer import PackSink


def test_take_copies_and_refuses_what_does_not_fit() -> None:
    a = Arena(8192)
    src = bytearray(b"a" * 5000)
    v = a.take(memoryview(src))
    assert v is not None
    src[:] = b"b" * 5000  # the copy does not follow its source
    assert bytes(v) == b"a" * 5000
    assert a.take(b"c" * 4000) is None  # 5000 + 4000 > 8192: the caller copies it
    assert a.pos == 5000


def test_pool_reuses_up_to_keep() -> None:
    p = ArenaPool(1 << 16, keep=2)
    got = [p.get() for _ in range(3)]
    assert p.created == 3
    for a in got:
        a.take(b"x")
        p.put(a)  # the third is closed: only `keep` are kept
    again = [p.get(), p.get()]
    assert all(a.pos == 0 and a in got for a in again)  # reset and reused
    assert p.get() not in got and p.created == 4
    p.close()


def test_sink_with_arenas_stores_exact_packs_while_the_source_changes(tmp_path) -> None:
    """A staging buffer reused right after `add` (the next batch): every stored pack
    still holds the bytes it was given, and arenas go back to the pool."""
    backend = LocalBackend(tmp_path)
    pool = ArenaPool((1 << 20) + (1 << 18), keep=4)
    sink = PackSink(backend, 1 << 20, "nodes/a/", pool)
    staging = np.zeros(1 << 18, dtype=np.uint8)
    want: dict[bytes, bytes] = {}
    for _ in range(12):
        staging[:] = np.frombuffer(os.urandom(staging.size), dtype=np.uint8)
        views = [staging[i : i + 65536].data for i in range(0, staging.size, 65536)]
        ids = digest_all(views)
        want.update({ids[i].tobytes(): bytes(views[i]) for i in range(len(views))})
        sink.add("ns", ids, np.zeros(len(views), np.uint8), views,
                 np.full(len(views), 65536, np.uint32))  # fmt: skip
    stored, err = sink.flush()
    assert err is None and len(stored) >= 3
    for sp in stored:
        data = backend.get(Kind.PACKS, sp.name)
        verify_pack(data, sp.name.rsplit("/", 1)[-1])
        c = read_contents(backend, sp.name)
        for e in c.entries:
            off, n = int(e["offset"]), int(e["stored"])
            assert data[off : off + n] == want[e["id"].tobytes()]
    sink.close()
    assert len(pool._free) >= 1 and pool.created <= 4


def _resident_pages(a: Arena) -> int:
    """Pages of the arena's mapping in memory (mincore), to see a prefault happened."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    n = (a.size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * n)()
    addr = ctypes.addressof(ctypes.c_char.from_buffer(a._mm))
    assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(a.size), vec) == 0
    return sum(v & 1 for v in vec)


def test_warm_holds_prefaulted_arenas_up_to_keep_and_get_reuses_them() -> None:
    p = ArenaPool(4 << 20, keep=3)
    p.warm(0)  # a member smaller than a pack: nothing made ahead
    assert p.created == 0
    p.warm(2)
    assert p.created == 2
    p.warm(10)  # never past keep, and what is free counts
    assert p.created == 3
    got = [p.get() for _ in range(3)]
    assert p.created == 3  # the warmed ones, no new mapping
    assert all(_resident_pages(a) == (4 << 20) // 4096 for a in got)  # every page in
    assert _resident_pages(Arena(4 << 20)) == 0  # an arena not warmed: no page in yet
    for a in got:
        p.put(a)
    p.close()
