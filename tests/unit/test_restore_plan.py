"""The restore write plan (nodeagent.restore.plan) against a simulated address space.

A plan is applied to a NumPy model of memory by copying each piece's local bytes (real
pointers into the contents' arrays and the zero source) to its remote place; the result
must be the cut in every region up to its write end, untouched elsewhere, and never a
write where none is needed (an absent page of a private mapping).
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cpcoord.ranges import PAGE_SIZE
from nodeagent.proc.procfs import Mapping
from nodeagent.proc.writer import ZERO_CHUNK, zero_source
from nodeagent.restore.apply import RegionContents
from nodeagent.restore.plan import build_plan

BASE = 0x7F0000000000
PAGES = 96


def mapping(first: int, count: int, perms: str) -> Mapping:
    return Mapping(
        BASE + first * PAGE_SIZE, BASE + (first + count) * PAGE_SIZE, perms, 0, "00:00", 0, ""
    )


@st.composite
def worlds(
    draw: st.DrawFn,
) -> tuple[list[Mapping], list[tuple[RegionContents, int]], np.ndarray, int]:
    # Mappings tile [0, PAGES) in pages, each with random perms (private/shared, r/w).
    cuts = sorted(set(draw(st.lists(st.integers(1, PAGES - 1), max_size=6))))
    bounds = [0, *cuts, PAGES]
    perms = draw(
        st.lists(
            st.sampled_from(["rw-p", "r--p", "rw-s", "---p"]),
            min_size=len(bounds) - 1,
            max_size=len(bounds) - 1,
        )
    )
    maps = [
        mapping(a, b - a, p) for (a, b), p in zip(itertools.pairwise(bounds), perms, strict=True)
    ]
    # Regions: disjoint page ranges, some pages with data, maybe a clipped end.
    edges = sorted(set(draw(st.lists(st.integers(0, PAGES), min_size=2, max_size=6))))
    regions = []
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    for a, b in zip(edges[::2], edges[1::2], strict=False):
        if b <= a:
            continue
        n = b - a
        pages = np.flatnonzero(rng.random(n) < draw(st.floats(0, 1))).astype(np.uint64)
        data = rng.integers(1, 255, size=(pages.size, PAGE_SIZE), dtype=np.uint8)
        c = RegionContents(f"r{a}", BASE + a * PAGE_SIZE, BASE + b * PAGE_SIZE, pages, data)
        clip = draw(st.integers(0, PAGE_SIZE - 1))
        regions.append((c, c.end - clip))
    present = np.flatnonzero(rng.random(PAGES) < 0.5).astype(np.uint64) + np.uint64(
        BASE // PAGE_SIZE
    )
    return maps, regions, present, int(rng.integers(0, 2**31))


def present_fn(present: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def fn(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        k = np.searchsorted(lo, present, side="right") - 1
        ok = (k >= 0) & (present < hi[np.maximum(k, 0)])
        return present[ok]

    return fn


@settings(max_examples=150, deadline=None)
@given(worlds())
def test_plan_writes_exactly_the_cut(world: tuple[Any, ...]) -> None:
    maps, regions, present, seed = world
    plan = build_plan(regions, maps, present_fn(present), "m")
    mem = np.random.default_rng(seed).integers(0, 255, size=PAGES * PAGE_SIZE, dtype=np.uint8)
    orig = mem.copy()
    written = np.zeros(mem.size, dtype=bool)
    for (ra, rl), (la, ll) in zip(plan.remote.tolist(), plan.local.tolist(), strict=True):
        assert rl == ll and rl > 0
        off = ra - BASE
        assert not written[off : off + rl].any(), "pieces overlap"
        mem[off : off + rl] = np.frombuffer(ctypes.string_at(la, ll), np.uint8)
        written[off : off + rl] = True
    assert np.all(np.diff(plan.remote[:, 0].astype(np.int64)) > 0), "pieces not sorted"
    want = orig.copy()
    need = np.zeros(mem.size, dtype=bool)  # bytes that must be written
    page_present = np.zeros(PAGES, dtype=bool)
    page_present[(present - np.uint64(BASE // PAGE_SIZE)).astype(np.int64)] = True
    shared_page = np.zeros(PAGES, dtype=bool)
    for m in maps:
        shared_page[(m.start - BASE) // PAGE_SIZE : (m.end - BASE) // PAGE_SIZE] = m.shared
    for c, wend in regions:
        lo, hi = c.start - BASE, wend - BASE
        full = np.zeros((c.size // PAGE_SIZE, PAGE_SIZE), dtype=np.uint8)
        full[c.pages.astype(np.int64)] = c.data
        region = full.reshape(-1)[: hi - lo]
        first = lo // PAGE_SIZE
        pages = np.arange(first, (hi + PAGE_SIZE - 1) // PAGE_SIZE)
        has = np.zeros(pages.size, dtype=bool)
        has[c.pages[c.pages < pages.size].astype(np.int64)] = True
        # Listed pages always; unlisted ones only in private mappings where a page is
        # present now (absent at the cut = zeros). Unlisted shared pages were never
        # captured: never written.
        must = has | (page_present[pages] & ~shared_page[pages])
        byte_must = np.repeat(must, PAGE_SIZE)[: hi - lo]
        want[lo:hi][byte_must] = region[byte_must]
        need[lo:hi] = byte_must
    assert np.array_equal(written, need), "wrote where not needed, or missed a byte"
    assert np.array_equal(mem, want)
    # Routing: pieces in mappings we may not write go through /proc/PID/mem.
    for (ra, _), forced in zip(plan.remote.tolist(), plan.forced.tolist(), strict=True):
        m = next(m for m in maps if m.start <= ra < m.end)
        assert forced == (not m.writable)
    zero = plan.local[:, 0] == np.uint64(zero_source())
    assert np.all(plan.remote[zero, 1] <= ZERO_CHUNK)
    assert plan.zero_bytes == int(plan.remote[zero, 1].sum())
    assert plan.total_bytes == int(need.sum())


def test_long_zero_runs_split_and_data_runs_stay_whole() -> None:
    n = (3 * ZERO_CHUNK) // PAGE_SIZE + 5
    maps = [mapping(0, n, "rw-p")]
    data = np.full((3, PAGE_SIZE), 7, dtype=np.uint8)
    c = RegionContents("z", BASE, BASE + n * PAGE_SIZE, np.array([0, 1, 2], dtype=np.uint64), data)
    every = np.arange(n, dtype=np.uint64) + np.uint64(BASE // PAGE_SIZE)  # all present now
    plan = build_plan([(c, c.end)], maps, present_fn(every))
    assert plan.remote[0].tolist() == [BASE, 3 * PAGE_SIZE]
    assert plan.local[0, 0] == data.ctypes.data
    assert plan.remote.shape[0] == 1 + 4  # 3 full zero chunks and the rest
    assert plan.zero_bytes == (n - 3) * PAGE_SIZE


def test_shared_pages_not_captured_are_never_written() -> None:
    """In a shared mapping a page the generation does not list was not captured (past
    the object's end, unreadable): whether present now or not, it is left alone; a
    listed zero page is written like any data page."""
    maps = [Mapping(BASE, BASE + 16 * PAGE_SIZE, "rw-s", 0, "00:01", 7, "/memfd:x (deleted)")]
    data = np.zeros((2, PAGE_SIZE), dtype=np.uint8)
    data[0] = 5
    c = RegionContents("s", BASE, BASE + 16 * PAGE_SIZE, np.array([2, 3], dtype=np.uint64), data)
    every = np.arange(16, dtype=np.uint64) + np.uint64(BASE // PAGE_SIZE)
    plan = build_plan([(c, c.end)], maps, present_fn(every))
    assert plan.remote.tolist() == [[BASE + 2 * PAGE_SIZE, 2 * PAGE_SIZE]]
    assert plan.zero_bytes == 0 and plan.total_bytes == 2 * PAGE_SIZE


def test_absent_private_pages_are_left_alone() -> None:
    maps = [mapping(0, 16, "rw-p")]
    c = RegionContents(
        "p",
        BASE,
        BASE + 16 * PAGE_SIZE,
        np.zeros(0, dtype=np.uint64),
        np.zeros((0, PAGE_SIZE), np.uint8),
    )
    present = np.array([3, 4, 9], dtype=np.uint64) + np.uint64(BASE // PAGE_SIZE)
    plan = build_plan([(c, c.end)], maps, present_fn(present))
    assert plan.remote.tolist() == [
        [BASE + 3 * PAGE_SIZE, 2 * PAGE_SIZE],
        [BASE + 9 * PAGE_SIZE, PAGE_SIZE],
    ]


def test_absent_file_pages_present_now_get_the_file_back() -> None:
    """A private file mapping's page absent at the cut read as the file: present now
    (copied on write since), it gets the file's bytes, not zeros; an anonymous one gets
    zeros; a listed page its data; absent pages nothing; an unreadable file zeros."""
    file_map = Mapping(BASE, BASE + 8 * PAGE_SIZE, "rw-p", 3 * PAGE_SIZE, "fd:01", 42, "/lib/x")
    anon = mapping(8, 8, "rw-p")
    data = np.full((1, PAGE_SIZE), 9, dtype=np.uint8)
    c = RegionContents("r", BASE, BASE + 16 * PAGE_SIZE, np.array([1], dtype=np.uint64), data)
    present = np.array([1, 2, 3, 5, 10], dtype=np.uint64) + np.uint64(BASE // PAGE_SIZE)
    asked: list[tuple[int, int, int]] = []

    def file_bytes(m: Mapping, addr: int, n: int) -> bytes | None:
        asked.append((m.inode, addr, n))
        file_off = m.offset + addr - m.start
        return b"".join(bytes([0xF0 + (file_off + i) // PAGE_SIZE]) * PAGE_SIZE
                        for i in range(0, n, PAGE_SIZE))  # fmt: skip

    plan = build_plan([(c, c.end)], [file_map, anon], present_fn(present), file_bytes=file_bytes)
    assert asked == [
        (42, BASE + 2 * PAGE_SIZE, 2 * PAGE_SIZE),
        (42, BASE + 5 * PAGE_SIZE, PAGE_SIZE),
    ]
    got = {}
    for (ra, rl), (la, _) in zip(plan.remote.tolist(), plan.local.tolist(), strict=True):
        for k in range(0, rl, PAGE_SIZE):
            got[(ra + k - BASE) // PAGE_SIZE] = ctypes.string_at(la + k, PAGE_SIZE)
    assert sorted(got) == [1, 2, 3, 5, 10]
    assert got[1] == bytes([9]) * PAGE_SIZE  # the cut's data
    for page in (2, 3, 5):  # the file's pages 3 + page
        assert got[page] == bytes([0xF0 + 3 + page]) * PAGE_SIZE, page
    assert got[10] == bytes(PAGE_SIZE)  # anonymous: zeros
    assert plan.zero_bytes == PAGE_SIZE
    # The file cannot be read: zeros, as before.
    plan = build_plan(
        [(c, c.end)], [file_map, anon], present_fn(present), file_bytes=lambda m, a, n: None
    )
    assert plan.zero_bytes == 4 * PAGE_SIZE


def _apply(plan: Any, mem: np.ndarray) -> np.ndarray:
    """Memory after the plan's writes, and which bytes they touched."""
    written = np.zeros(mem.size, dtype=bool)
    for (ra, rl), (la, ll) in zip(plan.remote.tolist(), plan.local.tolist(), strict=True):
        off = ra - BASE
        mem[off : off + rl] = np.frombuffer(ctypes.string_at(la, ll), np.uint8)
        written[off : off + rl] = True
    return written


@settings(max_examples=150, deadline=None)
@given(worlds(), st.integers(0, 2**32 - 1))
def test_a_scoped_plan_writes_the_scope_and_ends_as_the_full_one(
    world: tuple[Any, ...], seed2: int
) -> None:
    """A partial write (issue 15): memory that already holds the generation outside the
    scope ends, after writing only the scope's pages (the listed ones among them, as
    prefetched), exactly as after writing everything; nothing outside the scope is
    touched."""
    maps, regions, present, seed = world
    rng = np.random.default_rng(seed2)
    mem = np.random.default_rng(seed).integers(0, 255, size=PAGES * PAGE_SIZE, dtype=np.uint8)
    full = build_plan(regions, maps, present_fn(present), "m")
    want = mem.copy()
    need = _apply(full, want)
    scoped, in_scope = [], np.zeros(PAGES, dtype=bool)
    for c, wend in regions:
        n = c.size // PAGE_SIZE
        scope = np.flatnonzero(rng.random(n) < rng.random()).astype(np.uint64)
        keep = np.isin(c.pages, scope)
        part = RegionContents(c.name, c.start, c.end, c.pages[keep], c.data[keep], scope=scope)
        part.validate("m")
        scoped.append((part, wend))
        in_scope[(scope + np.uint64((c.start - BASE) // PAGE_SIZE)).astype(np.int64)] = True
    byte_scope = np.repeat(in_scope, PAGE_SIZE)
    # Memory now: the generation outside the scope, anything inside (written since).
    mem = want.copy()
    garble = need & byte_scope
    mem[garble] = rng.integers(0, 255, size=int(garble.sum()), dtype=np.uint8)
    plan = build_plan(scoped, maps, present_fn(present), "m")
    written = _apply(plan, mem)
    assert not (written & ~byte_scope).any(), "wrote outside the scope"
    assert np.array_equal(mem, want), "a scoped write did not end as the full one"
