"""The `hash` tracker: per-page digests from the last capture; changed = digest differs
or page newly present. Works on any kernel and any mapping we can read.

Memory, bounded and stated: the table holds 24 bytes per tracked present page (8-byte page
number + 16-byte digest), i.e. 0.59% of the tracked resident memory (6 MiB per GiB), plus
one staging buffer of at most `batch_bytes` (default 64 MiB) while collecting. Digests are
128-bit (two 64-bit multiply-mix lanes, nodeagent/_native.c), computed for a whole batch
in one native call without the GIL; the odds that a changed page keeps its digest are
~2^-128 for non-adversarial data (it is the process's own memory).

Cost: collect reads every present page of the tracked mappings while the target is
frozen, so its frozen time is that of a full copy; what it saves is upload and storage.
Prefer uffd-wp or soft-dirty where the kernel has them.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from cpcoord.errors import TrackerFailed
from cpcoord.ranges import PAGE_SIZE
from nodeagent._native import page_digests
from nodeagent.pages import PageNumbers, empty_pages
from nodeagent.proc.freeze import FrozenProcess
from nodeagent.proc.pagemap import PagemapReader
from nodeagent.proc.procfs import Mapping, ProcessIdentity
from nodeagent.proc.reader import MemoryReader
from nodeagent.proc.staging import Staging
from nodeagent.trackers.base import ChangedSet

Digests = npt.NDArray[np.uint64]  # (n, 2)
DEFAULT_BATCH = 64 << 20


class HashTracker:
    """Tracker backend `hash` (see module docstring)."""

    name = "hash"

    def __init__(self, batch_bytes: int = DEFAULT_BATCH) -> None:
        self._batch_pages = max(1, batch_bytes // PAGE_SIZE)
        self._seed = secrets.randbits(64)  # per tracker: digests mean nothing elsewhere
        self._pages: PageNumbers = empty_pages()
        self._digests: Digests = np.zeros((0, 2), dtype=np.uint64)
        self._staging: Staging | None = None

    @property
    def table_bytes(self) -> int:
        return int(self._pages.nbytes + self._digests.nbytes)

    def arm(
        self, fp: FrozenProcess, mappings: Sequence[Mapping], maps: Sequence[Mapping] | None = None
    ) -> None:
        self._pages, self._digests = self._scan(fp, mappings)

    def collect(
        self, fp: FrozenProcess, mappings: Sequence[Mapping], maps: Sequence[Mapping] | None = None
    ) -> ChangedSet:
        pages, digests = self._scan(fp, mappings)
        old_p, old_d = self._pages, self._digests
        idx = np.searchsorted(old_p, pages)
        known = idx < old_p.size
        known[known] = old_p[idx[known]] == pages[known]
        changed = ~known
        same_digest = np.all(old_d[idx[known]] == digests[known], axis=1)
        changed[np.flatnonzero(known)[~same_digest]] = True
        self._pages, self._digests = pages, digests
        return ChangedSet(pages[changed])

    def forget(self, fp: FrozenProcess | None) -> None:
        self._pages = empty_pages()
        self._digests = np.zeros((0, 2), dtype=np.uint64)
        if self._staging is not None:
            self._staging.close()
            self._staging = None

    def save_state(self) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
        """The seed and the digest table (nodeagent/trackers/persist.py)."""
        return {"seed": self._seed}, {"pages": self._pages, "digests": self._digests}

    def load_state(
        self, ident: ProcessIdentity, meta: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]
    ) -> None:
        """Take over a saved table; TrackerFailed when it is damaged."""
        try:
            seed = int(meta["seed"])
            pages = np.asarray(arrays["pages"])
            digests = np.asarray(arrays["digests"])
        except (KeyError, TypeError, ValueError):
            raise TrackerFailed(self.name, ident.pid, "saved digest table is incomplete") from None
        ok = (
            0 <= seed < 1 << 64
            and pages.dtype == np.uint64
            and digests.dtype == np.uint64
            and pages.ndim == 1
            and digests.shape == (pages.size, 2)
            and bool(np.all(pages[1:] > pages[:-1]))
        )
        if not ok:
            raise TrackerFailed(self.name, ident.pid, "saved digest table is damaged")
        self._seed, self._pages, self._digests = seed, pages, digests

    def _scan(self, fp: FrozenProcess, mappings: Sequence[Mapping]) -> tuple[PageNumbers, Digests]:
        """Present pages of the readable private mappings, and their digests now.

        Shared mappings are left out: they count as changed at every capture anyway
        (changeset.always_changed_runs), and their pages in this process's tables say
        nothing about the object. The reads follow the capture's rule (reader.py): a
        page not exclusively mapped is read through /proc/PID/mem, never pinned, so
        hashing a forked process does not unshare its memory."""
        with PagemapReader(fp.pid) as pm:
            parts = [pm.taken(m.start, m.end) for m in mappings if m.readable and not m.shared]
        pages = np.concatenate(parts) if parts else empty_pages()
        pages = np.unique(pages)  # mappings may be given unsorted
        digests = np.zeros((pages.size, 2), dtype=np.uint64)
        if pages.size == 0:
            return pages, digests
        if self._staging is None:
            self._staging = Staging(min(pages.size, self._batch_pages) * PAGE_SIZE)
        staging = self._staging
        staging.reserve(min(pages.size, self._batch_pages) * PAGE_SIZE)
        reader = MemoryReader(fp.pid)
        unreadable: list[PageNumbers] = []
        try:
            for lo in range(0, pages.size, self._batch_pages):
                batch = pages[lo : lo + self._batch_pages]
                stats = reader.read_pages(batch, staging.address)
                if stats.unreadable.size:
                    unreadable.append(stats.unreadable)
                buf = staging.pages(0, batch.size)
                page_digests(buf, PAGE_SIZE, self._seed, digests[lo : lo + batch.size])
        finally:
            reader.close()
        if unreadable:
            # A page we cannot read has no digest: leave it out, so if it ever becomes
            # readable it counts as newly present (changed).
            keep = ~np.isin(pages, np.concatenate(unreadable))
            pages, digests = pages[keep], digests[keep]
        return pages, digests
