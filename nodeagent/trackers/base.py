"""The tracker interface and the changed-page set value.

A tracker is armed on a member while it is frozen (right after its full capture), asked
for the changed-page set while it is frozen again (which also re-arms it, in the same
frozen window), and forgotten when the member leaves. Pages are identified by page
number (address >> PAGE_SHIFT) in sorted, unique uint64 NumPy arrays, so sets merge with
vectorised set operations and never with a Python loop per page.

Mapping changes (new, grown, moved, vanished mappings) are not the tracker's business:
the capture layer compares the maps at arm time with the maps now, and counts a new or
changed mapping as fully changed. A tracker only answers for pages of mappings it was
armed on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from nodeagent.pages import PageNumbers
from nodeagent.proc.freeze import FrozenProcess
from nodeagent.proc.procfs import Mapping


@dataclass(frozen=True)
class Availability:
    """Whether a tracker backend works on this kernel, and why not."""

    name: str
    available: bool
    reason: str  # why not, or a short note on what was checked


@dataclass(frozen=True)
class ChangedSet:
    """Page numbers written since the tracker was last armed or collected."""

    pages: PageNumbers

    @staticmethod
    def of(pages: npt.ArrayLike) -> ChangedSet:
        return ChangedSet(np.unique(np.asarray(pages, dtype=np.uint64)))

    def union(self, other: ChangedSet) -> ChangedSet:
        return ChangedSet(np.union1d(self.pages, other.pages).astype(np.uint64))

    def __len__(self) -> int:
        return int(self.pages.size)


class Tracker(Protocol):
    """One backend (soft-dirty, uffd-wp, hash). All calls are made while the target is
    frozen, on the thread that froze it (ptrace binds tracees to a thread).

    Errors: TrackerUnavailable when the backend cannot serve this process at all;
    TrackerFailed when arming or collecting fails (the capture then falls back to a full
    capture of the member and re-arms).
    """

    name: str

    def arm(
        self, fp: FrozenProcess, mappings: Sequence[Mapping], maps: Sequence[Mapping] | None = None
    ) -> None:
        """Start tracking writes to these mappings from now on. `maps`: the process's
        whole maps `mappings` come from, when the caller has them (a tracker may cover
        several mappings with one call when it knows what lies between them)."""
        ...

    def collect(
        self, fp: FrozenProcess, mappings: Sequence[Mapping], maps: Sequence[Mapping] | None = None
    ) -> ChangedSet:
        """Pages of `mappings` written since arm/last collect; re-arms in the same call.

        `mappings` may include mappings not seen at arm time; the tracker starts tracking
        them (their pages count as changed through the capture layer, not through it).
        """
        ...

    def forget(self, fp: FrozenProcess | None) -> None:
        """Stop tracking and release what the target holds for us (e.g. its uffd)."""
        ...
