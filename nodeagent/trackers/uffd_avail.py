"""Whether uffd-wp tracking works on this kernel, here (the backend's availability).

Owns the check the tracker registry and `cpcoord probe` run: x86-64 (syscall injection),
userfaultfd with WP_ASYNC and WP_UNPOPULATED, pidfd_getfd permitted (the agent registers
through a copy of the target's uffd), and a self-test on a page of this process that
PAGEMAP_SCAN must report written once and only once. The kernel interface is `uffd`.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from functools import cache

from cpcoord.ranges import PAGE_SIZE
from nodeagent.proc import uffd
from nodeagent.proc.uffd import (
    O_CLOEXEC,
    O_NONBLOCK,
    PAGE_IS_WRITTEN,
    PAGE_TAKEN,
    PM_SCAN_CHECK_WPASYNC,
    PM_SCAN_WP_MATCHING,
    REQUIRED_FEATURES,
    UFFD_API,
    UFFD_USER_MODE_ONLY,
    UFFDIO_API,
    UFFDIO_REGISTER,
    UFFDIO_REGISTER_MODE_WP,
    PagemapScanner,
    UffdioApi,
    UffdioRegister,
    ioctl,
    supported_features,
)
from nodeagent.trackers.base import Availability


def _pidfd_getfd_works(fd: int) -> bool:
    """The agent registers a target's ranges through a copy of its uffd (pidfd_getfd)."""
    try:
        pidfd = os.pidfd_open(os.getpid())
    except OSError:
        return False
    try:
        got = uffd.pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)
    if got < 0:
        return False
    os.close(got)
    return True


def _self_test() -> str:
    """Arm a page of our own, write it, and expect PAGEMAP_SCAN to report it once."""
    fd = uffd.userfaultfd(O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)
    if not _pidfd_getfd_works(fd):
        os.close(fd)
        return "pidfd_getfd(2) is not permitted here (the agent registers through it)"
    buf = mmap.mmap(-1, 2 * PAGE_SIZE)
    scanner = PagemapScanner(os.getpid(), vec_len=4)
    try:
        ioctl(fd, UFFDIO_API, UffdioApi(UFFD_API, REQUIRED_FEATURES, 0))
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        buf[0:1] = buf[PAGE_SIZE : PAGE_SIZE + 1] = b"\1"
        ioctl(fd, UFFDIO_REGISTER, UffdioRegister(addr, 2 * PAGE_SIZE, UFFDIO_REGISTER_MODE_WP))
        flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
        scanner.scan(addr, addr + 2 * PAGE_SIZE, flags=flags, anyof=PAGE_TAKEN, returns=PAGE_TAKEN)
        buf[PAGE_SIZE : PAGE_SIZE + 1] = b"\2"
        got = scanner.scan(
            addr, addr + 2 * PAGE_SIZE, flags=flags, mask=PAGE_IS_WRITTEN, anyof=PAGE_TAKEN
        )
        again = scanner.scan(
            addr, addr + 2 * PAGE_SIZE, flags=flags, mask=PAGE_IS_WRITTEN, anyof=PAGE_TAKEN
        )
        want = [[addr + PAGE_SIZE, addr + 2 * PAGE_SIZE]]
        if got[:, :2].tolist() != want or again.size:
            return f"self-test reported {got[:, :2].tolist()} then {again[:, :2].tolist()}"
        return ""
    finally:
        scanner.close()
        os.close(fd)  # closing the uffd unregisters the range before the unmap
        buf.close()


@cache
def availability() -> Availability:
    """Whether uffd-wp tracking works here; the reason names the first missing piece."""
    name = "uffd-wp"
    if os.uname().machine != "x86_64":
        return Availability(
            name, False, f"syscall injection is x86-64 only, not {os.uname().machine}"
        )
    try:
        feats = supported_features()
    except OSError as e:
        return Availability(name, False, f"userfaultfd(UFFD_USER_MODE_ONLY): {e.strerror}")
    missing = REQUIRED_FEATURES & ~feats
    if missing:
        return Availability(
            name, False, f"kernel lacks UFFD_FEATURE_WP_ASYNC/WP_UNPOPULATED (0x{missing:x})"
        )
    try:
        why = _self_test()
    except OSError as e:
        what = "PAGEMAP_SCAN" if e.errno == errno.ENOTTY else "uffd-wp self-test"
        return Availability(name, False, f"{what}: {e.strerror}")
    if why:
        return Availability(name, False, why)
    return Availability(name, True, f"userfaultfd features 0x{feats:x}, PAGEMAP_SCAN works")
