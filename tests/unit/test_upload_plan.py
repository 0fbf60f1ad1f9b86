"""An upload planned for the whole member at once (nodeagent/upload/plan.py) equals the
chunking rule applied region by region (nodeagent/upload/chunks.py), and what an agent sends
is what the coordinator's assembler (coordinator/uploads.py) rebuilds, byte for byte:
the agent's real upload against a stub that hands its messages to the assembler."""

from __future__ import annotations

import itertools
from typing import Any

import blake3
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.uploads import UploadAssembler
from cpcoord.gen.v1 import agent_pb2
from nodeagent.capture.copyout import StagedRegion
from nodeagent.capture.process import zero_rows
from nodeagent.pages import runs_from_pages
from nodeagent.upload.chunks import ENTRY_BYTES, MESSAGE_MARGIN, batches, plan
from nodeagent.upload.plan import Plan, member_runs, merge, rounds
from nodeagent.upload.stream import Limits, StagedMember, header, upload

PAGE = 4096


def _member(layout: list[tuple[list[int], list[int]]], seed: int) -> tuple[StagedMember, Any]:
    """Regions of (delivered offsets, zero flags), staged back to back in one buffer."""
    rng = np.random.default_rng(seed)
    total = sum(len(p) for p, _ in layout)
    rows = rng.integers(1, 255, size=(total, PAGE), dtype=np.uint8)
    regions = []
    row = 0
    start = 0x100000
    for i, (pages, zeros) in enumerate(layout):
        k = len(pages)
        data = rows[row : row + k]
        data[np.asarray(zeros, dtype=bool)] = 0
        npages = (max(pages) + 1) if pages else 1
        p = np.asarray(pages, dtype=np.uint64)
        regions.append(StagedRegion(f"r{i}", start, start + npages * PAGE, p, p, data))
        start += (npages + 1) * PAGE
        row += k
    sm = StagedMember("j", 1, "m", "n", None, tuple(regions), "none", True, 0, 0, 0.0)  # type: ignore[arg-type]
    return sm, rows


@st.composite
def layouts(draw: Any) -> list[tuple[list[int], list[int]]]:
    out = []
    for _ in range(draw(st.integers(0, 8))):
        pages = sorted(draw(st.sets(st.integers(0, 70), max_size=40)))
        zeros = [draw(st.booleans()) for _ in pages]
        out.append((pages, zeros))
    return out


@settings(max_examples=150, deadline=None)
@given(layouts(), st.integers(0, 2**16), st.integers(1, 40), st.booleans())
def test_member_plan_equals_the_rule_region_by_region(
    layout: list[tuple[list[int], list[int]]], seed: int, budget_pages: int, staged: bool
) -> None:
    sm, rows = _member(layout, seed)
    p = Plan(sm.regions, rows if staged else None)
    budget = MESSAGE_MARGIN + budget_pages * PAGE
    got = p.batches(budget, 5)
    want = []
    for r, reg in enumerate(sm.regions):
        e = plan(reg.pages, zero_rows(reg.data))
        a0 = int(p.idx[r])
        assert p.e.offsets[a0 : a0 + len(e)].tolist() == e.offsets.tolist()
        assert p.e.counts[a0 : a0 + len(e)].tolist() == e.counts.tolist()
        assert p.e.zero[a0 : a0 + len(e)].tolist() == e.zero.tolist()
        assert set(p.rid[a0 : a0 + len(e)].tolist()) <= {r}
        for i in range(len(e)):  # the chunk bytes are the region's own rows
            row, n = int(e.rows[i]), int(e.counts[i])
            assert np.array_equal(p.chunk(a0 + i), reg.data[row : row + n])
        want += [(a0 + a, a0 + b) for a, b in batches(e, budget, 5)]
    assert got == want
    assert len(p) == int(p.idx[-1])


@settings(max_examples=100, deadline=None)
@given(layouts())
def test_member_runs_equal_runs_region_by_region(layout: list[tuple[list[int], list[int]]]) -> None:
    parts = [np.asarray(pages, dtype=np.uint64) for pages, _ in layout]
    runs, idx = member_runs(parts)
    for i, p in enumerate(parts):
        assert runs[idx[i] : idx[i + 1]] == runs_from_pages(p).tolist()


def test_rounds_group_batches_for_one_missing_chunks_call() -> None:
    pages = np.arange(4096, dtype=np.uint64)  # 16 MiB: 256 chunks of 64 KiB
    region = StagedRegion("r", 0, 4096 * PAGE, pages, pages, np.ones((4096, PAGE), np.uint8))
    p = Plan((region,))
    bs = p.batches(MESSAGE_MARGIN + (1 << 20), 65536)  # ~1 MiB of data per batch
    rs = rounds(bs, p.chunk_bytes(), 4 << 20)
    assert [b for r in rs for b in r] == bs  # every batch once, in order

    def size(r: list[tuple[int, int]]) -> int:
        return sum(int(p.e.counts[a:b].sum()) for a, b in r) * PAGE

    assert all(size(r) <= 4 << 20 for r in rs)
    # greedy: each round is as full as it can be
    assert all(size(r) + size(nxt[:1]) > 4 << 20 for r, nxt in itertools.pairwise(rs))
    zero = StagedRegion("z", 0, 4096 * PAGE, pages, pages, np.zeros((4096, PAGE), np.uint8))
    pz = Plan((zero,))  # zero entries cost nothing
    assert len(rounds(pz.batches(1 << 20, 65536), pz.chunk_bytes(), 1)) == 1


def test_rounds_start_small_and_grow_and_direct_batches_merge() -> None:
    pages = np.arange(65536, dtype=np.uint64)  # 256 MiB: 4096 chunks of 64 KiB
    rows = np.ones((65536, PAGE), np.uint8)
    region = StagedRegion("r", 0, 65536 * PAGE, pages, pages, rows)
    p = Plan((region,))
    bs = p.batches(MESSAGE_MARGIN + (16 << 20) + 256 * ENTRY_BYTES, 65536)  # 16 MiB each
    rs = rounds(bs, p.chunk_bytes(), 128 << 20, 16 << 20)
    assert [b for r in rs for b in r] == bs
    sizes = [sum(int(p.e.counts[a:b].sum()) for a, b in r) * PAGE >> 20 for r in rs]
    assert sizes == [16, 64, 128, 48]  # 16 MiB, four times that, then the cap
    merged = [merge(r, p.rid, 65536) for r in rs]
    assert [len(m) for m in merged] == [1] * len(rs)  # one message per round
    assert [m[0] for m in merged] == [(r[0][0], r[-1][1]) for r in rs]
    assert merge(rs[2], p.rid, 256) == rs[2]  # 256 entries each: none joins another
    # batches of two regions never merge
    two = Plan((region, StagedRegion("s", 1 << 40, 65536 * PAGE, pages, pages, rows)))
    b2 = two.batches(MESSAGE_MARGIN + (512 << 20), 65536)  # one batch per region
    assert len(b2) == 2 and merge(b2, two.rid, 65536) == b2


class _Stub:
    """UploadPages and MissingChunks in process: every chunk is missing the first
    time; the stream's messages go to the coordinator's assembler."""

    framed_uploads = True

    def __init__(self, group: int) -> None:
        self.group = group
        self.asm: UploadAssembler | None = None
        self.messages = 0
        self.UploadPages = self

    def MissingChunks(self, req: Any, timeout: float | None = None) -> Any:
        n = len(req.ids) // 32
        bits = np.packbits(np.ones(n, dtype=np.uint8), bitorder="little").tobytes()
        return agent_pb2.MissingChunksResponse(missing=bits)

    def future(self, it: Any, timeout: float | None = None) -> Any:
        reqs = [agent_pb2.UploadRequest.FromString(m if isinstance(m, bytes) else
                                                   m.SerializeToString()) for m in it]  # fmt: skip
        self.messages = len(reqs)
        self.asm = UploadAssembler(reqs[0].header, PAGE)
        assert reqs[-1].WhichOneof("body") == "end", "the stream ends with its end message"
        batch_list = [r.batch for r in reqs[1:-1]]
        for k in range(0, len(batch_list), self.group):  # as a pool hop takes them
            self.asm.add_batches(batch_list[k : k + self.group])
        done = self.asm.finish(None)
        self.done = done
        resp = agent_pb2.UploadResponse(pages=done.pages, entries=done.entries)

        class F:
            def result(self, timeout: float | None = None) -> Any:
                return resp

            def cancel(self) -> None:
                pass

        return F()


@settings(max_examples=60, deadline=None)
@given(layouts(), st.integers(0, 2**16), st.integers(1, 7), st.booleans())
def test_what_the_agent_sends_the_coordinator_rebuilds(
    layout: list[tuple[list[int], list[int]]], seed: int, group: int, staged: bool
) -> None:
    sm, rows = _member(layout, seed)
    if staged:
        sm = StagedMember(**{**sm.__dict__, "rows": rows})
    stub = _Stub(group)
    res = upload(stub, sm, Limits(batch_bytes=MESSAGE_MARGIN + 3 * PAGE, max_batch_entries=4))
    assert res.pages == sum(int(r.pages.size) for r in sm.regions)
    got = stub.done
    assert [r.name for r in got.regions] == [r.name for r in sm.regions]
    assert res.entries == got.entries == sum(len(r.pages) for r in got.regions)
    for reg, rm in zip(sm.regions, got.regions, strict=True):
        t = rm.pages
        pages, entry, _ = t.expand()
        assert pages.tolist() == reg.pages.tolist()  # every delivered page, once, in order
        assert not reg.data[t.zero[entry]].any()  # zero entries: zero pages
        _, first = np.unique(entry, return_index=True)
        for i, k0 in enumerate(first.tolist()):  # a chunk's id is its pages' BLAKE3
            if not t.zero[i]:
                rows_of = reg.data[k0 : k0 + int(t.counts[i])]
                assert blake3.blake3(rows_of.tobytes()).digest() == t.ids[i].tobytes()
    assert header(sm).header.member == "m"
