"""One UploadPages stream, read and checked: the header's regions, each batch's page
entries and chunks, and at the end the member's complete page tables for the manifest.

The rules are those of docs/protocol.md ("How the coordinator reads an upload"): entries
of a region ascend across the stream, lie inside the region, and together cover exactly
the runs the header says the stream delivers; an incremental region inherits its other
present pages from the parent generation's region of the same name and address
(`manifest.overlay`), else it must be delivered whole. Anything else is InvalidArgument
(the servicer aborts the generation with BAD_DATA). Chunks are parsed from their packed
columns (zstd ones decompressed); hashing them is the store's job (`add_chunks`).

Everything is vectorised over the packed columns and over the member's regions
(coordinator/member_tables.py): no Python object per page, and a small Python step per
region or batch only where the protobuf or the result is one object each. A member of
20 000 one-page regions once took seconds here, with one NumPy call per region per step.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from coordinator import member_tables as mt
from coordinator.store.manifest import MemberMap, PageTable, RegionMap
from cpcoord import mapfacts
from cpcoord.errors import InvalidArgument
from cpcoord.gen.v1 import common_pb2
from cpcoord.ranges import check_name
from storecore.ids import ID_DTYPE, ID_SIZE, IdArray, as_id_array, empty_ids, zero_mask

MAX_CHUNK = 4 << 20
MAX_BATCH_ENTRIES = 65536


@dataclass(frozen=True)
class MemberUpload:
    """A member's upload, complete and checked: what the manifest will hold."""

    member: str
    node: str
    regions: tuple[RegionMap, ...]  # complete page tables (parent pages inherited)
    chunk_ids: IdArray  # sorted unique non-zero ids the tables reference
    pages: int  # pages delivered by the stream, zero pages included
    zero_pages: int
    entries: int
    chunks: int
    chunks_new: int
    bytes_received: int
    bytes_stored_new: int
    cut_ns: int
    tracker: str
    full: bool
    threads: int
    layout: tuple[mapfacts.MapFact, ...] = ()  # every mapping at the cut (whole memory)
    data_path: str = "coordinator"  # "direct": the agent put its packs itself
    packs: int = 0  # packs it reported (direct data path)

    def member_map(self) -> MemberMap:
        return MemberMap(self.member, self.regions, layout=self.layout)


class UploadAssembler:
    """Feed it the header, then batches (`add_batches`, any number at a time); `finish`
    returns the MemberUpload. Each step is vectorised over the whole member
    (coordinator/member_tables.py): its cost does not grow with the number of regions
    beyond a small Python step per region or batch."""

    def __init__(
        self, header: common_pb2.PagesHeader, page_size: int, max_entries: int = MAX_BATCH_ENTRIES
    ) -> None:
        if header.page_size != page_size:
            raise InvalidArgument(f"page size {header.page_size}, the coordinator uses {page_size}")
        self.header = header
        self.page_size = page_size
        self.max_entries = max_entries
        regs = header.regions
        n = len(regs)
        self.names = [r.name for r in regs]
        for name in self.names:
            check_name(name)
        if len(set(self.names)) != n:
            seen: set[str] = set()
            for name in self.names:
                if name in seen:
                    raise InvalidArgument(f"region {name} appears twice in the header")
                seen.add(name)
        self.starts = np.fromiter((r.start for r in regs), dtype=np.uint64, count=n)
        self.ends = np.fromiter((r.end for r in regs), dtype=np.uint64, count=n)
        ps = np.uint64(page_size)
        bad = np.flatnonzero(
            (self.starts % ps != 0) | (self.ends % ps != 0) | (self.ends <= self.starts)
        )
        if bad.size:
            r = regs[int(bad[0])]
            raise InvalidArgument(f"region {r.name}: [{r.start:#x}, {r.end:#x}) not aligned")
        self.npages = (self.ends - self.starts) // ps
        self.facts = [mapfacts.from_protos(r.mappings) for r in regs]  # at the cut
        for r, facts in zip(regs, self.facts, strict=True):
            if facts and (why := mapfacts.check_facts(facts, r.start, r.end)):
                raise InvalidArgument(f"region {r.name}: mappings at the cut: {why}")
        self.layout = mapfacts.from_protos(header.layout)
        if why := mapfacts.check_layout_facts(self.layout):
            raise InvalidArgument(f"member {header.member}: layout at the cut: {why}")
        self.pages = self._runs(regs, "pages")  # delivered
        self.all_pages = self._runs(regs, "all_pages")  # present at the cut
        if header.full:  # an empty all_pages reads as `pages`
            self.all_pages = _fill_empty(self.all_pages, self.pages)
        self.next_page = np.zeros(n, dtype=np.uint64)  # entries start at or after this
        self.parts: list[mt.Entries] = []  # each batch group's entries, sorted by region
        self.entries = self.page_count = self.zero_pages = 0
        self.chunks = self.bytes_received = 0
        self._dctx = zstandard.ZstdDecompressor()

    def _runs(self, regs: Any, attr: str) -> mt.Runs:
        n = len(regs)
        per = np.fromiter((len(getattr(r, attr)) for r in regs), dtype=np.int64, count=n)
        flat = np.fromiter(
            (v for r in regs for run in getattr(r, attr) for v in (run.offset, run.count)),
            dtype=np.uint64,
            count=2 * int(per.sum()),
        )
        try:
            return mt.parse_runs(flat, per, self.npages)
        except mt.RunProblem as e:
            where = f"region {e.region} ({self.names[e.region]}) {attr}"
            raise InvalidArgument(f"{where}: {e.why}") from None

    def add_batch(self, batch: common_pb2.PageBatch) -> tuple[IdArray, list[memoryview]]:
        """Check a batch, keep its entries; return its chunks (ids, plain bytes)."""
        return self.add_batches([batch])

    def add_batches(self, batches: list[common_pb2.PageBatch]) -> tuple[IdArray, list[memoryview]]:
        """Check batches (in stream order), keep their entries; return their chunks."""
        if not batches:
            return empty_ids(), []
        self._entries(batches)
        return self._chunks([b.chunks for b in batches])

    def _entries(self, batches: list[common_pb2.PageBatch]) -> None:
        n = len(self.names)
        cols: list[list[bytes]] = [[], [], [], []]
        sizes = []
        regions = []
        for b in batches:
            if b.region >= n:
                raise InvalidArgument(f"batch names region {b.region} of {n}")
            e = b.entries
            po, pc, cs, ci = e.page_offsets, e.page_counts, e.chunk_skips, e.chunk_ids
            k = len(po) // 8
            if len(po) % 8 or len(pc) != 4 * k or len(cs) != 4 * k or len(ci) != ID_SIZE * k:
                raise InvalidArgument("page entries: column lengths disagree")
            if k > self.max_entries:
                raise InvalidArgument(f"{k} page entries in one batch: at most {self.max_entries}")
            if k:
                for col, v in zip(cols, (po, pc, cs, ci), strict=True):
                    col.append(v)
                sizes.append(k)
                regions.append(b.region)
        if not sizes:
            return
        batch = np.repeat(np.arange(len(sizes)), sizes)
        rid = np.asarray(regions, dtype=np.int64)[batch]
        order = np.argsort(rid, kind="stable")  # by region, the stream's order within one
        rid, batch = rid[order], batch[order]
        t = PageTable(
            np.frombuffer(b"".join(cols[0]), dtype="<u8")[order],
            np.frombuffer(b"".join(cols[1]), dtype="<u4")[order],
            np.frombuffer(b"".join(cols[2]), dtype="<u4")[order],
            np.frombuffer(b"".join(cols[3]), dtype=ID_DTYPE)[order],
        )
        self._check(rid, batch, t)
        ends = t.offsets + t.counts.astype(np.uint64)
        last = np.flatnonzero(np.append(rid[1:] != rid[:-1], True))
        self.next_page[rid[last]] = ends[last]
        self.parts.append(mt.Entries(rid, t, np.zeros(0, dtype=np.int64)))
        self.entries += len(t)
        self.page_count += t.page_count
        self.zero_pages += t.zero_pages

    def _check(self, rid: mt.I64, batch: mt.I64, t: PageTable) -> None:
        """The rules of PageTable.problems, and entries ascending across the stream."""
        ends = t.offsets + t.counts.astype(np.uint64)
        same = rid[1:] == rid[:-1]
        overlap = np.concatenate(([False], same & (t.offsets[1:] < ends[:-1])))
        within = np.concatenate(([False], batch[1:] == batch[:-1]))
        head = np.concatenate(([True], ~same))  # a region's first entry in these batches
        checks = [
            (t.counts == 0, "an entry covers no page"),
            (ends < t.offsets, "page offset overflows"),
            (overlap & within, "entries are not sorted and disjoint"),
            (ends > self.npages[rid], "an entry ends beyond the region's {} pages"),
            (zero_mask(t.ids) & (t.skips != 0), "a zero entry has a chunk skip"),
            ((overlap & ~within) | (head & (t.offsets < self.next_page[rid])),
             "entries go back (not ascending)"),
        ]  # fmt: skip
        for mask, why in checks:
            hit = np.flatnonzero(mask)
            if hit.size:
                r = int(rid[hit[0]])
                raise InvalidArgument(f"region {self.names[r]}: {why.format(int(self.npages[r]))}")

    def _chunks(self, cds: list[common_pb2.ChunkData]) -> tuple[IdArray, list[memoryview]]:
        cols: list[list[bytes]] = [[], [], [], []]
        blobs: list[bytes] = []
        counts: list[int] = []
        for c in cds:  # each read of a bytes field copies it: read each once
            ids_b, methods_b, raw_b, stored_b = c.ids, c.methods, c.raw_sizes, c.stored_sizes
            k = len(ids_b) // ID_SIZE
            if len(ids_b) % ID_SIZE or len(methods_b) != k or len(raw_b) != 4 * k:
                raise InvalidArgument("chunk data: column lengths disagree")
            if len(stored_b) != 4 * k:
                raise InvalidArgument("chunk data: column lengths disagree")
            if k:
                for col, v in zip(cols, (ids_b, methods_b, raw_b, stored_b), strict=True):
                    col.append(v)
                blobs.append(c.data)
                counts.append(k)
        if not blobs:
            return empty_ids(), []
        ids = as_id_array(b"".join(cols[0]))
        methods = np.frombuffer(b"".join(cols[1]), dtype=np.uint8)
        raw = np.frombuffer(b"".join(cols[2]), dtype="<u4").astype(np.int64)
        stored = np.frombuffer(b"".join(cols[3]), dtype="<u4").astype(np.int64)
        if zero_mask(ids).any():
            raise InvalidArgument("the ZERO id names all-zero pages and is never uploaded")
        if np.any((raw < 1) | (raw > MAX_CHUNK)):
            raise InvalidArgument(f"chunk sizes must be 1..{MAX_CHUNK} bytes")
        if np.any(methods > 1) or np.any((methods == 0) & (stored != raw)):
            raise InvalidArgument("chunk data: unknown method, or a raw chunk's sizes differ")
        firsts = list(itertools.accumulate(counts, initial=0))
        cum = np.concatenate(([0], np.cumsum(stored))).tolist()
        out: list[memoryview] = []
        for i, blob in enumerate(blobs):  # one step per batch, then one per chunk
            a, z = firsts[i], firsts[i + 1]
            base = cum[a]
            if cum[z] - base != len(blob):
                raise InvalidArgument(f"chunk data: {len(blob)} bytes, sizes say {cum[z] - base}")
            data = memoryview(blob)
            out.extend(data[s - base : e - base] for s, e in itertools.pairwise(cum[a : z + 1]))
        for i in np.flatnonzero(methods == 1).tolist():
            j = i - firsts[bisect.bisect_right(firsts, i) - 1]
            try:
                plain = self._dctx.decompress(out[i], max_output_size=int(raw[i]))
            except zstandard.ZstdError as e:
                raise InvalidArgument(f"chunk {j} of a batch: bad zstd frame: {e}") from None
            if len(plain) != raw[i]:
                raise InvalidArgument(f"chunk {j} of a batch: {len(plain)} bytes, not {raw[i]}")
            out[i] = memoryview(plain)
        self.chunks += int(ids.size)
        self.bytes_received += sum(len(b) for b in blobs)
        return ids, out

    def finish(
        self, parent: MemberMap | None, chunks_new: int = 0, bytes_new: int = 0
    ) -> MemberUpload:
        """Check coverage and build the complete tables (parent pages inherited)."""
        h = self.header
        n = len(self.names)
        delta = self._delta()
        got = mt.entry_runs(delta.rid, delta.table.offsets, delta.table.counts, n)
        covered = mt.same_runs(got, self.pages)
        if not covered.all():
            r = int(np.flatnonzero(~covered)[0])
            raise InvalidArgument(
                f"region {self.names[r]}: the entries cover {int(got.pages()[r])} pages, "
                f"not the {int(self.pages.pages()[r])} pages its header announces"
            )
        whole = mt.same_runs(self.pages, self.all_pages)  # everything present delivered
        inc = np.flatnonzero(~whole)
        done = mt.Entries.build(np.zeros(0, dtype=np.int64), PageTable.empty(), n)
        if inc.size:
            if h.full:
                r = int(inc[0])
                raise InvalidArgument(
                    f"region {self.names[r]}: a full upload must deliver every page"
                )
            done = self._inherit(inc, parent, delta)
        tables = [delta, done]
        maps = tuple(
            RegionMap(name, start, end, tables[k].region(r), facts)
            for r, (name, start, end, k, facts) in enumerate(
                zip(self.names, self.starts.tolist(), self.ends.tolist(),
                    (~whole).astype(np.int64).tolist(), self.facts, strict=True)
            )
        )  # fmt: skip
        return MemberUpload(
            member=h.member,
            node=h.node,
            regions=maps,
            chunk_ids=mt.nonzero_ids([delta.table, done.table]),
            pages=self.page_count,
            zero_pages=self.zero_pages,
            entries=self.entries,
            chunks=self.chunks,
            chunks_new=chunks_new,
            bytes_received=self.bytes_received,
            bytes_stored_new=bytes_new,
            cut_ns=h.cut_unix_ns,
            tracker=h.tracker,
            full=h.full,
            threads=len(h.threads),
            layout=self.layout,
        )

    def _delta(self) -> mt.Entries:
        """Every entry received, sorted by region (the stream's order within one)."""
        n = len(self.names)
        if not self.parts:
            return mt.Entries.build(np.zeros(0, dtype=np.int64), PageTable.empty(), n)
        rid = np.concatenate([p.rid for p in self.parts])
        t = mt.concat_tables([p.table for p in self.parts])
        if len(self.parts) > 1:
            order = np.argsort(rid, kind="stable")
            rid = rid[order]
            t = PageTable(t.offsets[order], t.counts[order], t.skips[order], t.ids[order])
        return mt.Entries.build(rid, t, n)

    def _inherit(self, inc: mt.I64, parent: MemberMap | None, delta: mt.Entries) -> mt.Entries:
        """The complete tables of the regions `inc`, which deliver only some of their
        pages: the rest comes from the parent's region of the same name and address."""
        bases = {r.name: r for r in parent.regions} if parent is not None else {}
        tables = []
        for r in inc.tolist():  # one dict lookup per region
            base = bases.get(self.names[r])
            if base is None or (base.start, base.end) != (int(self.starts[r]), int(self.ends[r])):
                raise InvalidArgument(
                    f"region {self.names[r]}: incremental, but the parent generation has no "
                    "region of that name at that address: it must be delivered whole"
                )
            tables.append(base.pages)
        done, bad = mt.overlay_regions(inc, self.npages, tables, delta, self.all_pages)
        if bad is not None:
            raise InvalidArgument(
                f"region {self.names[bad]}: delivers pages not present at the cut"
            )
        return done


def _fill_empty(runs: mt.Runs, fill: mt.Runs) -> mt.Runs:
    """`runs`, with each region that has none taking `fill`'s."""
    empty = np.diff(runs.idx) == 0
    if not empty.any():
        return runs
    take = empty[fill.rid]
    rid = np.concatenate((runs.rid, fill.rid[take]))
    rows = np.concatenate((runs.runs, fill.runs[take]))
    order = np.argsort(rid, kind="stable")
    idx = np.searchsorted(rid[order], np.arange(runs.idx.size)).astype(np.int64)
    return mt.Runs(rows[order], idx)
