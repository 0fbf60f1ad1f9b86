"""Where the uffd-wp tracker acts, computed in bulk from the maps, and its hands on the
target's userfaultfd from outside.

Owns:
- *spans*: the tracker registers, probes and scans whole spans, not mappings. A span runs
  from the first to the last of a sequence of tracked mappings that only holes and
  *joinable* mappings separate (private anonymous mappings that are not writable: guard
  pages of stacks and allocators; registering them costs the program nothing, since they
  are never written, and a later `mprotect` of them stays tracked). Anything else between
  two tracked mappings (a library, a writable mapping outside the regions, a mapping
  that could not be registered) ends the span, so a `PM_SCAN_CHECK_WPASYNC` walk of a span
  only ever meets VMAs of our userfaultfd. One ioctl per span, whatever the number of
  mappings in it: 20 000 mappings separated by holes or guards are one span.
- `Inside`, `clip`: the mappings in a range, ranges cut to a span.
- `RemoteUffd`: the target's userfaultfd, duplicated into the agent with pidfd_getfd(2).
  userfaultfd ioctls act on the mm the fd was created in (`ctx->mm`), not the caller's,
  so UFFDIO_API, UFFDIO_REGISTER (which may span several VMAs and holes) and
  UFFDIO_WRITEPROTECT run here as plain system calls: only creating the fd needs the
  target (syscall injection).
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cpcoord.closing import Closing
from cpcoord.errors import NoSuchProcess, ProcessExited, TrackerUnavailable, UffdLost
from nodeagent.proc import uffd
from nodeagent.proc.mapscache import derived
from nodeagent.proc.procfs import Mapping

U64 = npt.NDArray[np.uint64]
_SPECIAL = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]")


def trackable(m: Mapping) -> bool:
    """Only writable mappings can change through the process's own writes. A mapping made
    writable later (mprotect) gets a new maps line: a changed mapping for the capture
    layer, registered by the collect that first sees it writable."""
    return m.writable and m.path not in _SPECIAL


def joinable(m: Mapping) -> bool:
    """A mapping a span may cross: private, anonymous, not writable (guards)."""
    return (
        m.perms[1] != "w"
        and m.perms[3] == "p"
        and (not m.path or m.path.startswith("[anon:"))
        and m.inode == 0
    )


@dataclass(frozen=True)
class Spans:
    """Spans `[lo, hi)`, sorted and disjoint."""

    lo: U64
    hi: U64

    def __len__(self) -> int:
        return int(self.lo.size)

    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.lo.tolist(), self.hi.tolist(), strict=True))


@derived
def spans_of(
    maps: Sequence[Mapping],
    tracked: Sequence[Mapping],
    *,
    join: bool,
    barriers: frozenset[int] = frozenset(),
) -> Spans:
    """Spans over `tracked` (a subset of `maps`, the whole maps of the process). With
    `join`, joinable mappings do not end a span; a mapping whose start is in `barriers`
    (one that could not be registered) always does."""
    start = np.fromiter((m.start for m in maps), dtype=np.uint64, count=len(maps))
    end = np.fromiter((m.end for m in maps), dtype=np.uint64, count=len(maps))
    order: npt.NDArray[np.intp] | None = None
    if start.size > 1 and bool(np.any(start[1:] < start[:-1])):
        order = np.argsort(start, kind="stable")
        start, end = start[order], end[order]
    tstart = np.sort(np.fromiter((m.start for m in tracked), dtype=np.uint64, count=len(tracked)))
    is_tracked = np.zeros(start.size, dtype=np.bool_)
    if tstart.size and start.size:
        idx = np.searchsorted(start, tstart)
        idx[idx == start.size] = start.size - 1
        hit = start[idx] == tstart
        is_tracked[idx[hit]] = True
    keep = is_tracked.copy()
    if join:
        j = np.fromiter((joinable(m) for m in maps), dtype=np.bool_, count=len(maps))
        keep |= j if order is None else j[order]
    if barriers:
        bar = np.fromiter(barriers, dtype=np.uint64, count=len(barriers))
        keep &= ~np.isin(start, bar)
        is_tracked &= ~np.isin(start, bar)
    group = np.cumsum(~keep)  # a new group after every mapping that ends a span
    t = np.flatnonzero(is_tracked)
    if t.size == 0:
        z = np.zeros(0, dtype=np.uint64)
        return Spans(z, z)
    g = group[t]
    first = np.concatenate(([0], np.flatnonzero(np.diff(g)) + 1))
    last = np.concatenate((first[1:] - 1, [t.size - 1]))
    return Spans(start[t[first]], end[t[last]])


class Inside:
    """The mappings of a maps list that overlap a range (the rare paths: a registration
    or a probe that failed for a whole span is redone mapping by mapping)."""

    def __init__(self, maps: Sequence[Mapping]) -> None:
        self._given = maps
        self._maps: list[Mapping] = []
        self._starts: list[int] | None = None

    def __call__(self, lo: int, hi: int) -> list[Mapping]:
        if self._starts is None:  # built on first use: the common paths never need it
            self._maps = sorted(self._given, key=lambda m: m.start)
            self._starts = [m.start for m in self._maps]
        i = max(0, bisect.bisect_right(self._starts, lo) - 1)
        out = []
        for m in self._maps[i:]:
            if m.start >= hi:
                break
            if m.end > lo:
                out.append(m)
        return out


def clip(rlo: U64, rhi: U64, lo: int, hi: int) -> list[tuple[int, int]]:
    """Ranges cut to `[lo, hi)`, empty ones dropped."""
    a = np.maximum(rlo, np.uint64(lo))
    b = np.minimum(rhi, np.uint64(hi))
    keep = b > a
    return list(zip(a[keep].tolist(), b[keep].tolist(), strict=True))


PIDFD_THREAD = os.O_EXCL  # Linux >= 6.9: a pidfd naming one thread


def _pidfd_of(pid: int) -> int:
    """A pidfd through which pidfd_getfd sees the process's fd table. `pid` may be a live
    thread's id while the leader is a zombie (FrozenProcess.pid): the exited leader has no
    fd table any more, so that thread's own pidfd is needed."""
    try:
        return os.pidfd_open(pid)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOENT):
            raise
    try:
        return os.pidfd_open(pid, PIDFD_THREAD)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOENT):
            raise ProcessLookupError(e.errno, f"no pidfd for {pid}") from None
        raise


class RemoteUffd(Closing):
    """The target's userfaultfd `fd`, duplicated into the agent (a context manager).
    Raises UffdLost when that number is not the userfaultfd of inode `inode` any more."""

    def __init__(self, pid: int, fd: int, inode: int = 0) -> None:
        self.pid = pid
        try:
            pidfd = _pidfd_of(pid)
        except ProcessLookupError:
            raise ProcessExited(pid, "uffd-wp") from None
        try:
            got = uffd.pidfd_getfd(pidfd, fd)
            err = ctypes.get_errno()
        finally:
            os.close(pidfd)
        if got < 0:
            if err == errno.ESRCH:
                raise ProcessExited(pid, "uffd-wp")
            if err == errno.EBADF:
                raise UffdLost(pid, f"fd {fd} is closed in the target")
            # ENOSYS, EPERM (a seccomp profile, no ptrace access): the tracker cannot work
            # here at all; `auto` then tries the next backend.
            raise TrackerUnavailable("uffd-wp", f"pidfd_getfd in the agent: {os.strerror(err)}")
        self.fd = got
        st = os.fstat(got)
        if inode and st.st_ino != inode:
            os.close(got)
            raise UffdLost(pid, f"fd {fd} is no longer our userfaultfd")
        self.inode = st.st_ino

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def api(self, features: int) -> int:
        """UFFDIO_API; 0 or the errno."""
        return self._ioctl(uffd.UFFDIO_API, uffd.UffdioApi(uffd.UFFD_API, features, 0))

    def register(self, lo: int, hi: int) -> int:
        """UFFDIO_REGISTER (mode WP) of `[lo, hi)`, holes and several VMAs allowed;
        0 or the errno (nothing is registered on failure)."""
        arg = uffd.UffdioRegister(lo, hi - lo, uffd.UFFDIO_REGISTER_MODE_WP, 0)
        return self._ioctl(uffd.UFFDIO_REGISTER, arg)

    def unprotect(self, lo: int, hi: int) -> int:
        """Drop WP bits in `[lo, hi)` (left by an earlier uffd, e.g. on a moved VMA)."""
        return self._ioctl(uffd.UFFDIO_WRITEPROTECT, uffd.UffdioWriteprotect(lo, hi - lo, 0))

    def _ioctl(self, request: int, arg: ctypes.Structure) -> int:
        try:
            uffd.ioctl(self.fd, request, arg)
        except OSError as e:
            if e.errno == errno.ESRCH:  # the mm is gone
                raise NoSuchProcess(self.pid) from None
            return int(e.errno or errno.EIO)
        return 0
