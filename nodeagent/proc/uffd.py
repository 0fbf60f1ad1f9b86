"""userfaultfd write-protect and PAGEMAP_SCAN: constants, structs, ioctl wrappers.

Owns the kernel ABI of the uffd-wp tracker (x86-64, Linux >= 6.7): the `userfaultfd`
feature bits and ioctl numbers, the `PAGEMAP_SCAN` ioctl on `/proc/PID/pagemap` with its
category bits, the agent-side scanner (resume loop over `walk_end`, a reusable output
vector), the vectorised conversion of page ranges to page numbers, and the kernel probe
(`availability`) that tries the whole mechanism on a page of the agent itself.

Nothing here touches another process's registers: registration inside a target is
`nodeagent.trackers.uffdwp` on top of `nodeagent.proc.inject`. Headers on build machines are
often older than the kernel (Debian's say 6.1), so the numbers are spelled out here and
checked against the kernel at run time, never taken from <linux/*.h>.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from functools import cache

import numpy as np
import numpy.typing as npt

from cpcoord.errors import ProcessExited, TrackerFailed
from nodeagent.proc.procfs import open_proc

# -- system calls (x86-64) ----------------------------------------------------------
NR_CLOSE = 3
NR_MMAP = 9
NR_MUNMAP = 11
NR_IOCTL = 16
NR_USERFAULTFD = 323
NR_PIDFD_GETFD = 438

O_NONBLOCK = os.O_NONBLOCK
O_CLOEXEC = os.O_CLOEXEC
PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
MAP_PRIVATE_ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


_IOR, _IOWR = 2, 3

# -- userfaultfd (include/uapi/linux/userfaultfd.h) ---------------------------------
UFFD_API = 0xAA
# Only user-mode faults are *delivered*; needed where vm.unprivileged_userfaultfd=0 and
# the target lacks CAP_SYS_PTRACE. Async WP never delivers anything, so it costs nothing.
UFFD_USER_MODE_ONLY = 1
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
# What the tracker needs: async WP (the kernel resolves the fault, clears the WP bit and
# that bit is the "written" record) and WP_UNPOPULATED, without which PAGEMAP_SCAN does
# not count an anonymous VMA as wr-protect capable (userfaultfd_wp_use_markers).
REQUIRED_FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED
OPTIONAL_FEATURES = UFFD_FEATURE_WP_HUGETLBFS_SHMEM

UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_API = _ioc(_IOWR, 0xAA, 0x3F, 24)
UFFDIO_REGISTER = _ioc(_IOWR, 0xAA, 0x00, 32)
UFFDIO_UNREGISTER = _ioc(_IOR, 0xAA, 0x01, 16)
UFFDIO_WRITEPROTECT = _ioc(_IOWR, 0xAA, 0x06, 24)

# -- PAGEMAP_SCAN (include/uapi/linux/fs.h) -----------------------------------------
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_TAKEN = PAGE_IS_PRESENT | PAGE_IS_SWAPPED
PAGEMAP_SCAN = _ioc(_IOWR, ord("f"), 16, 96)


class UffdioApi(ctypes.Structure):
    _fields_ = [
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class UffdioRegister(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class UffdioWriteprotect(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64)]


class PmScanArg(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "size",
            "flags",
            "start",
            "end",
            "walk_end",
            "vec",
            "vec_len",
            "max_pages",
            "category_inverted",
            "category_mask",
            "category_anyof_mask",
            "return_mask",
        )
    ]


assert ctypes.sizeof(UffdioApi) == 24 and ctypes.sizeof(UffdioRegister) == 32
assert ctypes.sizeof(UffdioWriteprotect) == 24 and ctypes.sizeof(PmScanArg) == 96

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int  # int ioctl(): the upper half of rax is junk
_libc.syscall.restype = ctypes.c_long


def ioctl(fd: int, request: int, arg: ctypes.Structure) -> int:
    """ioctl with a struct argument; raises OSError with the errno."""
    r = int(_libc.ioctl(fd, request, ctypes.addressof(arg)))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


# -- the agent-side scanner ---------------------------------------------------------

Regions = npt.NDArray[np.uint64]  # shape (n, 3): start, end, categories (struct page_region)


class PagemapScanner:
    """PAGEMAP_SCAN on one process's pagemap, into one reusable output buffer.

    Scans append their regions to the buffer and return views of it, valid until
    `reset()`. The buffer is allocated and touched up front and only grows, so a scan in
    the frozen window neither allocates nor takes first-touch faults on our side.
    """

    def __init__(self, pid: int, vec_len: int = 1 << 14) -> None:
        self.pid = pid
        self.fd = open_proc(pid, "pagemap", os.O_RDONLY, "open pagemap of")
        self.buf = np.zeros((vec_len, 3), dtype=np.uint64)
        self.used = 0
        self.arg = PmScanArg()
        self.calls = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def reset(self) -> None:
        self.used = 0

    def _room(self) -> None:
        if self.used == self.buf.shape[0]:
            # Earlier views keep the old array alive; new regions go to the larger one.
            bigger = np.zeros((2 * self.buf.shape[0], 3), dtype=np.uint64)
            bigger[: self.used] = self.buf[: self.used]
            self.buf = bigger

    def scan(
        self,
        start: int,
        end: int,
        *,
        flags: int = 0,
        mask: int = 0,
        anyof: int = 0,
        inverted: int = 0,
        returns: int = PAGE_IS_WRITTEN,
    ) -> Regions:
        """All regions of `[start, end)` matching the categories, in address order.

        With PM_SCAN_WP_MATCHING the kernel write-protects exactly the pages it reports,
        so when the vector fills it stops at `walk_end` and the rest is resumed from there,
        or from the end of the last region reported if that is further (nothing is
        protected without being reported, nothing reported twice). Raises OSError (errno)
        on failure; EPERM with PM_SCAN_CHECK_WPASYNC means a VMA in the range is not
        async-WP registered.
        """
        a = self.arg
        lo = self.used
        pos = start
        while pos < end:
            self._room()
            a.size, a.flags, a.start, a.end, a.walk_end = 96, flags, pos, end, 0
            a.vec = self.buf.ctypes.data + self.used * 24
            room = self.buf.shape[0] - self.used
            a.vec_len, a.max_pages = room, 0
            a.category_inverted, a.category_mask = inverted, mask
            a.category_anyof_mask, a.return_mask = anyof, returns
            self.calls += 1
            n = int(_libc.ioctl(self.fd, PAGEMAP_SCAN, ctypes.addressof(a)))
            if n < 0:
                e = ctypes.get_errno()
                if e == errno.ESRCH:
                    raise ProcessExited(self.pid, "pagemap scan")
                raise OSError(e, os.strerror(e))
            self.used += n
            if n < room:
                # The vector did not fill: the walk is complete. Its walk_end is not to be
                # trusted then: 6.18 can leave it below regions it reported (when the
                # range ends in holes or skipped VMAs), and resuming there would report
                # them twice.
                break
            # Full: resume after what was reported, never inside it.
            walk_end = max(int(a.walk_end), int(self.buf[self.used - 1, 1]) if n else 0)
            if walk_end >= end:
                break
            if walk_end <= pos:  # no progress: cannot happen, but never spin while frozen
                raise TrackerFailed("uffd-wp", self.pid, f"PAGEMAP_SCAN stuck at 0x{pos:x}")
            pos = walk_end
        return self.buf[lo : self.used]


# -- kernel probe --------------------------------------------------------------------


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """pidfd_getfd(2): a copy of the process's `fd` here, or -1 (errno in ctypes.get_errno)."""
    return int(_libc.syscall(NR_PIDFD_GETFD, pidfd, fd, 0))


def userfaultfd(flags: int) -> int:
    """userfaultfd(2) in this process; raises OSError with the errno."""
    fd = int(_libc.syscall(NR_USERFAULTFD, flags))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


@cache
def supported_features() -> int:
    """Feature bits this kernel's userfaultfd offers (UFFDIO_API with features 0)."""
    fd = userfaultfd(O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)
    try:
        api = UffdioApi(UFFD_API, 0, 0)
        ioctl(fd, UFFDIO_API, api)
        return int(api.features)
    finally:
        os.close(fd)


def wanted_features() -> int:
    return REQUIRED_FEATURES | (supported_features() & OPTIONAL_FEATURES)
