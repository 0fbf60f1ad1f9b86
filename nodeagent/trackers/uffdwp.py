"""The uffd-wp tracker: userfaultfd write-protect (async mode) registered inside the target.

arm: by syscall injection the target opens a userfaultfd (WP_ASYNC | WP_UNPOPULATED) and
registers the mappings in WP mode, keeping the fd; the agent then write-protects every
present or swapped page with PAGEMAP_SCAN (holes get no pte markers, so a page that
becomes present later is never protected and always counts as written).
collect: the agent alone. A cheap probe finds mappings not (or no longer) registered —
new mmaps, munmap + mmap at the same place, moved mappings — which are registered then
(one injection, stale WP bits cleared, so all their pages are reported); PAGEMAP_SCAN
with PAGE_IS_WRITTEN, PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC then reports the
written pages and protects them again in the same walk.
forget: inject close(fd). Mappings that cannot be registered are *untracked*: listed with
the reason, and by default all their present pages count as changed.

With `registration="self"` the process registers its own memory (cpcoord.client_uffd) and
nothing is ever injected. What the target sees, limits and costs: docs/uffd-wp.md.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cpcoord.errors import (
    InjectionFailed,
    NoSuchProcess,
    ProcessExited,
    TrackerUnavailable,
    UffdLost,
    UffdScanFailed,
)
from cpcoord.ranges import AddressRange
from nodeagent import uffd
from nodeagent.freeze import FrozenProcess
from nodeagent.inject import Injector
from nodeagent.procfs import Mapping, ProcessIdentity
from nodeagent.trackers.base import ChangedSet

log = logging.getLogger(__name__)

_Key = tuple[int, int, str, int, str, int, str]
_Run = tuple[int, int, tuple[Mapping, ...]]  # start, end, the adjacent mappings it spans


def _key(m: Mapping) -> _Key:
    return (m.start, m.end, m.perms, m.offset, m.dev, m.inode, m.path)


_SPECIAL = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]")


def trackable(m: Mapping) -> bool:
    """Only writable mappings can change through the process's own writes. A mapping made
    writable later (mprotect) gets a new maps line: a changed mapping for the capture
    layer, registered by the collect that first sees it writable."""
    return m.writable and m.path not in _SPECIAL


def runs_of(mappings: Sequence[Mapping]) -> list[_Run]:
    """Merge address-adjacent mappings into runs: one ioctl covers each run."""
    runs: list[_Run] = []
    for m in sorted(mappings, key=lambda m: m.start):
        if runs and runs[-1][1] == m.start:
            s, _, ms = runs[-1]
            runs[-1] = (s, m.end, (*ms, m))
        elif runs and m.start < runs[-1][1]:
            raise ValueError(f"mappings overlap at 0x{m.start:x}")
        else:
            runs.append((m.start, m.end, (m,)))
    return runs


@dataclass(frozen=True)
class CollectStats:
    """What one arm/collect did, for logs and benchmarks."""

    seconds: float
    probe_seconds: float
    inject_seconds: float
    scan_seconds: float
    registered: int  # ranges registered in this call
    scan_calls: int
    pages: int


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
        self._untracked: dict[_Key, str] = {}  # mapping -> why registration failed
        self._scanner: uffd.PagemapScanner | None = None
        self.last: CollectStats | None = None

    # -- state -------------------------------------------------------------------

    @property
    def fd(self) -> int | None:
        """The uffd's number in the target, while armed."""
        return self._fd if self._ident is not None and self._fd >= 0 else None

    @property
    def untracked(self) -> dict[AddressRange, str]:
        """Mappings that could not be registered, with the reason (hash/always changed)."""
        return {AddressRange(k[0], k[1]): why for k, why in self._untracked.items()}

    def _fd_is_ours(self, pid: int) -> bool:
        try:
            return os.stat(f"/proc/{pid}/fd/{self._fd}").st_ino == self._inode
        except OSError:
            return False

    def _drop(self) -> None:
        if self._scanner is not None:
            self._scanner.close()
        self._ident, self._fd, self._inode, self._scanner = None, -1, 0, None
        self._untracked = {}

    # -- arm -----------------------------------------------------------------------

    def arm(self, fp: FrozenProcess, mappings: Sequence[Mapping]) -> None:
        avail = uffd.availability()
        if not avail.available:
            raise TrackerUnavailable(self.name, avail.reason)
        t0 = time.perf_counter()
        mappings = [m for m in mappings if trackable(m)]
        runs = runs_of(mappings)
        if self.registration == "self":
            self._drop()
            self._ident, self._scanner = fp.ident, uffd.PagemapScanner(fp.pid)
            self._mark_unregistered(runs)
            self._protect(mappings)
            t1 = time.perf_counter()
            self.last = CollectStats(t1 - t0, 0.0, 0.0, t1 - t0, 0, self._scanner.calls, 0)
            return
        stale = self._fd if self._ident == fp.ident and self._fd_is_ours(fp.pid) else -1
        self._drop()
        with Injector(fp, site=self._site) as inj:
            if stale >= 0:
                inj.syscall(uffd.NR_CLOSE, stale)
            fd = self._open_uffd(inj)
            try:
                registered = self._register(inj, fd, runs, unprotect=False)
            except BaseException:
                inj.syscall(uffd.NR_CLOSE, fd)
                raise
            calls = inj.calls
        t1 = time.perf_counter()
        self._ident, self._fd = fp.ident, fd
        self._inode = os.stat(f"/proc/{fp.pid}/fd/{fd}").st_ino
        self._scanner = uffd.PagemapScanner(fp.pid)
        self._protect(mappings)
        t2 = time.perf_counter()
        self.last = CollectStats(t2 - t0, 0.0, t1 - t0, t2 - t1, registered, self._scanner.calls, 0)
        log.info(
            "uffd-wp armed",
            extra={
                "fields": {
                    "pid": fp.pid,
                    "fd": fd,
                    "runs": len(runs),
                    "untracked": len(self._untracked),
                    "injected_syscalls": calls,
                    "ms": round((t2 - t0) * 1e3, 3),
                }
            },
        )

    def _protect(self, mappings: Sequence[Mapping]) -> None:
        """Write-protect every present or swapped page of the tracked mappings."""
        flags = uffd.PM_SCAN_WP_MATCHING | uffd.PM_SCAN_CHECK_WPASYNC
        for start, end, _ in self._tracked_runs(mappings):
            self._scan(start, end, flags=flags, anyof=uffd.PAGE_TAKEN, returns=uffd.PAGE_TAKEN)

    def _mark_unregistered(self, runs: Sequence[_Run]) -> None:
        why = (
            "not registered by the process"
            if self.registration == "self"
            else "not async-WP capable (VM_PFNMAP?)"
        )
        for start, end, ms in runs:
            if self._all_registered(start, end):
                continue
            for m in ms:
                if _key(m) not in self._untracked and not self._all_registered(m.start, m.end):
                    self._untracked[_key(m)] = why

    def _open_uffd(self, inj: Injector) -> int:
        flags = uffd.O_CLOEXEC | uffd.O_NONBLOCK | uffd.UFFD_USER_MODE_ONLY
        fd = inj.syscall(uffd.NR_USERFAULTFD, flags)
        if fd < 0:
            why = f"userfaultfd() in pid {inj.pid}: {os.strerror(-fd)}"
            if -fd in (errno.EPERM, errno.ENOSYS, errno.EINVAL):
                raise TrackerUnavailable(self.name, why)
            raise InjectionFailed(inj.pid, "userfaultfd", os.strerror(-fd))
        addr = inj.scratch()
        api = uffd.UffdioApi(uffd.UFFD_API, uffd.wanted_features(), 0)
        inj.write(addr, bytes(api))
        r = inj.syscall(uffd.NR_IOCTL, fd, uffd.UFFDIO_API, addr)
        if r < 0:
            inj.syscall(uffd.NR_CLOSE, fd)
            raise TrackerUnavailable(self.name, f"UFFDIO_API in pid {inj.pid}: {os.strerror(-r)}")
        return fd

    def _register(self, inj: Injector, fd: int, runs: Sequence[_Run], *, unprotect: bool) -> int:
        """Register each run, or each of its mappings where the run fails; failures become
        untracked. With `unprotect`, drop stale WP bits so the next scan reports every
        page (a range found unregistered may hold pages protected by an earlier uffd)."""
        addr = inj.scratch()

        def attempt(s: int, e: int) -> int:
            inj.write(addr, bytes(uffd.UffdioRegister(s, e - s, uffd.UFFDIO_REGISTER_MODE_WP, 0)))
            r = inj.syscall(uffd.NR_IOCTL, fd, uffd.UFFDIO_REGISTER, addr)
            if r == 0 and unprotect:
                inj.write(addr, bytes(uffd.UffdioWriteprotect(s, e - s, 0)))
                r = inj.syscall(uffd.NR_IOCTL, fd, uffd.UFFDIO_WRITEPROTECT, addr)
            return -r

        done = 0
        for start, end, ms in runs:
            err = attempt(start, end)
            if err == 0:
                done += 1
                continue
            for m in ms:
                if len(ms) > 1:
                    err = attempt(m.start, m.end)
                if err == 0:
                    done += 1
                else:
                    self._untracked[_key(m)] = f"UFFDIO_REGISTER: {errno.errorcode.get(err, err)}"
        return done

    def _tracked_runs(self, mappings: Sequence[Mapping]) -> list[_Run]:
        return runs_of([m for m in mappings if _key(m) not in self._untracked])

    # -- collect ---------------------------------------------------------------------

    def _scan(self, start: int, end: int, **kw: int) -> uffd.Regions:
        assert self._scanner is not None
        try:
            return self._scanner.scan(start, end, **kw)
        except OSError as e:
            raise UffdScanFailed(self._scanner.pid, f"0x{start:x}-0x{end:x}", e.strerror) from None

    def _all_registered(self, start: int, end: int) -> bool:
        """One cheap walk: registered VMAs are skipped whole; EPERM names a VMA that is
        not async-WP registered (including PFN maps, which the scan never reports)."""
        assert self._scanner is not None
        try:
            self._scanner.scan(
                start,
                end,
                flags=uffd.PM_SCAN_CHECK_WPASYNC,
                mask=uffd.PAGE_IS_WPALLOWED,
                inverted=uffd.PAGE_IS_WPALLOWED,
                returns=uffd.PAGE_IS_WPALLOWED,
            )
        except OSError as e:
            if e.errno == errno.EPERM:
                return False
            raise UffdScanFailed(self._scanner.pid, f"0x{start:x}-0x{end:x}", e.strerror) from None
        return True

    def _unregistered(self, runs: Sequence[_Run]) -> tuple[list[_Run], list[_Run]]:
        """(sub-ranges of `runs` whose VMAs are not registered, split along mappings;
        the runs that held any)."""
        new: list[_Run] = []
        bad: list[_Run] = []
        for run in runs:
            start, end, ms = run
            if self._all_registered(start, end):
                continue
            bad.append(run)
            regs = self._scan(
                start,
                end,
                mask=uffd.PAGE_IS_WPALLOWED,
                inverted=uffd.PAGE_IS_WPALLOWED,
                returns=uffd.PAGE_IS_WPALLOWED,
            )
            for m in ms:
                hit = (regs[:, 0] < m.end) & (regs[:, 1] > m.start)
                if hit.any():
                    s = max(m.start, int(regs[hit, 0].min()))
                    e = min(m.end, int(regs[hit, 1].max()))
                    new.append((s, e, (m,)))
        return new, bad

    def collect(self, fp: FrozenProcess, mappings: Sequence[Mapping]) -> ChangedSet:
        t0 = time.perf_counter()
        if self._ident != fp.ident or self._scanner is None:
            raise UffdLost(fp.pid, "not armed on this process")
        if self.registration == "inject" and not self._fd_is_ours(fp.pid):
            fd = self._fd
            self._drop()
            raise UffdLost(fp.pid, f"fd {fd} was closed or replaced in the target")
        calls0 = self._scanner.calls
        self._scanner.reset()
        mappings = [m for m in mappings if trackable(m)]
        now = {_key(m) for m in mappings}  # forget failures of mappings that are gone
        self._untracked = {k: v for k, v in self._untracked.items() if k in now}
        if self.registration == "self":
            # Registered by the process since: tracked from now on. The process never
            # protects pages itself, so the scan below reports every page it holds.
            for m in mappings:
                if _key(m) in self._untracked and self._all_registered(m.start, m.end):
                    del self._untracked[_key(m)]
        new, bad = self._unregistered(self._tracked_runs(mappings))
        t1 = time.perf_counter()
        registered = 0
        if new and self.registration == "inject":
            with Injector(fp, site=self._site) as inj:
                registered = self._register(inj, self._fd, new, unprotect=True)
        # Whatever is still not async-WP capable (a failed registration, a PFN map the
        # probe cannot see) is untracked, before any WP scan could fail half-way.
        self._mark_unregistered(bad)
        t2 = time.perf_counter()
        # Every scan below appends to the scanner's buffer (growing it keeps what is
        # there): the changed regions are one slice of it, with no copy per run.
        lo = self._scanner.used
        flags = uffd.PM_SCAN_WP_MATCHING | uffd.PM_SCAN_CHECK_WPASYNC
        for s, e, _ in self._tracked_runs(mappings):
            self._scan(
                s,
                e,
                flags=flags,
                mask=uffd.PAGE_IS_WRITTEN,
                anyof=uffd.PAGE_TAKEN,
                returns=uffd.PAGE_IS_WRITTEN | uffd.PAGE_TAKEN,
            )
        always = [m for m in mappings if _key(m) in self._untracked]
        for m in always if self.untracked_as_changed else ():
            self._scan(m.start, m.end, anyof=uffd.PAGE_TAKEN, returns=uffd.PAGE_TAKEN)
        regions = self._scanner.buf[lo : self._scanner.used]
        if always and self.untracked_as_changed:  # they interleave with the runs
            regions = regions[np.argsort(regions[:, 0], kind="stable")]
        pages = uffd.pages_of_ranges(regions[:, 0], regions[:, 1])
        t3 = time.perf_counter()
        self.last = CollectStats(
            t3 - t0,
            t1 - t0,
            t2 - t1,
            t3 - t2,
            registered,
            self._scanner.calls - calls0,
            int(pages.size),
        )
        log.debug(
            "uffd-wp collected",
            extra={
                "fields": {
                    "pid": fp.pid,
                    "pages": int(pages.size),
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
        untracked = [[*k, why] for k, why in self._untracked.items()]
        meta = {
            "armed": True,
            "fd": self._fd,
            "inode": self._inode,
            "registration": self.registration,
            "untracked_as_changed": self.untracked_as_changed,
            "untracked": untracked,
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
        self._untracked = {
            (int(u[0]), int(u[1]), str(u[2]), int(u[3]), str(u[4]), int(u[5]), str(u[6])): str(u[7])
            for u in meta.get("untracked", [])
        }
        self._ident, self._fd, self._inode = ident, fd, inode
        self._scanner = uffd.PagemapScanner(ident.pid)

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
