"""Opening the uffd-wp tracker's userfaultfd inside the target, out of its way.

Owns: the injected `userfaultfd()` and the move of its fd to a high number
(F_DUPFD_CLOEXEC near the top of the target's RLIMIT_NOFILE soft limit, at most
`HIGH_FD_CEILING`), so a program that counts on its own fd numbers never meets it.
"""

from __future__ import annotations

import errno
import logging
import os

from cpcoord.errors import InjectionFailed, TrackerUnavailable
from nodeagent.proc import uffd
from nodeagent.proc.inject import Injector

log = logging.getLogger("nodeagent.trackers.uffdwp")

NR_FCNTL = 72
F_DUPFD_CLOEXEC = 1030
# The uffd goes to the lowest free number >= min(soft limit, CEILING) - MARGIN. The
# ceiling bounds the fd table the kernel allocates for it (8 bytes per slot, copied at
# every fork): 32 KiB, not 8 MiB under a soft limit of 1 Mi.
HIGH_FD_CEILING = 4096
HIGH_FD_MARGIN = 16


def nofile_soft_limit(pid: int) -> int | None:
    """The target's RLIMIT_NOFILE soft limit (/proc/PID/limits, readable by anyone);
    None when unlimited or unreadable."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft = line.split()[3]
                    return None if soft == "unlimited" else int(soft)
    except (OSError, ValueError, IndexError):
        return None
    return None


def high_fd_floor(soft: int | None) -> int:
    """Lowest number the tracker's fd may take (0: keep the number userfaultfd gave)."""
    top = HIGH_FD_CEILING if soft is None else min(soft, HIGH_FD_CEILING)
    return max(0, top - HIGH_FD_MARGIN)


def open_uffd(inj: Injector, tracker: str) -> int:
    """userfaultfd() in the target, moved out of the way of its own fd numbers."""
    flags = uffd.O_CLOEXEC | uffd.O_NONBLOCK | uffd.UFFD_USER_MODE_ONLY
    fd = inj.syscall(uffd.NR_USERFAULTFD, flags)
    if fd < 0:
        why = f"userfaultfd() in pid {inj.pid}: {os.strerror(-fd)}"
        if -fd in (errno.EPERM, errno.ENOSYS, errno.EINVAL):
            raise TrackerUnavailable(tracker, why)
        raise InjectionFailed(inj.pid, "userfaultfd", os.strerror(-fd))
    floor = high_fd_floor(nofile_soft_limit(inj.pid))
    if floor <= fd:
        return fd
    high = inj.syscall(NR_FCNTL, fd, F_DUPFD_CLOEXEC, floor)
    if high < 0:  # no free number up there (EMFILE, EINVAL): keep the one we have
        log.warning(
            "uffd-wp keeps a low fd",
            extra={"fields": {"pid": inj.pid, "fd": fd, "error": os.strerror(-high)}},
        )
        return fd
    inj.syscall(uffd.NR_CLOSE, fd)
    return high
