"""Registering a process's spans with the uffd-wp tracker's userfaultfd, and the record of
mappings that could not be registered.

Owns: registering ranges (whole spans, or the unregistered parts of spans) with a mapping-
by-mapping retry where one fails; the check, after registration, that every VMA of a span
is async-WP registered; and `Misses`: tracked mappings that failed (*untracked*: their
pages count as changed) and joinable ones that failed (*blocked*: barriers spans do not
cross), keyed by the whole maps line so a changed mapping is tried again.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nodeagent.proc import uffd
from nodeagent.proc.procfs import Mapping
from nodeagent.trackers.uffd_scans import all_registered
from nodeagent.trackers.uffd_spans import Inside, RemoteUffd, Spans, joinable, trackable

Key = tuple[int, int, str, int, str, int, str]


def key_of(m: Mapping) -> Key:
    return (m.start, m.end, m.perms, m.offset, m.dev, m.inode, m.path)


def _keys(items: Sequence[Sequence[Any]]) -> dict[Key, str]:
    return {
        (int(u[0]), int(u[1]), str(u[2]), int(u[3]), str(u[4]), int(u[5]), str(u[6])): str(u[7])
        for u in items
    }


@dataclass
class Misses:
    """Mappings that could not be registered, with the reason."""

    untracked: dict[Key, str] = field(default_factory=dict)  # tracked mappings
    blocked: dict[Key, str] = field(default_factory=dict)  # joinable mappings

    def note(self, m: Mapping, why: str) -> None:
        (self.untracked if trackable(m) else self.blocked)[key_of(m)] = why

    def barriers(self) -> frozenset[int]:
        return frozenset({k[0] for k in self.untracked} | {k[0] for k in self.blocked})

    def prune(self, layout: Sequence[Mapping], tracked: Sequence[Mapping]) -> None:
        """Forget failures of mappings that are gone or changed (a new line is tried
        again)."""
        if self.untracked:
            now = {key_of(m) for m in tracked}
            self.untracked = {k: v for k, v in self.untracked.items() if k in now}
        if self.blocked:
            now = {key_of(m) for m in layout if joinable(m)}
            self.blocked = {k: v for k, v in self.blocked.items() if k in now}

    def to_meta(self) -> dict[str, list[list[Any]]]:
        return {
            "untracked": [[*k, why] for k, why in self.untracked.items()],
            "blocked": [[*k, why] for k, why in self.blocked.items()],
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Misses:
        return cls(_keys(meta.get("untracked", [])), _keys(meta.get("blocked", [])))


def register(
    ru: RemoteUffd,
    ranges: Sequence[tuple[int, int]],
    inside: Inside,
    misses: Misses,
    *,
    unprotect: bool,
) -> int:
    """Register each range (whole spans, or the unregistered parts of spans); where
    one fails, each mapping in it alone, failures noted in `misses` (untracked for
    tracked mappings, barriers for joinable ones). With `unprotect`, drop stale WP bits
    so the next scan reports every page (a range found unregistered may hold pages
    protected by an earlier uffd). Returns the ranges registered whole."""
    done = 0
    for lo, hi in ranges:
        err = ru.register(lo, hi)
        if err == 0:
            done += 1
            if unprotect:
                ru.unprotect(lo, hi)
            continue
        for m in inside(lo, hi):  # only tracked and joinable mappings lie in a span
            e = ru.register(max(lo, m.start), min(hi, m.end))
            if e == 0:
                if unprotect:
                    ru.unprotect(max(lo, m.start), min(hi, m.end))
                continue
            misses.note(m, f"UFFDIO_REGISTER: {errno.errorcode.get(e, e)}")
    return done


def unregistered_mappings(
    scanner: uffd.PagemapScanner, sp: Spans, inside: Inside, misses: Misses, why: str
) -> bool:
    """Spans whose VMAs are not all async-WP registered (registration refused, a PFN
    map that registers but is never walked, a range the process did not register
    itself) are probed mapping by mapping; those mappings are noted in `misses` with
    `why`. True when any was (the caller then computes its spans again)."""
    changed = False
    for lo, hi in sp.pairs():
        if all_registered(scanner, lo, hi):
            continue
        for m in inside(lo, hi):
            if not all_registered(scanner, m.start, m.end):
                misses.note(m, why)
                changed = True
    return changed
