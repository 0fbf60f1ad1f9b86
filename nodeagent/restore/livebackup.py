"""The live backup: what a rollback will overwrite, read while the member still runs.

Owns taking it (`take`, member running, after the caller cleared its tracker) and
telling which of it still holds (`LiveBackup.stale`, frozen). The all-or-nothing write
(restore/backup.py) then reads frozen only the pages whose live copy does not hold; a
full rewrite of 1 GiB no longer reads the GiB back while frozen (docs/restore.md).

A live copy of a page is used frozen only when all of these hold, else the page is read
frozen as before (never a guess):
- the page lies in a private anonymous mapping, and was present and exclusively mapped
  (pagemap bit 56) when read live, and is so again frozen (backup.py checks): its bytes
  can change only by a write of the process (or through /proc by another one, which the
  tracker reports as well), never behind it (file or shared pages, swapped pages and
  copy-on-write pages shared with another process are always read frozen);
- the tracker, cleared before the live read (so every write after the clear shows),
  does not report it written since, nor lies it in a range it could not register;
- the mappings it lay in are the same (start, end, protections, backing) frozen.
Pages read live as absent in a private anonymous mapping need no bytes: they are put
back as zeros, and backup.py looks at them again frozen anyway.
Vectorised: NumPy over pages and runs; one `process_vm_readv` per IOV_MAX runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE
from nodeagent.capture.changeset import mark_runs
from nodeagent.pages import PageNumbers, Runs, empty_pages, empty_runs, in_sorted
from nodeagent.proc import uffd
from nodeagent.proc.iovec import READ, transfer
from nodeagent.proc.pagemap import PM_EXCLUSIVE, PM_PRESENT, PM_SWAPPED, PagemapReader
from nodeagent.proc.procfs import Mapping
from nodeagent.proc.reader import ReadvFn, sys_readv
from nodeagent.restore.backup import BackupStore

log = logging.getLogger(__name__)
U64 = npt.NDArray[np.uint64]
CHUNK_PAGES = 16384  # a live read checks its deadline every 64 MiB


def _anon_private(pages: PageNumbers, maps: Sequence[Mapping]) -> npt.NDArray[np.bool_]:
    """Per page: it lies in a private anonymous mapping."""
    ms = np.array([m.start >> PAGE_SHIFT for m in maps], dtype=np.uint64)
    me = np.array([m.end >> PAGE_SHIFT for m in maps], dtype=np.uint64)
    anon = np.array([m.inode == 0 and not m.shared for m in maps], dtype=bool)
    if not ms.size or not pages.size:
        return np.zeros(pages.size, dtype=bool)
    j = np.searchsorted(ms, pages, side="right").astype(np.int64) - 1
    ok = j >= 0
    j = np.maximum(j, 0)
    return ok & (pages < me[j]) & anon[j]


def _covering(pages: PageNumbers, maps: Sequence[Mapping]) -> tuple[Mapping, ...]:
    """The mappings that hold any of the sorted `pages` (two searches in all)."""
    if not pages.size or not maps:
        return ()
    ms = np.array([m.start >> PAGE_SHIFT for m in maps], dtype=np.uint64)
    me = np.array([m.end >> PAGE_SHIFT for m in maps], dtype=np.uint64)
    hit = np.searchsorted(pages, me) > np.searchsorted(pages, ms)
    return tuple(maps[k] for k in np.flatnonzero(hit).tolist())


class LiveBackup:
    """Pages read live: `pages` (sorted, absolute page numbers), page i's bytes at
    `addr[i]` (0: it was absent, zeros). `ok[i]`: its copy still holds as far as the
    tracker said (`stale`). Owns its store (`close`)."""

    def __init__(
        self,
        pages: PageNumbers,
        addr: U64,
        maps: tuple[Mapping, ...],
        store: BackupStore,
        seconds: float,
    ) -> None:
        self.pages, self.addr, self.maps, self.store = pages, addr, maps, store
        self.ok = np.ones(pages.size, dtype=bool)
        self.seconds = seconds

    @property
    def nbytes(self) -> int:
        return int(np.count_nonzero(self.addr)) * PAGE_SIZE

    def stale(self, pages: PageNumbers) -> None:
        """These pages (sorted) were written since the live read: read them frozen."""
        if pages.size and self.pages.size:
            self.ok &= ~in_sorted(self.pages, pages)

    def mark(self, written: PageNumbers, own: Runs, untracked: Runs) -> None:
        """Frozen: `written` (sorted), the pages the tracker reports written since the
        live read; `own` (`own_pages`), runs `[first, count]` of pages present now with a
        page of their own; `untracked`, runs the tracker cannot see. Stale: pages
        written, untracked, or without their own page now (dropped, e.g. MADV_DONTNEED,
        which no tracker reports: absent, or the zero page after a read)."""
        self.stale(written)
        if not self.pages.size:
            return
        mask = np.zeros(self.pages.size, dtype=np.bool_)
        mark_runs(self.pages, own, mask)  # few runs: no search per page
        self.ok &= mask
        if untracked.size:
            mask[:] = False
            mark_runs(self.pages, untracked, mask)
            self.ok &= ~mask

    def holds_with(self, maps: Sequence[Mapping]) -> bool:
        """Whether the mappings the live pages lay in are the same now (frozen)."""
        return _covering(self.pages, maps) == self.maps

    def lookup(self, pages: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
        """Per page (any order): where its live bytes are; 0 when none hold."""
        out = np.zeros(pages.size, dtype=np.uint64)
        if not self.pages.size or not pages.size:
            return out
        p = pages.astype(np.uint64)
        i = np.searchsorted(self.pages, p)
        i[i == self.pages.size] = 0
        hit = (self.pages[i] == p) & self.ok[i]
        out[hit] = self.addr[i[hit]]
        return out

    def close(self) -> None:
        self.store.close()


def own_pages(pid: int, pages: PageNumbers) -> Runs:
    """Runs `[first, count]` of the span of sorted `pages` that are present now with a
    page of their own (not the shared zero page): one PAGEMAP_SCAN walk (frozen)."""
    if not pages.size:
        return empty_runs()
    sc = uffd.PagemapScanner(pid)
    try:
        got = sc.scan(
            int(pages[0]) << PAGE_SHIFT,
            (int(pages[-1]) + 1) << PAGE_SHIFT,
            mask=uffd.PAGE_IS_PRESENT | uffd.PAGE_IS_PFNZERO,
            inverted=uffd.PAGE_IS_PFNZERO,
            returns=uffd.PAGE_IS_PRESENT,
        )
        first = got[:, 0] >> np.uint64(PAGE_SHIFT)
        count = (got[:, 1] - got[:, 0]) >> np.uint64(PAGE_SHIFT)
        return np.stack((first, count), axis=1).astype(np.uint64)
    finally:
        sc.close()


def take(
    pid: int,
    pages: PageNumbers,
    maps: Sequence[Mapping],
    store: BackupStore,
    deadline: float,
    readv: ReadvFn = sys_readv,
) -> LiveBackup:
    """Read live the private anonymous pages of sorted `pages` that are present and
    exclusive (see the module), in chunks until `deadline`; the rest is left to the
    frozen backup. The caller cleared its tracker before this call."""
    t0 = time.perf_counter()
    pages = pages[_anon_private(pages, maps)]
    got_pages: list[PageNumbers] = []
    got_addr: list[U64] = []
    with PagemapReader(pid) as pm:
        for a in range(0, int(pages.size), CHUNK_PAGES):
            if time.monotonic() >= deadline:
                break
            p = pages[a : a + CHUNK_PAGES]
            w = pm.words_of(p)
            present = (w & PM_PRESENT) != 0
            read = present & ((w & PM_EXCLUSIVE) != 0)
            absent = (w & (PM_PRESENT | PM_SWAPPED)) == 0
            rp = p[read]
            addr = np.zeros(p.size, dtype=np.uint64)
            if rp.size:
                base = store.take(int(rp.size) * PAGE_SIZE)
                local_addr = base + np.arange(rp.size, dtype=np.uint64) * PAGE_SIZE
                if not _read(pid, rp, local_addr, readv):
                    continue  # a page went away under the read: all of this chunk frozen
                addr[read] = local_addr
            keep = read | absent
            got_pages.append(p[keep])
            got_addr.append(addr[keep])
    lp = np.concatenate(got_pages) if got_pages else empty_pages()
    la = np.concatenate(got_addr) if got_addr else np.zeros(0, dtype=np.uint64)
    live = LiveBackup(lp, la, _covering(lp, maps), store, time.perf_counter() - t0)
    fields = {
        "pid": pid,
        "pages": int(lp.size),
        "bytes": live.nbytes,
        "of_pages": int(pages.size),
        "ms": round(live.seconds * 1e3, 3),
    }
    log.info("live backup", extra={"fields": fields})
    return live


def _read(pid: int, pages: PageNumbers, local: U64, readv: ReadvFn) -> bool:
    """Read sorted `pages` into `local` (page addresses), one iovec pair per run of
    consecutive pages; False when any byte could not be read."""
    brk = np.flatnonzero(np.diff(pages) != 1) + 1
    first = np.concatenate(([0], brk)).astype(np.int64)
    n = np.diff(np.concatenate((first, [pages.size]))).astype(np.uint64)
    length = n * np.uint64(PAGE_SIZE)
    remote = np.stack((pages[first] << np.uint64(PAGE_SHIFT), length), axis=1).astype(np.uint64)
    loc = np.stack((local[first], length), axis=1).astype(np.uint64)
    failed = False

    def short(_j: int, _into: int) -> None:
        nonlocal failed
        failed = True

    transfer(readv, pid, np.ascontiguousarray(remote), np.ascontiguousarray(loc), READ, short)
    return not failed
