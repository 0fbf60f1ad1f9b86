"""What the upload of a staged member sends, planned for the whole member at once: its
page entries (nodeagent/upload/chunks.py's rule over every region back to back), the header's
runs, the batches (each within one region), the rounds of MissingChunks, and each
chunk's id once hashed.

Why member-wide: a process may have tens of thousands of one-page regions, and one
NumPy call per region per step (the zero scan, the entries, the header's runs, the
batches) cost seconds of agent CPU per upload. Here Python steps once per batch or per
chunk, and once per region only to build the header's Region messages.
"""

from __future__ import annotations

from collections.abc import Sequence

import blake3
import numpy as np
import numpy.typing as npt

from cpcoord.ranges import PAGE_SIZE
from nodeagent.capture.copyout import StagedRegion
from nodeagent.capture.process import zero_rows
from nodeagent.upload.chunks import (
    ENTRY_BYTES,
    GROUP_PAGES,
    ID_SIZE,
    MESSAGE_MARGIN,
    Entries,
    batches,
    plan,
)

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]


def member_runs(parts: Sequence[U64]) -> tuple[list[list[int]], list[int]]:
    """Sorted page offsets of each region -> runs `[offset, count]` of all of them
    back to back, and where each region's start (n + 1 indices)."""
    n = len(parts)
    sizes = np.fromiter((p.size for p in parts), dtype=np.int64, count=n)
    pages = np.concatenate(parts) if n else np.zeros(0, dtype=np.uint64)
    if pages.size == 0:
        return [], [0] * (n + 1)
    rid = np.repeat(np.arange(n), sizes)
    brk = np.ones(pages.size, dtype=np.bool_)
    brk[1:] = (pages[1:] != pages[:-1] + np.uint64(1)) | (rid[1:] != rid[:-1])
    lo = np.flatnonzero(brk)
    hi = np.append(lo[1:], pages.size)
    runs = np.stack((pages[lo], (hi - lo).astype(np.uint64)), axis=1)
    idx = np.searchsorted(rid[lo], np.arange(n + 1))
    return runs.tolist(), idx.tolist()


class Plan:
    """A member's page entries, every region's back to back in region order: entry i
    is of region `rid[i]`, at page `offsets[i]` from that region's start, staged at
    row `rows[i]` of all the member's staged pages (regions back to back)."""

    def __init__(
        self, regions: Sequence[StagedRegion], rows: npt.NDArray[np.uint8] | None = None
    ) -> None:
        n = len(regions)
        sizes = np.fromiter((r.pages.size for r in regions), dtype=np.int64, count=n)
        total = int(sizes.sum())
        self.row0 = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64).tolist()
        pages = np.concatenate([r.pages for r in regions]) if n else np.zeros(0, np.uint64)
        prid = np.repeat(np.arange(n, dtype=np.int64), sizes)
        # Staging holds every region's pages back to back: one zero scan for all of it.
        self.rows = rows if rows is not None and rows.shape[0] == total else None
        if self.rows is not None:
            zero = zero_rows(self.rows)
        elif n:  # regions staged apart (unreadable pages dropped): region by region
            zero = np.concatenate([zero_rows(r.data) for r in regions])
        else:
            zero = np.zeros(0, dtype=np.bool_)
        self.e = plan(pages.astype(np.uint64, copy=False), zero, region=prid)
        self.rid = prid[self.e.rows]
        self.idx = np.searchsorted(self.rid, np.arange(n + 1)).astype(np.int64)
        self.datas = [r.data for r in regions]
        m = len(self.e)
        self.ids = np.zeros((m, ID_SIZE), dtype=np.uint8)
        self.hashed = np.zeros(m, dtype=np.bool_)
        self.send = np.zeros(m, dtype=np.bool_)  # the chunk travels with this entry
        self._rows = self.e.rows.tolist()
        self._counts = self.e.counts.tolist()
        self._rid = self.rid.tolist()

    def __len__(self) -> int:
        return len(self.e)

    @property
    def zero_pages(self) -> int:
        return int(self.e.counts[self.e.zero].sum())

    @property
    def chunks(self) -> int:
        return int((~self.e.zero).sum())

    def region_of(self, i: int) -> int:
        """The region index of entry `i` (a Python int, cached: asked once per batch)."""
        r: int = self._rid[i]
        return r

    def chunk(self, i: int) -> npt.NDArray[np.uint8]:
        row, count = self._rows[i], self._counts[i]
        if self.rows is not None:
            return self.rows[row : row + count]
        r = self._rid[i]
        row -= self.row0[r]
        return self.datas[r][row : row + count]

    def hash(self, idx: I64) -> None:
        todo = idx[~self.hashed[idx]]
        if todo.size:
            digests = b"".join([blake3.blake3(self.chunk(i).data).digest() for i in todo.tolist()])
            self.ids[todo] = np.frombuffer(digests, dtype=np.uint8).reshape(-1, ID_SIZE)
            self.hashed[todo] = True

    def chunk_bytes(self) -> I64:
        """Cumulative chunk bytes (zero entries carry none), m + 1 items."""
        cost = np.where(self.e.zero, 0, self.e.counts * PAGE_SIZE)
        return np.concatenate(([0], np.cumsum(cost))).astype(np.int64)

    def batches(self, max_message_bytes: int, max_entries: int) -> list[tuple[int, int]]:
        """Entry ranges [a, b), each within one region, in order, by chunks.batches'
        rule; a region that fits in one batch (most of them, when there are many) is
        one at once, without a NumPy call of its own."""
        e = self.e
        cost = np.where(e.zero, 0, e.counts * PAGE_SIZE) + ENTRY_BYTES
        cum = np.concatenate(([0], np.cumsum(cost))).astype(np.int64)
        budget = max(max_message_bytes - MESSAGE_MARGIN, GROUP_PAGES * PAGE_SIZE + ENTRY_BYTES)
        idx = self.idx
        fits = ((cum[idx[1:]] - cum[idx[:-1]]) <= budget) & (np.diff(idx) <= max_entries)
        out: list[tuple[int, int]] = []
        edges = idx.tolist()
        for r, ok in enumerate(fits.tolist()):
            a, z = edges[r], edges[r + 1]
            if a == z:
                continue
            if ok:
                out.append((a, z))
                continue
            part = Entries(e.offsets[a:z], e.counts[a:z], e.rows[a:z], e.zero[a:z])
            out.extend((a + x, a + y) for x, y in batches(part, max_message_bytes, max_entries))
        return out


# Each round costs a MissingChunks call and, on the direct path, a batch message per
# region, on both sides. Rounds of 16, 64, 256 MiB (4 per 512 MiB member) against 16, 32,
# 64, 128, 256 (6): the coordinator's threads took 0.089-0.094 CPU s per 1 GiB direct
# checkpoint against 0.099-0.116, and `--wait local` 0.55-0.59 s against 0.59-0.63 (3 and
# 2 interleaved pairs); the next round is still hashed while this one is sent.
GROWTH = 4


def rounds(
    bs: list[tuple[int, int]], chunk_cum: I64, window_bytes: int, first_bytes: int = 0
) -> list[list[tuple[int, int]]]:
    """Consecutive batches grouped up to `window_bytes` of chunk data (a batch alone may
    reach it): the unit of one MissingChunks round trip. A member of 20 000 one-page
    regions asks a few times, not 20 000 times. With `first_bytes` the window starts
    there and grows GROWTH-fold each round up to `window_bytes`: the first round, hashed before
    anything else can start, stays short, and a big member still makes few rounds."""
    out: list[list[tuple[int, int]]] = []
    window = min(first_bytes, window_bytes) if first_bytes > 0 else window_bytes
    size = window + 1
    cum = chunk_cum.tolist()
    for a, b in bs:
        nbytes = cum[b] - cum[a]
        if size + nbytes <= window:
            out[-1].append((a, b))
            size += nbytes
        else:
            if out:
                window = min(GROWTH * window, window_bytes)
            out.append([(a, b)])
            size = nbytes
    return out


def merge(
    rnd: list[tuple[int, int]], rid: npt.NDArray[np.int64], max_entries: int
) -> list[tuple[int, int]]:
    """A round's consecutive batches of one region joined, up to `max_entries` entries
    each (`rid`: each entry's region): one message instead of several, where a batch
    carries entries only (the direct data path)."""
    out: list[tuple[int, int]] = []
    for a, b in rnd:
        if out and out[-1][1] == a and rid[a] == rid[a - 1] and b - out[-1][0] <= max_entries:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out
