"""The uffd-wp tracker: userfaultfd write-protect (async mode) registered inside the target.

arm: by syscall injection the target opens a userfaultfd (`O_CLOEXEC | O_NONBLOCK |
UFFD_USER_MODE_ONLY`), moves it to a high number (F_DUPFD_CLOEXEC near the top of its
RLIMIT_NOFILE soft limit, at most `HIGH_FD_CEILING`: out of the way of a program that
counts on its own fd numbers) and closes the low one: three injected system calls,
whatever the number of mappings. The agent then takes a copy of that fd (pidfd_getfd),
enables WP_ASYNC | WP_UNPOPULATED with UFFDIO_API and registers the tracked mappings in WP
mode itself, one UFFDIO_REGISTER per *span* (nodeagent/trackers/uffd_spans.py): userfaultfd
ioctls act on the mm the fd was made in. Then it write-protects every present or swapped
page with PAGEMAP_SCAN, one walk per span (holes get no pte markers, so a page that
becomes present later is never protected and always counts as written).
collect: the agent alone, per span: a cheap probe finds VMAs not (or no longer)
registered — new mmaps, munmap + mmap at the same place, moved mappings — which are
registered then (through the agent's copy of the fd; stale WP bits cleared, so all their
pages are reported); PAGEMAP_SCAN with PAGE_IS_WRITTEN, PM_SCAN_WP_MATCHING |
PM_SCAN_CHECK_WPASYNC then reports the written pages and protects them again in the
same walk.
forget: inject close(fd). Mappings that cannot be registered are *untracked*: listed with
the reason, and by default all their present pages count as changed.

With `registration="self"` the process registers its own memory (cpcoord.client_uffd) and
nothing is ever injected. What the target sees, limits and costs: docs/uffd-wp.md.

This module owns the sequence; its parts: opening the uffd in the target (uffd_open),
spans (uffd_spans), registering them and the untracked record (uffd_register), the scans
(uffd_scans, the written pages of a collect too), whether the kernel can do it at all (uffd_avail).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cpcoord.errors import (
    CpcoordError,
    InjectionFailed,
    NoSuchProcess,
    ProcessExited,
    TrackerUnavailable,
    UffdLost,
)
from cpcoord.ranges import AddressRange
from nodeagent.proc import uffd
from nodeagent.proc.freeze import FrozenProcess
from nodeagent.proc.inject import Injector
from nodeagent.proc.mapscache import derived
from nodeagent.proc.procfs import Mapping, ProcessIdentity, read_maps
from nodeagent.trackers import uffd_avail
from nodeagent.trackers.base import ChangedSet
from nodeagent.trackers.uffd_open import open_uffd
from nodeagent.trackers.uffd_register import Misses, key_of, register, unregistered_mappings
from nodeagent.trackers.uffd_scans import all_registered, protect, unregistered, written
from nodeagent.trackers.uffd_spans import (
    Inside,
    RemoteUffd,
    Spans,
    spans_of,
    trackable,
)

log = logging.getLogger(__name__)


__all__ = ["CollectStats", "UffdWpTracker", "trackable"]


@dataclass(frozen=True)
class CollectStats:
    """What one arm/collect did, for logs and benchmarks."""

    seconds: float
    probe_seconds: float
    inject_seconds: float  # arm: the injection; collect: registering new ranges
    scan_seconds: float
    registered: int  # ranges registered in this call
    scan_calls: int
    pages: int
    spans: int = 0


class UffdWpTracker:
    """One member's uffd-wp tracker (state: the target's uffd number and inode)."""

    name = "uffd-wp"

    def __init__(
        self,
        *,
        untracked_as_changed: bool = True,
        registration: str = "inject",  # or "self": the process registers (client_uffd)
        site: str = "auto",
    ) -> None:
        if registration not in ("inject", "self"):
            raise ValueError(f"registration must be 'inject' or 'self', not {registration!r}")
        self.untracked_as_changed = untracked_as_changed
        self.registration = registration
        self._site = site
        self._ident: ProcessIdentity | None = None
        self._fd = -1
        self._inode = 0
        self._miss = Misses()  # mappings that could not be registered
        self._scanner: uffd.PagemapScanner | None = None
        self.last: CollectStats | None = None
        # Whether the last arm/collect registered a range: that may merge or split VMAs,
        # so a caller holding the maps must read them again.
        self.layout_touched = False

    # -- state -------------------------------------------------------------------

    @property
    def fd(self) -> int | None:
        """The uffd's number in the target, while armed."""
        return self._fd if self._ident is not None and self._fd >= 0 else None

    @property
    def untracked(self) -> dict[AddressRange, str]:
        """Mappings that could not be registered, with the reason (hash/always changed)."""
        return {AddressRange(k[0], k[1]): why for k, why in self._miss.untracked.items()}

    def _fd_is_ours(self, pid: int) -> bool:
        try:
            return os.stat(f"/proc/{pid}/fd/{self._fd}").st_ino == self._inode
        except OSError:
            return False

    def _drop(self) -> None:
        if self._scanner is not None:
            self._scanner.close()
        self._ident, self._fd, self._inode, self._scanner = None, -1, 0, None
        self._miss = Misses()

    def _spans(self, maps: Sequence[Mapping], tracked: Sequence[Mapping]) -> Spans:
        join = self.registration == "inject"
        return spans_of(maps, tracked, join=join, barriers=self._miss.barriers())

    # -- arm -----------------------------------------------------------------------

    def arm(
        self, fp: FrozenProcess, mappings: Sequence[Mapping], maps: Sequence[Mapping] | None = None
    ) -> None:
        """Arm on `mappings`; `maps` are the process's whole maps they come from (read
        here when not given: spans must know what lies between tracked mappings)."""
        avail = uffd_avail.availability()
        if not avail.available:
            raise TrackerUnavailable(self.name, avail.reason)
        t0 = time.perf_counter()
        self.layout_touched = False
        layout = read_maps(fp.pid) if maps is None else maps
        tracked = _trackable(mappings)
        if self.registration == "self":
            self._drop()
            self._ident, self._scanner = fp.ident, uffd.PagemapScanner(fp.pid)
            inside = Inside(layout)
            sp = self._verify(self._spans(layout, tracked), inside, layout, tracked)
            protect(self._sc(), sp)
            t1 = time.perf_counter()
            self.last = CollectStats(t1 - t0, 0.0, 0.0, t1 - t0, 0, self._scanner.calls, 0, len(sp))
            return
        stale = self._fd if self._ident == fp.ident and self._fd_is_ours(fp.pid) else -1
        self._drop()
        with Injector(fp, site=self._site) as inj:
            if stale >= 0:
                inj.syscall(uffd.NR_CLOSE, stale)
            fd = open_uffd(inj, self.name)
            try:
                with RemoteUffd(fp.pid, fd) as ru:
                    err = ru.api(uffd.wanted_features())
                    if err:
                        why = f"UFFDIO_API in pid {fp.pid}: {os.strerror(err)}"
                        raise TrackerUnavailable(self.name, why)
                    inode = ru.inode
                    sp = self._spans(layout, tracked)
                    inside = Inside(layout)
                    pairs = sp.pairs()
                    self.layout_touched = self.layout_touched or bool(pairs)
                    registered = register(ru, pairs, inside, self._miss, unprotect=False)
            except BaseException:
                inj.syscall(uffd.NR_CLOSE, fd)
                raise
            calls = inj.calls
        t1 = time.perf_counter()
        self._ident, self._fd, self._inode = fp.ident, fd, inode
        try:
            self._scanner = uffd.PagemapScanner(fp.pid)
            sp = self._verify(self._spans(layout, tracked), inside, layout, tracked)
            protect(self._sc(), sp)
        except BaseException:
            # Not armed: a caller that drops this tracker (the `auto` fallback) would
            # leave the fd open in the target for good.
            with contextlib.suppress(CpcoordError, OSError):
                self.forget(fp)
            raise
        t2 = time.perf_counter()
        self.last = CollectStats(
            t2 - t0, 0.0, t1 - t0, t2 - t1, registered, self._scanner.calls, 0, len(sp)
        )
        log.info(
            "uffd-wp armed",
            extra={
                "fields": {
                    "pid": fp.pid,
                    "fd": fd,
                    "spans": len(sp),
                    "untracked": len(self._miss.untracked),
                    "injected_syscalls": calls,
                    "ms": round((t2 - t0) * 1e3, 3),
                }
            },
        )

    def _sc(self) -> uffd.PagemapScanner:
        assert self._scanner is not None
        return self._scanner

    def _verify(
        self, sp: Spans, inside: Inside, layout: Sequence[Mapping], tracked: Sequence[Mapping]
    ) -> Spans:
        """Spans whose VMAs are not all async-WP registered (registration refused, a PFN
        map that registers but is never walked, a range the process did not register
        itself) are probed mapping by mapping; those mappings become untracked (or
        barriers) and the spans are computed again without them."""
        why = (
            "not registered by the process"
            if self.registration == "self"
            else "not async-WP capable (VM_PFNMAP?)"
        )
        changed = unregistered_mappings(self._sc(), sp, inside, self._miss, why)
        return self._spans(layout, tracked) if changed else sp

    # -- collect ---------------------------------------------------------------------

    def collect(
        self, fp: FrozenProcess, mappings: Sequence[Mapping], maps: Sequence[Mapping] | None = None
    ) -> ChangedSet:
        t0 = time.perf_counter()
        if self._ident != fp.ident or self._scanner is None:
            raise UffdLost(fp.pid, "not armed on this process")
        if self.registration == "inject" and not self._fd_is_ours(fp.pid):
            fd = self._fd
            self._drop()
            raise UffdLost(fp.pid, f"fd {fd} was closed or replaced in the target")
        calls0 = self._scanner.calls
        self._scanner.reset()
        self.layout_touched = False
        layout = read_maps(fp.pid) if maps is None else maps
        tracked = _trackable(mappings)
        self._miss.prune(layout, tracked)
        if self.registration == "self":
            # Registered by the process since: tracked from now on. The process never
            # protects pages itself, so the scan below reports every page it holds.
            for m in tracked:
                k = key_of(m)
                if k in self._miss.untracked and all_registered(self._sc(), m.start, m.end):
                    del self._miss.untracked[k]
        sp = self._spans(layout, tracked)
        new = unregistered(self._sc(), sp)
        t1 = time.perf_counter()
        registered = 0
        inside = Inside(layout)
        if new and self.registration == "inject":
            with RemoteUffd(fp.pid, self._fd, self._inode) as ru:
                self.layout_touched = True
                registered = register(ru, new, inside, self._miss, unprotect=True)
        if new:
            # Whatever is still not async-WP capable (a failed registration, a PFN map
            # the probe cannot see) is untracked, before any WP scan could fail half-way.
            sp = self._verify(self._spans(layout, tracked), inside, layout, tracked)
        t2 = time.perf_counter()
        miss = self._miss.untracked
        always = [m for m in tracked if key_of(m) in miss] if miss else []
        pages = written(self._sc(), sp.pairs(), always if self.untracked_as_changed else ())
        t3 = time.perf_counter()
        self.last = CollectStats(
            t3 - t0,
            t1 - t0,
            t2 - t1,
            t3 - t2,
            registered,
            self._scanner.calls - calls0,
            int(pages.size),
            len(sp),
        )
        log.debug(
            "uffd-wp collected",
            extra={
                "fields": {
                    "pid": fp.pid,
                    "pages": int(pages.size),
                    "spans": len(sp),
                    "new_ranges": len(new),
                    "ms": round((t3 - t0) * 1e3, 3),
                }
            },
        )
        return ChangedSet(pages)

    # -- saved state (nodeagent/trackers/persist.py) -------------------------------

    def save_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """What a later process needs to collect through the same uffd (which stays open
        in the target): its number and inode, the registration mode, untracked mappings."""
        if self._ident is None:
            return {"armed": False}, {}
        meta = {
            "armed": True,
            "fd": self._fd,
            "inode": self._inode,
            "registration": self.registration,
            "untracked_as_changed": self.untracked_as_changed,
            **self._miss.to_meta(),
        }
        return meta, {}

    def load_state(self, ident: ProcessIdentity, meta: dict[str, Any], arrays: object) -> None:
        """Take over a saved state for `ident`. Raises UffdLost unless the fd still is
        that userfaultfd in that process (link `anon_inode:[userfaultfd]`, same inode)."""
        self._drop()
        if not meta.get("armed"):
            raise UffdLost(ident.pid, "the saved state was never armed")
        fd, inode = int(meta["fd"]), int(meta["inode"])
        path = f"/proc/{ident.pid}/fd/{fd}"
        try:
            link, ino = os.readlink(path), os.stat(path).st_ino
        except OSError:
            raise UffdLost(ident.pid, f"fd {fd} is closed in the target") from None
        if link != "anon_inode:[userfaultfd]" or ino != inode:
            raise UffdLost(ident.pid, f"fd {fd} is no longer our userfaultfd ({link})")
        self.registration = str(meta.get("registration", "inject"))
        self.untracked_as_changed = bool(meta.get("untracked_as_changed", True))
        self._miss = Misses.from_meta(meta)
        self._ident, self._fd, self._inode = ident, fd, inode
        self._scanner = uffd.PagemapScanner(ident.pid)

    # -- writing tracked pages ----------------------------------------------------

    def writer_handle(self, fp: FrozenProcess) -> RemoteUffd | None:
        """The target's uffd, for a caller about to write tracked pages itself (a
        restore): `unprotect(lo, hi)` drops their write protection in one call per range
        instead of a fault per page (the next collect reports them written, as the write
        would). None when it cannot (the pages then fault as they are written)."""
        if self.registration != "inject" or self._ident != fp.ident:
            return None
        try:
            return RemoteUffd(fp.pid, self._fd, self._inode)
        except (CpcoordError, OSError):
            return None

    # -- forget ------------------------------------------------------------------

    def forget(self, fp: FrozenProcess | None) -> None:
        """Close the target's uffd (unregistering everything); nothing if it is gone."""
        ident, fd = self._ident, self._fd
        ours = (
            self.registration == "inject"
            and fp is not None
            and ident == fp.ident
            and self._fd_is_ours(fp.pid)
        )
        self._drop()
        if fp is None or not ours:
            return
        try:
            with Injector(fp, site=self._site) as inj:
                inj.syscall(uffd.NR_CLOSE, fd)
        except (ProcessExited, NoSuchProcess):
            return
        except InjectionFailed as e:
            if fp.ident.alive():
                raise
            log.info(
                "uffd-wp forget: target gone", extra={"fields": {"pid": fp.pid, "error": str(e)}}
            )


@derived
def _trackable(mappings: Sequence[Mapping]) -> list[Mapping]:
    return [m for m in mappings if trackable(m)]
