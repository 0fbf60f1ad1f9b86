"""A restore's prefetch, agent side: what to download before the freeze, what is kept
until the Restore, the few pages to fetch once frozen, and the tracker afterwards.

The pages a rollback to generation N must write are those that differ between N and the
member's tracker base L (its latest committed capture; the coordinator compares the
manifests and sends them in the Prepare) and those written since L (`written_since_base`:
the tracker's non-clearing peek, with the same rules a capture uses for what counts as
changed, plus pages present at L's capture and gone now). Every other page holds L's
bytes, which equal N's. The prefetch downloads that *scope* while the member runs; once
frozen, `top_up` peeks again and fetches the pages written in between (normally few).
The write then touches only the scope (RegionContents.scope).

Afterwards the tracker stays armed, nothing re-protected: the member's next capture is
still relative to L, and the pages the restore wrote are recorded as pending under L
(`after_partial`), so that capture delivers them whatever the tracker saw of a write
from outside the process. A member without such a tracker (hash, none, lost track, a
base the agent does not hold, a layout changed since L) gets scope None: every page is
prefetched and written, and its next capture is full (tracking.after_restore).

Prefetched contents are kept per (job, generation, member) in `Prefetches` until the
Restore takes them, an Abort drops them, or a newer session replaces them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from cpcoord.gen.v1 import agent_pb2, types_pb2
from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE
from nodeagent.capture import copyout
from nodeagent.capture.changeset import written_pages
from nodeagent.capture.trackstate import tracked_mappings
from nodeagent.daemon.membership import HeldMember
from nodeagent.pages import (
    PageNumbers,
    empty_pages,
    in_sorted,
    pages_from_runs,
    runs_from_pages,
    union_sorted,
)
from nodeagent.proc.procfs import read_maps
from nodeagent.proc.shared import SharedObjects
from nodeagent.restore.apply import RegionContents
from nodeagent.trackers.base import ChangedSet

log = logging.getLogger(__name__)
U64 = npt.NDArray[np.uint64]
Scope = dict[str, U64]  # region name -> page offsets (sorted) the restore writes
Contents = tuple[RegionContents, ...]
# A download of the member's generation: only the scope's pages, or every page (None)
Fetch = Callable[[Scope | None], Contents]


@dataclass(frozen=True)
class Prefetched:
    job: str
    generation: int
    member: str
    epoch: int
    contents: Contents
    scope: Scope | None  # None: every page (no usable tracker)
    base: int  # the tracker base the scope is relative to (0 with scope None)
    bytes: int  # page bytes downloaded
    read_path: str = "coordinator"  # or "direct" (the agent read the store itself)


class Prefetches:
    """What Prepares fetched, until the Restore takes it (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[str, int, str], Prefetched] = {}

    def put(self, p: Prefetched) -> None:
        with self._lock:
            self._items[(p.job, p.generation, p.member)] = p

    def take(self, job: str, generation: int, member: str, epoch: int) -> Prefetched | None:
        with self._lock:
            p = self._items.pop((job, generation, member), None)
        return p if p is not None and p.epoch == epoch else None

    def peek(self, job: str, generation: int, member: str, epoch: int) -> Prefetched | None:
        """What `take` would return, left in place."""
        with self._lock:
            p = self._items.get((job, generation, member))
        return p if p is not None and p.epoch == epoch else None

    def members(self, job: str, generation: int) -> tuple[str, ...]:
        with self._lock:
            return tuple(k[2] for k in self._items if k[:2] == (job, generation))

    def drop(self, job: str, generation: int) -> None:
        with self._lock:
            for k in [k for k in self._items if k[:2] == (job, generation)]:
                del self._items[k]

    def drop_stale(self, epoch: int) -> None:
        """A new session: what older ones fetched is of restores that are over."""
        with self._lock:
            self._items = {k: p for k, p in self._items.items() if p.epoch == epoch}

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def written_since_base(m: HeldMember, base: int) -> PageNumbers | None:
    """Absolute page numbers of the member's regions that may differ from generation
    `base` now; None when the tracker cannot tell. On the ptrace thread (the member
    running or frozen); nothing in the target or the tracker changes."""
    return since_base(m, base)[0]


def since_base(
    m: HeldMember, base: int, report_only: bool = False
) -> tuple[PageNumbers | None, PageNumbers | None]:
    """`written_since_base`, and the tracker's own report in it (the pages written since
    its last collect); None, None when the tracker cannot tell. `report_only`: the
    caller's scope holds every page already; the first is then empty (not computed)."""
    t = m.track
    if base == 0 or m.committed != base or not t.armed or t.tracker is None:
        return None, None
    t0 = time.perf_counter()
    pid = m.ident.pid
    maps = read_maps(pid)
    specs = copyout.resolve(m.regions, maps)
    if m.unstable(specs, {s.name: (s.start, s.end) for s in specs}).any():
        return None, None
    mine = tracked_mappings(specs, maps)
    written = written_pages(t.tracker, pid, mine)
    if written is None:
        return None, None
    if report_only:
        return empty_pages(), written
    t1 = time.perf_counter()
    with SharedObjects(pid) as objects:
        taken = copyout.select(pid, specs, maps, objects)
    now = np.concatenate(taken) if taken else empty_pages()
    t2 = time.perf_counter()
    changed = t.changes(ChangedSet(written), now, maps, mine, m.pending_pages()).pages
    if t.taken.size == now.size and np.array_equal(t.taken, now):
        gone = empty_pages()  # the common case: one compare, no search over every page
    else:
        gone = t.taken[~in_sorted(t.taken, now)]  # present at the base's capture, absent now
    out = union_sorted(changed, gone)
    t3 = time.perf_counter()
    ms = {"peek_ms": (t1 - t0) * 1e3, "select_ms": (t2 - t1) * 1e3, "mark_ms": (t3 - t2) * 1e3}
    fields = {"member": m.name, "pages": int(out.size), **{k: round(v, 3) for k, v in ms.items()}}
    log.info("written since base", extra={"fields": fields})
    return out, written


def _runs_pages(runs: Iterable[types_pb2.PageRun]) -> U64:
    rs = [(r.offset, r.count) for r in runs]
    if not rs:
        return empty_pages()
    return pages_from_runs(np.array(rs, dtype=np.uint64).reshape(-1, 2))


def _in_region(dirty: PageNumbers, start: int, end: int) -> U64:
    lo, hi = start >> PAGE_SHIFT, end >> PAGE_SHIFT
    i, j = np.searchsorted(dirty, [lo, hi])
    return (dirty[i:j] - np.uint64(lo)).astype(np.uint64)


def scope_of(pm: agent_pb2.PrepareMember, dirty: PageNumbers | None) -> Scope | None:
    """The pages to write per region: those the manifests say differ from the base and
    those written since it; None (every page) without a base or a tracker's answer."""
    if dirty is None or pm.base_generation == 0 or not pm.differs:
        return None
    return {
        r.name: union_sorted(_runs_pages(r.pages), _in_region(dirty, r.start, r.end))
        for r in pm.differs
    }


def page_filter(scope: Scope) -> list[types_pb2.Region]:
    """DownloadRequest.page_filter for a scope."""
    return [
        types_pb2.Region(
            name=name,
            pages=[
                types_pb2.PageRun(offset=int(o), count=int(c))
                for o, c in runs_from_pages(p).tolist()
            ],
        )
        for name, p in scope.items()
    ]


def with_scope(contents: Contents, scope: Scope | None) -> Contents:
    """The contents marked with what to write (a region the scope omits: nothing)."""
    if scope is None:
        return contents
    empty = empty_pages()
    return tuple(replace(c, scope=scope.get(c.name, empty)) for c in contents)


def merge(a: RegionContents, b: RegionContents) -> RegionContents:
    """One region's pages of `a` and of `b` (pages fetched later, for the same region),
    sorted; where both hold a page, `a`'s copy (they are the same generation's).
    Either may hold no page: a region the generation has nothing of, or pages written
    since that the generation does not list (absent at the cut)."""
    if not b.pages.size:
        return a
    pages = np.concatenate((a.pages, b.pages))
    order = np.argsort(pages, kind="stable")
    data = np.concatenate((a.data.reshape(-1, PAGE_SIZE), b.data.reshape(-1, PAGE_SIZE)))[order]
    pages = pages[order]
    keep = np.ones(pages.size, dtype=bool)
    keep[1:] = np.diff(pages) != 0  # b's copy of a page: dropped
    return replace(a, pages=pages[keep], data=data[keep])


def top_up(
    m: HeldMember,
    base: int,
    contents: Contents,
    scope: Scope,
    fetch: Fetch,
    seen: list[PageNumbers | None] | None = None,
) -> tuple[Contents, Scope | None]:
    """Frozen: add the pages written since the prefetch (fetched now; normally few).
    Without the tracker's answer now, every page is fetched (scope None). `seen`, when
    given, gets the tracker's own report in the answer (`since_base`; None: no answer)."""
    # A scope of every page (a full rewrite since) cannot grow: only the tracker's own
    # report is wanted (the live backup's stale pages), not the pages present now.
    whole = all(
        scope.get(c.name, empty_pages()).size == (c.end - c.start) >> PAGE_SHIFT for c in contents
    )
    dirty, raw = since_base(m, base, report_only=whole)
    if seen is not None:
        seen.append(raw)
    if dirty is None:
        return fetch(None), None
    bounds = {c.name: (c.start, c.end) for c in contents}
    extra: Scope = {}
    for name, (start, end) in bounds.items():
        have = scope.get(name, empty_pages())
        d = _in_region(dirty, start, end)
        more = d[~in_sorted(d, have)]
        if more.size:
            extra[name] = more.astype(np.uint64)
    if not extra:
        return contents, scope
    got = {c.name: c for c in fetch(extra)}
    out = tuple(merge(c, got[c.name]) if c.name in got else c for c in contents)
    grown = {n: union_sorted(p, extra.get(n, empty_pages())) for n, p in scope.items()}
    for n in extra.keys() - grown.keys():
        grown[n] = extra[n]
    return out, grown


def absolute(contents: Contents, scope: Scope) -> PageNumbers:
    """The scope as absolute page numbers (sorted)."""
    parts = [scope[c.name] + np.uint64(c.start >> PAGE_SHIFT) for c in contents if c.name in scope]
    return np.sort(np.concatenate(parts)) if parts else empty_pages()


def after_partial(m: HeldMember, contents: Sequence[RegionContents]) -> int:
    """After a partial write: the pages written count as changed for the next capture
    (pending under the base, which stays); the tracker is left armed. Returns how many."""
    parts = [c.scope + np.uint64(c.start >> PAGE_SHIFT) for c in contents if c.scope is not None]
    written = np.sort(np.concatenate(parts), kind="stable") if parts else empty_pages()
    old = m.pending.get(m.committed)
    m.pending[m.committed] = written if old is None else union_sorted(old, written)
    return int(written.size)
