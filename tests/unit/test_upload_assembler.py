"""The coordinator's reading of an upload (coordinator/uploads.py), vectorised over the
whole member (coordinator/member_tables.py), equals the rule applied region by region
(docs/protocol.md, "How the coordinator reads an upload"): a region delivered whole is
its entries; an incremental one is its entries over the parent's region
(`manifest.overlay`), limited to the pages present at the cut. Bad uploads are refused
with the same reasons, naming the region."""

from __future__ import annotations

import itertools
import random
import re
from typing import Any

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator import member_tables
from coordinator.store.manifest import MemberMap, PageTable, RegionMap, overlay
from coordinator.uploads import UploadAssembler
from cpcoord.errors import InvalidArgument
from cpcoord.gen.v1 import common_pb2, types_pb2
from cpcoord.image import runs_of, stored_offsets
from storecore.ids import ID_DTYPE, ZERO_BYTES

PAGE = 4096
BASE = 0x7F0000000000


def _runs(pages: list[int]) -> list[types_pb2.PageRun]:
    arr = runs_of(np.asarray(sorted(pages), dtype=np.uint64))
    return [types_pb2.PageRun(offset=o, count=c) for o, c in arr.tolist()]


def _id(rng: random.Random, zero_share: float = 0.2) -> bytes:
    return ZERO_BYTES if rng.random() < zero_share else rng.randbytes(32)


def _table(rng: random.Random, pages: list[int]) -> PageTable:
    """Entries over sorted pages: runs cut at random, some zero, some chunk skips."""
    offs, counts, ids, skips = [], [], [], []
    i = 0
    while i < len(pages):
        n = 1
        while i + n < len(pages) and pages[i + n] == pages[i] + n and rng.random() < 0.5:
            n += 1
        cid = _id(rng)
        offs.append(pages[i])
        counts.append(n)
        ids.append(cid)
        skips.append(0 if cid == ZERO_BYTES else rng.randrange(3))
        i += n
    return PageTable.of(
        np.asarray(offs, dtype=np.uint64),
        np.asarray(counts, dtype=np.uint32),
        np.frombuffer(b"".join(ids), dtype=ID_DTYPE),
        np.asarray(skips, dtype=np.uint32),
    )


def _batch(region: int, t: PageTable) -> common_pb2.PageBatch:
    b = common_pb2.PageBatch(region=region)
    b.entries.page_offsets = t.offsets.astype("<u8").tobytes()
    b.entries.page_counts = t.counts.astype("<u4").tobytes()
    b.entries.chunk_skips = t.skips.astype("<u4").tobytes()
    b.entries.chunk_ids = t.ids.tobytes()
    return b


def _slice(t: PageTable, a: int, b: int) -> PageTable:
    return PageTable(t.offsets[a:b], t.counts[a:b], t.skips[a:b], t.ids[a:b])


class Case:
    """A random member upload: regions, what is present and delivered, the parent's
    tables, the batches in a stream order, and the tables the rule gives."""

    def __init__(self, seed: int, nregions: int, full: bool) -> None:
        rng = random.Random(seed)
        self.header = common_pb2.PagesHeader(
            job="j", generation=2, member="m", node="n", page_size=PAGE, full=full
        )
        self.expected: list[PageTable] = []
        parent: list[RegionMap] = []
        streams: list[list[common_pb2.PageBatch]] = []
        start = BASE
        for r in range(nregions):
            npages = rng.randint(1, 50)
            name, end = f"r{r}", start + npages * PAGE
            present = sorted(rng.sample(range(npages), rng.randint(0, npages)))
            whole = full or rng.random() < 0.3
            delivered = present if whole else sorted(p for p in present if rng.random() < 0.3)
            base = _table(rng, sorted(rng.sample(range(npages), rng.randint(0, npages))))
            if not whole or rng.random() < 0.5:
                parent.append(RegionMap(name, start, end, base))
            reg = self.header.regions.add(name=name, start=start, end=end)
            reg.pages.extend(_runs(delivered))
            if not (full and rng.random() < 0.5):  # full: an empty all_pages reads as pages
                reg.all_pages.extend(_runs(present))
            delta = _table(rng, delivered)
            cuts = sorted(rng.sample(range(1, len(delta)), min(2, max(0, len(delta) - 1))))
            edges = [0, *cuts, len(delta)]
            streams.append([_batch(r, _slice(delta, a, b)) for a, b in itertools.pairwise(edges)])
            if delivered == present:
                self.expected.append(delta)
            else:
                self.expected.append(overlay(base, delta, np.asarray(present, dtype=np.uint64)))
            start = end + rng.randint(0, 3) * PAGE
        self.parent = MemberMap("m", tuple(parent))
        # Batches of different regions interleave; each region's stay in order.
        self.batches: list[common_pb2.PageBatch] = []
        queues = [list(s) for s in streams if s]
        while queues:
            q = rng.choice(queues)
            self.batches.append(q.pop(0))
            if not q:
                queues.remove(q)

    def assemble(self, group: int) -> Any:
        asm = UploadAssembler(self.header, PAGE)
        for k in range(0, len(self.batches), group):
            asm.add_batches(self.batches[k : k + group])
        return asm.finish(self.parent)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 12), st.integers(1, 9), st.booleans())
def test_member_tables_equal_the_rule_region_by_region(
    seed: int, nregions: int, group: int, full: bool
) -> None:
    case = Case(seed, nregions, full)
    done = case.assemble(group)
    assert [r.name for r in done.regions] == [r.name for r in case.header.regions]
    for got, want in zip(done.regions, case.expected, strict=True):
        assert got.pages == want, got.name
    want_ids = [t.ids[~t.zero] for t in case.expected]
    assert (
        done.chunk_ids.tobytes()
        == np.unique(np.concatenate([*want_ids, np.zeros(0, ID_DTYPE)])).tobytes()
    )
    assert done.entries == sum(int(len(b.entries.page_offsets) // 8) for b in case.batches)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(2, 12))
def test_regions_overlaid_in_many_groups_give_the_same_tables(seed: int, nregions: int) -> None:
    """Groups bound the temporaries (and the shared page space): cut small, same result."""
    case = Case(seed, nregions, full=False)
    want = case.assemble(3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(member_tables, "GROUP_PAGES", 20)
        mp.setattr(member_tables, "SPACE", 120)
        got = case.assemble(3)
    for a, b in zip(got.regions, want.regions, strict=True):
        assert a.pages == b.pages


def _header(*regions: tuple[str, int, int, list[int], list[int]], full: bool = False) -> Any:
    h = common_pb2.PagesHeader(job="j", generation=2, member="m", node="n", page_size=PAGE)
    h.full = full
    for name, start, npages, pages, present in regions:
        reg = h.regions.add(name=name, start=start, end=start + npages * PAGE)
        reg.pages.extend(_runs(pages))
        reg.all_pages.extend(_runs(present))
    return h


def _entries(*pages: int, zero: bool = False) -> PageTable:
    ids = b"".join(ZERO_BYTES if zero else bytes([p + 1]) * 32 for p in pages)
    return PageTable.of(
        np.asarray(pages, dtype=np.uint64),
        np.ones(len(pages), dtype=np.uint32),
        np.frombuffer(ids, dtype=ID_DTYPE),
    )


def _raw_runs(h: Any, region: int, field: str, runs: list[tuple[int, int]]) -> None:
    rs = getattr(h.regions[region], field)
    del rs[:]
    rs.extend(types_pb2.PageRun(offset=o, count=c) for o, c in runs)


@pytest.mark.parametrize(
    ("runs", "why"),
    [
        ([(3, 0)], "region 1 (b) pages: a run has no page or overflows"),
        ([(2**64 - 1, 2)], "region 1 (b) pages: a run has no page or overflows"),
        ([(4, 2), (3, 1)], "region 1 (b) pages: runs are not sorted and disjoint"),
        ([(0, 2), (1, 1)], "region 1 (b) pages: runs are not sorted and disjoint"),
        ([(7, 2)], "region 1 (b) pages: a run ends beyond the region's 8 pages"),
    ],
)
def test_bad_runs_name_the_region(runs: list[tuple[int, int]], why: str) -> None:
    h = _header(("a", BASE, 4, [0], [0]), ("b", BASE + 8 * PAGE, 8, [], []))
    _raw_runs(h, 1, "pages", runs)
    with pytest.raises(InvalidArgument, match=re.escape(why)):
        UploadAssembler(h, PAGE)


def test_bad_headers() -> None:
    with pytest.raises(InvalidArgument, match="region a appears twice"):
        UploadAssembler(_header(("a", BASE, 1, [], []), ("a", BASE + PAGE, 1, [], [])), PAGE)
    h = _header(("a", BASE, 1, [], []))
    h.regions[0].end = BASE + 100
    with pytest.raises(InvalidArgument, match=r"region a: \[.*\) not aligned"):
        UploadAssembler(h, PAGE)
    with pytest.raises(InvalidArgument, match="page size 4096, the coordinator uses 8192"):
        UploadAssembler(_header(("a", BASE, 1, [], [])), 8192)


def test_entries_are_checked_like_a_page_table_and_ascend_across_batches() -> None:
    h = _header(("a", BASE, 8, [0, 1, 2, 3], [0, 1, 2, 3]), ("b", BASE + 9 * PAGE, 4, [1], [1]))

    def refused(why: str, *batches: common_pb2.PageBatch) -> None:
        asm = UploadAssembler(h, PAGE)
        with pytest.raises(InvalidArgument, match=why):
            asm.add_batches(list(batches))

    refused("batch names region 2 of 2", _batch(2, _entries(0)))
    refused("region b: an entry ends beyond the region's 4 pages", _batch(1, _entries(4)))
    refused("region a: entries are not sorted and disjoint", _batch(0, _entries(1, 0)))
    refused(
        "region a: entries go back",
        _batch(0, _entries(1, 2)), _batch(1, _entries(1)), _batch(0, _entries(0)),
    )  # fmt: skip
    bad = _batch(0, _entries(0))
    bad.entries.page_counts = b"\0\0\0\0"
    refused("region a: an entry covers no page", bad)
    bad = _batch(0, _entries(0, zero=True))
    bad.entries.chunk_skips = b"\1\0\0\0"
    refused("region a: a zero entry has a chunk skip", bad)
    bad = _batch(0, _entries(0))
    bad.entries.chunk_skips = b""
    refused("page entries: column lengths disagree", bad)
    # Across calls too: what an earlier call took is the floor.
    asm = UploadAssembler(h, PAGE)
    asm.add_batches([_batch(0, _entries(2))])
    with pytest.raises(InvalidArgument, match="region a: entries go back"):
        asm.add_batches([_batch(1, _entries(1)), _batch(0, _entries(1))])


def test_coverage_and_inheritance_are_checked_at_the_end() -> None:
    a = ("a", BASE, 8, [0, 1], [0, 1, 2])
    parent = MemberMap("m", (RegionMap("a", BASE, BASE + 8 * PAGE, _entries(0, 1, 2)),))

    def finish(h: Any, parent: MemberMap | None, *batches: common_pb2.PageBatch) -> Any:
        asm = UploadAssembler(h, PAGE)
        asm.add_batches(list(batches))
        return asm.finish(parent)

    done = finish(_header(a), parent, _batch(0, _entries(0)), _batch(0, _entries(1)))
    assert done.regions[0].pages.offsets.tolist() == [0, 1, 2]  # page 2 inherited
    with pytest.raises(InvalidArgument, match="region a: the entries cover 1 pages, not the 2"):
        finish(_header(a), parent, _batch(0, _entries(0)))
    with pytest.raises(InvalidArgument, match="region a: a full upload must deliver every page"):
        finish(_header(a, full=True), parent, _batch(0, _entries(0, 1)))
    with pytest.raises(InvalidArgument, match="region a: incremental, but the parent"):
        finish(_header(a), None, _batch(0, _entries(0, 1)))
    moved = MemberMap("m", (RegionMap("a", BASE + PAGE, BASE + 9 * PAGE, _entries(0)),))
    with pytest.raises(InvalidArgument, match="must be delivered whole"):
        finish(_header(a), moved, _batch(0, _entries(0, 1)))
    with pytest.raises(InvalidArgument, match="region a: delivers pages not present at the cut"):
        finish(_header(("a", BASE, 8, [0, 5], [0, 1])), parent, _batch(0, _entries(0, 5)))


def test_chunks_of_many_batches_raw_and_zstd() -> None:
    h = _header(("a", BASE, 4, [0, 1], [0, 1]), ("b", BASE + 5 * PAGE, 4, [0], [0]))
    asm = UploadAssembler(h, PAGE)
    plain = [bytes([i + 1]) * PAGE for i in range(3)]
    batches = []
    for region, idx, method in ((0, [0, 1], 0), (1, [2], 1)):
        b = _batch(region, _entries(*range(len(idx))))
        stored = [plain[i] if method == 0 else zstandard.compress(plain[i]) for i in idx]
        b.chunks.ids = b"".join(bytes([i + 9]) * 32 for i in idx)
        b.chunks.methods = bytes([method]) * len(idx)
        b.chunks.raw_sizes = np.full(len(idx), PAGE, dtype="<u4").tobytes()
        b.chunks.stored_sizes = np.asarray([len(s) for s in stored], dtype="<u4").tobytes()
        b.chunks.data = b"".join(stored)
        batches.append(b)
    ids, chunks = asm.add_batches(batches)
    assert ids.tobytes() == b"".join(bytes([i + 9]) * 32 for i in range(3))
    assert [bytes(c) for c in chunks] == plain
    assert asm.chunks == 3
    batches[1].chunks.data = batches[1].chunks.data[:-1]
    with pytest.raises(InvalidArgument, match=r"chunk data: \d+ bytes, sizes say"):
        UploadAssembler(h, PAGE).add_batches(batches)


def test_full_upload_with_empty_all_pages_reads_them_as_pages() -> None:
    h = _header(("a", BASE, 4, [1, 2], []), full=True)
    asm = UploadAssembler(h, PAGE)
    asm.add_batches([_batch(0, _entries(1, 2))])
    assert asm.finish(None).regions[0].pages.offsets.tolist() == [1, 2]
    assert stored_offsets(asm.all_pages.of(0)).tolist() == [1, 2]
