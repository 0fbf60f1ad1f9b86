"""Reading what the agent can see of a process's kernel side (cpcoord/kstate.py values).

`read_kernel_state(pid)` lists /proc/PID/fd: per fd the readlink target, the position,
flags, inode and mount of its fdinfo, and (paths only) the file type; per pipe and
socket the bytes queued, through a copy of the fd taken with pidfd_getfd(2) and the
FIONREAD/SIOCINQ and SIOCOUTQ ioctls (the copy is closed at once). Called while the
process is frozen (at a capture's cut, and by the restore's comparison), so the table
cannot change under it.

Cost is bounded: about four system calls per fd (~20 us of CPU, bench/kstate.py), six
more per pipe or socket; at most MAX_FDS fds and MAX_QUEUES queues are read per call
(the record then says it is partial). The
userfaultfd of the agent's own tracker is left out: the agent put it there and re-arms it
after a restore, so it is not the process's state.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import termios

from cpcoord.errors import NoSuchProcess
from cpcoord.kstate import MAX_FDS, MAX_TARGET, KernelFd, KernelState
from nodeagent.proc import uffd

log = logging.getLogger(__name__)

FIONREAD = termios.FIONREAD  # == SIOCINQ
SIOCOUTQ = termios.TIOCOUTQ  # same number as SIOCOUTQ on Linux
MAX_QUEUES = 1024  # pipes and sockets whose queues one call reads at most
PIDFD_THREAD = os.O_EXCL  # Linux >= 6.9: a pidfd naming one thread
TRACKER_FDS = ("anon_inode:[userfaultfd]",)  # the agent's own, left out of the record
_INT = struct.Struct("i")


def _kind(target: str, mode: int | None) -> str:
    if target.startswith("pipe:"):
        return "pipe"
    if target.startswith("socket:"):
        return "socket"
    if target.startswith("anon_inode:"):
        return "anon"
    if mode is None:
        return "other"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISFIFO(mode):
        return "pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "other"


def _fdinfo(pid: int, fd: int) -> dict[bytes, bytes]:
    """The leading "key:\tvalue" lines of one fd's fdinfo (pos, flags, mnt_id, ino come
    first); {} when it is gone. os.open/os.read: no file object per fd."""
    try:
        f = os.open(f"/proc/{pid}/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        text = os.read(f, 512)
    except OSError:
        return {}
    finally:
        os.close(f)
    out = {}
    for line in text.split(b"\n", 4)[:4]:
        k, _, v = line.partition(b":")
        out[k] = v
    return out


def _pidfd(pid: int) -> int | None:
    for flags in (0, PIDFD_THREAD):
        try:
            return os.pidfd_open(pid, flags)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOENT, errno.ESRCH):
                return None
    return None


def _ioctl_int(fd: int, req: int) -> int | None:
    buf = bytearray(_INT.size)
    try:
        fcntl.ioctl(fd, req, buf)
    except OSError:  # a listening socket, a netlink socket...: not known
        return None
    (v,) = _INT.unpack(buf)
    return v if v >= 0 else None


def _queues(pidfd: int, fd: int, socket: bool) -> tuple[int | None, int | None]:
    """(unread, unsent) of the process's `fd`, through a copy closed at once."""
    got = uffd.pidfd_getfd(pidfd, fd)
    if got < 0:
        return None, None
    try:
        unread = _ioctl_int(got, FIONREAD)
        unsent = _ioctl_int(got, SIOCOUTQ) if socket else None
        return unread, unsent
    finally:
        os.close(got)


def read_kernel_state(pid: int, max_queues: int = MAX_QUEUES) -> KernelState:
    """The fd table of `pid` (a frozen process) with offsets and queue sizes."""
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        raise NoSuchProcess(pid) from None
    nums = sorted(int(n) for n in names)
    partial: list[str] = []
    if len(nums) > MAX_FDS:
        partial.append(f"only the first {MAX_FDS} of {len(nums)} fds recorded")
        nums = nums[:MAX_FDS]
    pidfd: int | None = None
    no_pidfd = False
    queues_left = max_queues
    out: list[KernelFd] = []
    try:
        for n in nums:
            try:
                target = os.readlink(f"{base}/{n}")
            except OSError:
                continue  # closed meanwhile: cannot happen while frozen
            if target in TRACKER_FDS:
                continue
            target = target[:MAX_TARGET]
            mode = None
            if target.startswith("/"):
                try:
                    mode = os.stat(f"{base}/{n}").st_mode
                except OSError:
                    mode = None
            kind = _kind(target, mode)
            info = _fdinfo(pid, n)
            unread = unsent = None
            if kind in ("pipe", "socket"):
                if queues_left > 0:
                    queues_left -= 1
                    if pidfd is None and not no_pidfd:
                        pidfd = _pidfd(pid)
                        no_pidfd = pidfd is None
                    if pidfd is not None:
                        unread, unsent = _queues(pidfd, n, kind == "socket")
                elif queues_left == 0:
                    queues_left = -1
                    partial.append(f"queues of only the first {max_queues} pipes and sockets")
            out.append(
                KernelFd(
                    fd=n,
                    target=target,
                    kind=kind,
                    pos=int(info.get(b"pos", 0)),
                    flags=int(info.get(b"flags", b"0"), 8),
                    ino=int(info.get(b"ino", 0)),
                    mnt_id=int(info.get(b"mnt_id", 0)),
                    unread=unread,
                    unsent=unsent,
                )
            )
    finally:
        if pidfd is not None:
            os.close(pidfd)
    if no_pidfd:
        partial.append("queues unknown: pidfd_open refused")
    return KernelState(tuple(out), "; ".join(partial))
