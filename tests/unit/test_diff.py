"""coordinator/diff.py on hand-built manifests: changed pages from the page tables."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.diff import changed_pages, diff
from coordinator.store import Manifest
from coordinator.store.manifest import MemberMap, PageTable, RegionMap
from cpcoord.errors import UnknownMember
from storecore.ids import ZERO_BYTES


def cid(n: int) -> bytes:
    return n.to_bytes(32, "little") if n else ZERO_BYTES


def table(*entries: tuple[int, int, int, int]) -> PageTable:
    """entries: (offset, count, chunk number (0 = ZERO), skip)."""
    if not entries:
        return PageTable.empty()
    o, c, i, s = zip(*entries, strict=True)
    return PageTable.of(o, c, [cid(x) for x in i], s)


def manifest(gen: int, members: dict[str, dict[str, PageTable]]) -> Manifest:
    mm = tuple(
        MemberMap(name, tuple(RegionMap(r, 0x1000, 0x1000 + 64 * 4096, t) for r, t in rs.items()))
        for name, rs in members.items()
    )
    return Manifest("job", gen, gen - 1 or None, 0, 4096, mm)


def test_same_table_has_no_changes() -> None:
    t = table((0, 10, 1, 0), (10, 4, 0, 0), (20, 2, 2, 0))
    assert changed_pages(t, t).size == 0


def test_changed_chunk_zeroed_pages_and_presence() -> None:
    a = table((0, 8, 1, 0), (8, 8, 0, 0), (30, 2, 3, 0))
    # pages 2-3 rewritten (chunk 2), 8-15 still zero, 16-17 new, 30-31 gone, 4-7 same chunk
    # but re-chunked with the same skip: unchanged.
    b = table((0, 2, 1, 0), (2, 2, 2, 0), (4, 4, 1, 4), (8, 8, 0, 0), (16, 2, 4, 0))
    got = changed_pages(a, b)
    assert got.tolist() == [2, 3, 16, 17, 30, 31]


def test_same_chunk_other_page_is_a_change() -> None:
    a = table((0, 4, 1, 0))
    b = table((0, 2, 1, 2), (2, 2, 1, 2))  # pages 0-1 now hold the chunk's pages 2-3
    assert changed_pages(a, b).tolist() == [0, 1]


def test_zero_to_data_and_back() -> None:
    a = table((0, 3, 0, 0))
    b = table((0, 1, 0, 0), (1, 1, 5, 0), (2, 1, 0, 0))
    assert changed_pages(a, b).tolist() == [1]
    assert changed_pages(b, a).tolist() == [1]


def test_diff_per_member_and_region_with_added_and_removed() -> None:
    a = manifest(
        1,
        {
            "m1": {"heap": table((0, 4, 1, 0)), "old": table((0, 2, 2, 0))},
            "m2": {"r": table((0, 3, 3, 0))},
        },
    )
    b = manifest(
        2,
        {
            "m1": {
                "heap": table((0, 1, 1, 0), (1, 1, 9, 0), (2, 2, 1, 2)),
                "new": table((5, 3, 0, 0)),
            },
            "m3": {"r": table((0, 1, 4, 0))},
        },
    )
    got = [(d.member, d.region, d.added, d.removed, d.runs.tolist(), d.pages) for d in diff(a, b)]
    assert got == [
        ("m1", "heap", False, False, [[1, 1]], 1),
        ("m1", "old", False, True, [[0, 2]], 2),
        ("m1", "new", True, False, [[5, 3]], 3),
        ("m2", "r", False, True, [[0, 3]], 3),
        ("m3", "r", True, False, [[0, 1]], 1),
    ]
    only = [(d.member, d.region) for d in diff(a, b, ["m2"])]
    assert only == [("m2", "r")]
    with pytest.raises(UnknownMember):
        list(diff(a, b, ["nobody"]))


def test_large_region_runs() -> None:
    n = 1 << 18  # 1 GiB of pages, one entry per 16 pages
    offs = np.arange(0, n, 16, dtype=np.uint64)
    ids_a = np.arange(1, offs.size + 1)
    ids_b = ids_a.copy()
    ids_b[100:110] += 10**6  # entries 100..109 rewritten: pages 1600..1759
    a = PageTable.of(offs, np.full(offs.size, 16), [cid(int(x)) for x in ids_a])
    b = PageTable.of(offs, np.full(offs.size, 16), [cid(int(x)) for x in ids_b])
    got = changed_pages(a, b)
    assert got.size == 160 and got[0] == 1600 and got[-1] == 1759
