"""A restore's live backup, agent side: back up while the member runs what a large
rollback will overwrite, so that its freeze reads back only the pages written since.

Owns the two ends around nodeagent/restore/livebackup.py (ptrace thread):
- `before_freeze` (the restore Freeze, member running): when the prefetch's scope is at
  least LIVE_MIN_PAGES and the member's tracker is a pre-copy one (uffd-wp,
  soft-dirty), the tracker is collected in a short freeze: what it had seen since the
  base is recorded as pending under the base first (as after a partial write:
  `written_since_base` and the next capture still count it), and from then on it
  reports every write. Then the scope's pages are read live.
- `mark_stale` (frozen, after the top-up): the pages the tracker reports written since
  that collect, those in ranges it could not register and those dropped since are read
  frozen again (LiveBackup.mark).
- `Unprotect` (frozen, the write's backup thread): the write protection the collect put
  back on the scope is dropped a step ahead of the writes (a fault per page otherwise).
Smaller scopes keep the frozen backup alone: the collect's short freeze would cost more
than the few pages save (the 1% rollback of a GiB backs up 10 MiB in ~3 ms).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import numpy.typing as npt

from cpcoord.errors import CpcoordError
from cpcoord.ranges import PAGE_SIZE
from nodeagent.capture import copyout, precopy
from nodeagent.capture.changeset import ranges_runs
from nodeagent.capture.trackstate import tracked_mappings
from nodeagent.daemon.membership import HeldMember
from nodeagent.pages import PageNumbers, union_sorted
from nodeagent.proc.freeze import FrozenProcess, frozen
from nodeagent.proc.procfs import read_maps
from nodeagent.restore import livebackup
from nodeagent.restore.backup import BackupStore
from nodeagent.restore.livebackup import LiveBackup
from nodeagent.trackers.base import ChangedSet

log = logging.getLogger(__name__)
LIVE_MIN_PAGES = 4096  # 16 MiB
MIN_RUN = 16  # pages: shorter pieces keep their protection (an ioctl costs a few faults)
U64 = npt.NDArray[np.uint64]


def wanted(pages: PageNumbers) -> bool:
    return int(pages.size) >= LIVE_MIN_PAGES


def before_freeze(
    m: HeldMember, pages: PageNumbers, seconds: float, freeze_timeout: float
) -> LiveBackup | None:
    """Collect the member's tracker (short freeze) and read `pages` (sorted, absolute)
    live for at most `seconds`; None when it does not apply (the frozen backup reads
    everything, as without it). Raises like a freeze when the process goes away."""
    t = m.track
    if m.committed == 0 or not t.armed or t.tracker is None or t.name not in precopy.TRACKERS:
        return None
    deadline = time.monotonic() + seconds
    t0 = time.monotonic()
    with frozen(m.ident, freeze_timeout) as fp:
        maps = read_maps(fp.pid)
        mine = tracked_mappings(copyout.resolve(m.regions, maps), maps)
        got = t.collect(fp, mine, maps)
    pause = time.monotonic() - t0
    if not isinstance(got, ChangedSet):
        return None  # lost track (dropped): the top-up then writes every page
    # Owed to the next capture, which is relative to the base (before anything else).
    seen = got.pages
    if seen.size > 1 and not bool(np.all(np.diff(seen.astype(np.int64)) > 0)):
        seen = np.unique(seen)  # (sorted already, from one walk: np.unique costs 0.5 s)
    old = m.pending.get(m.committed)
    m.pending[m.committed] = seen if old is None else union_sorted(old, seen)
    pid = m.ident.view("restore")
    staging = m.staging if m.staging is not None and not m.staging_busy else None
    store = BackupStore(staging)
    try:
        live = livebackup.take(pid, pages, read_maps(pid), store, deadline)
    except BaseException:
        store.close()
        raise
    fields = {"member": m.name, "collect_pause_ms": round(pause * 1e3, 3), "seen": int(seen.size)}
    log.info("restore live backup taken", extra={"fields": fields})
    return live


def mark_stale(
    m: HeldMember, fp: FrozenProcess, live: LiveBackup | None, written: PageNumbers | None
) -> bool:
    """Frozen, after the top-up peeked (`written`: the tracker's report since the
    collect): mark stale what changed since the live read (LiveBackup.mark). False when
    there is no live backup or the tracker could not say (it must not be used then)."""
    if live is None or written is None or m.track.tracker is None or not m.track.armed:
        return False
    untracked = getattr(m.track.tracker, "untracked", None) or {}
    own = livebackup.own_pages(fp.pid, live.pages)
    live.mark(written, own, ranges_runs(list(untracked)))
    return True


class Unprotect:
    """The restore's `ahead` (restore/undo.py) after a live backup: the collect
    write-protected the scope again, and a write into protected pages takes a fault per
    page (1 GiB: ~60 ms more); the backup thread drops the protection of each step's
    pieces (of at least MIN_RUN pages) with one ioctl each, while the step before is
    written (~28 ms per GiB, overlapped). Those pages count as written for the tracker,
    as the write makes them anyway (and they are pending). Close after the write."""

    def __init__(self, m: HeldMember, fp: FrozenProcess) -> None:
        handle = getattr(m.track.tracker, "writer_handle", None)
        self._ru = handle(fp) if handle is not None else None

    def __call__(self, remote: U64) -> None:
        if self._ru is None or not remote.size:
            return
        r = remote[remote[:, 1] >= np.uint64(MIN_RUN * PAGE_SIZE)].astype(np.int64)
        lo = r[:, 0] & ~(PAGE_SIZE - 1)
        hi = (r[:, 0] + r[:, 1] + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        for a, b in zip(lo.tolist(), hi.tolist(), strict=True):  # per piece (32 MiB)
            if self._ru.unprotect(a, b) != 0:
                return  # the rest fault as they are written: slower, the same result

    def close(self) -> None:
        if self._ru is not None:
            self._ru.close()
            self._ru = None


def close(live: LiveBackup | None) -> None:
    if live is not None:
        try:
            live.close()
        except (CpcoordError, OSError) as e:  # freeing only: never the restore's error
            log.warning("live backup close failed", extra={"fields": {"error": str(e)}})
