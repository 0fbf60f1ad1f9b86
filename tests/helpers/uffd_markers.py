"""Make never-touched pages of this process carry uffd-wp PTE markers (which pagemap
reports as swapped, holding nothing): for the capture and PAGEMAP_SCAN tests that check
such pages are not taken.
"""

from __future__ import annotations

import ctypes
import os


def uffd_wp_markers(addr: int, length: int) -> int | None:
    """Register [addr, addr+length) of this process with userfaultfd in async
    write-protect mode and protect it: never-touched pages get PTE markers. Returns the
    uffd (to close), or None when the kernel lacks WP_ASYNC/WP_UNPOPULATED."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    fd = int(libc.syscall(323, os.O_CLOEXEC | 1))  # userfaultfd(UFFD_USER_MODE_ONLY)
    if fd < 0:
        return None
    wp_unpopulated, wp_async = 1 << 13, 1 << 15
    api = (ctypes.c_uint64 * 3)(0xAA, wp_unpopulated | wp_async, 0)
    reg = (ctypes.c_uint64 * 4)(addr, length, 1 << 1, 0)  # UFFDIO_REGISTER_MODE_WP
    wp = (ctypes.c_uint64 * 3)(addr, length, 1)  # UFFDIO_WRITEPROTECT_MODE_WP
    for req, arg in ((0xC018AA3F, api), (0xC020AA00, reg), (0xC018AA06, wp)):
        if libc.ioctl(fd, req, arg) != 0:
            os.close(fd)
            return None
    return fd
