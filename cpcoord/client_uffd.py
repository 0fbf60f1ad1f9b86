"""Client library, uffd-wp side: a cooperating process registers its own memory.

The alternative to syscall injection (DESIGN.md, Trackers): a process that links cpcoord
opens the userfaultfd itself, in async write-protect mode, and registers the ranges it
wants tracked. The node agent then tracks it with
`UffdWpTracker(registration="self")`, which only ever scans /proc/PID/pagemap: nothing
is injected, the process's registers are never touched.

Rules for the process: register, never write-protect (the agent protects pages at each
capture and reads what was written since; a range the process protected itself could hide
writes made before that); keep the object alive as long as it wants tracking (closing it
unregisters everything, and the agent then counts those ranges as always changed).

Standard library only, so it loads in any Python process. The ABI numbers duplicate those
of nodeagent.proc.uffd (a unit test checks they agree): cpcoord never imports the agent.
"""

from __future__ import annotations

import ctypes
import os

from cpcoord.closing import Closing
from cpcoord.errors import InvalidArgument, TrackerUnavailable

_NR_USERFAULTFD = 323  # x86-64
_UFFD_API = 0xAA
_UFFD_USER_MODE_ONLY = 1
_WP_HUGETLBFS_SHMEM = 1 << 12
_WP_UNPOPULATED = 1 << 13
_WP_ASYNC = 1 << 15
_UFFDIO_API = 0xC018AA3F
_UFFDIO_REGISTER = 0xC020AA00
_UFFDIO_UNREGISTER = 0x8010AA01
_MODE_WP = 1 << 1
_PAGE = os.sysconf("SC_PAGE_SIZE")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def _ioctl(fd: int, req: int, arg: ctypes.Array[ctypes.c_uint64]) -> None:
    if _libc.ioctl(fd, req, ctypes.addressof(arg)) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _new_uffd() -> int:
    fd = int(_libc.syscall(_NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY))
    if fd < 0:
        e = ctypes.get_errno()
        raise TrackerUnavailable("uffd-wp", f"userfaultfd(): {os.strerror(e)}")
    return fd


class SelfTracking(Closing):
    """This process's userfaultfd in async write-protect mode, and what it registered."""

    def __init__(self) -> None:
        probe = _new_uffd()
        try:
            api = (ctypes.c_uint64 * 3)(_UFFD_API, 0, 0)
            _ioctl(probe, _UFFDIO_API, api)
            offered = int(api[1])
        finally:
            os.close(probe)
        need = _WP_ASYNC | _WP_UNPOPULATED
        if offered & need != need:
            raise TrackerUnavailable("uffd-wp", "kernel lacks UFFD_FEATURE_WP_ASYNC (Linux >= 6.7)")
        self.fd = _new_uffd()
        try:
            _ioctl(
                self.fd,
                _UFFDIO_API,
                (ctypes.c_uint64 * 3)(_UFFD_API, need | (offered & _WP_HUGETLBFS_SHMEM), 0),
            )
        except OSError as e:
            os.close(self.fd)
            raise TrackerUnavailable("uffd-wp", f"UFFDIO_API: {e.strerror}") from None
        self.ranges: list[tuple[int, int]] = []

    def register(self, start: int, length: int) -> None:
        """Track writes to `[start, start + length)` (page aligned, mapped)."""
        if start % _PAGE or length % _PAGE or length <= 0:
            raise InvalidArgument(f"range 0x{start:x}+{length} is not a whole number of pages")
        reg = (ctypes.c_uint64 * 4)(start, length, _MODE_WP, 0)
        try:
            _ioctl(self.fd, _UFFDIO_REGISTER, reg)
        except OSError as e:
            raise InvalidArgument(f"cannot register 0x{start:x}+{length}: {e.strerror}") from None
        self.ranges.append((start, length))

    def unregister(self, start: int, length: int) -> None:
        rng = (ctypes.c_uint64 * 2)(start, length)
        try:
            _ioctl(self.fd, _UFFDIO_UNREGISTER, rng)
        except OSError as e:
            raise InvalidArgument(f"cannot unregister 0x{start:x}+{length}: {e.strerror}") from None
        self.ranges = [r for r in self.ranges if r != (start, length)]

    def close(self) -> None:
        """Stop tracking (the kernel unregisters every range and drops the WP bits)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.ranges = []
