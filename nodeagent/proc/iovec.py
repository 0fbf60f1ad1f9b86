"""Batched `process_vm_readv` / `process_vm_writev` and `/proc/PID/mem`, shared by
reader.py (capture) and writer.py (restore).

Owns: the ctypes bindings of the two system calls, IOV_MAX, the loop that sends `(n, 2)`
iovec arrays `[address, length]` (built in bulk with NumPy, one local per remote) in calls
of at most IOV_MAX pairs and maps a short transfer back to the piece it stopped in, the
errno -> error-class mapping of each direction, and opening `/proc/PID/mem`. What to do
with the rest of a piece after a short transfer stays with the caller.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from cpcoord.errors import PermissionDenied, ProcessExited, ReadFailed, WriteFailed

IOV_MAX = 1024

# (pid, local iovecs ptr, nlocal, remote iovecs ptr, nremote) -> bytes or -1 (errno set).
VmFn = Callable[[int, int, int, int, int], int]

_libc = ctypes.CDLL(None, use_errno=True)


def vm_syscall(name: str) -> VmFn:
    """`process_vm_readv` or `process_vm_writev` as a VmFn (flags are always 0)."""
    fn = getattr(_libc, name)
    fn.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    fn.restype = ctypes.c_ssize_t

    def call(pid: int, local: int, nlocal: int, remote: int, nremote: int) -> int:
        return int(fn(pid, local, nlocal, remote, nremote, 0))

    return call


@dataclass(frozen=True)
class Direction:
    """What differs between reading and writing: the phase named in errors, the verb of
    a permission error, the error of a refused address, how /proc/PID/mem opens, the
    call that moves bytes through it and what a call that moved none is called."""

    during: str
    verb: str
    failed: type[ReadFailed] | type[WriteFailed]
    mem_flags: int
    mem_io: Callable[[int, Sequence[Any], int], int]
    nothing: str

    def fail(self, pid: int, err: int, addr: int) -> NoReturn:
        if err == errno.ESRCH:
            raise ProcessExited(pid, self.during)
        if err == errno.EPERM:
            raise PermissionDenied(self.verb, pid, os.strerror(err))
        raise self.failed(pid, f"0x{addr:x}", os.strerror(err))

    def open_mem(self, pid: int) -> int:
        try:
            return os.open(f"/proc/{pid}/mem", self.mem_flags | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            raise ProcessExited(pid, self.during) from None
        except PermissionError as e:
            raise PermissionDenied(self.verb, pid, e.strerror) from None


# os.preadv/os.pwritev looked up at each call, so a test that patches them is heard.
READ = Direction(
    "capture",
    "read memory of",
    ReadFailed,
    os.O_RDONLY,
    lambda fd, bufs, off: os.preadv(fd, bufs, off),
    "the kernel read nothing",
)
WRITE = Direction(
    "restore",
    "write memory of",
    WriteFailed,
    os.O_RDWR,
    lambda fd, bufs, off: os.pwritev(fd, bufs, off),
    "the kernel wrote nothing",
)


def mem_all(
    d: Direction,
    fd: int,
    pid: int,
    addr: int,
    length: int,
    local: int,
    *,
    during: str,
    moved: Callable[[int], None] | None = None,
) -> None:
    """Move all `length` bytes between `/proc/PID/mem` (open as `fd`) at `addr` and our
    memory at `local`, as many calls as it takes; `moved(n)` hears each call's bytes.
    Raises ProcessExited (named `during`) when the process is gone, else `d`'s error
    at the first byte the kernel refuses or will not move."""
    done = 0
    while done < length:
        buf = (ctypes.c_char * (length - done)).from_address(local + done)
        try:
            got = d.mem_io(fd, [buf], addr + done)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise ProcessExited(pid, during) from None
            raise d.failed(pid, f"0x{addr + done:x}", e.strerror) from None
        if got <= 0:
            if not alive(pid):
                raise ProcessExited(pid, during)
            raise d.failed(pid, f"0x{addr + done:x}", d.nothing)
        done += got
        if moved is not None:
            moved(got)


def ends(iov: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Cumulative byte offsets `(n + 1,)` of the pieces, from 0."""
    offsets = np.zeros(iov.shape[0] + 1, dtype=np.uint64)
    np.cumsum(iov[:, 1], out=offsets[1:])
    return offsets


def transfer(
    fn: VmFn,
    pid: int,
    remote: npt.NDArray[np.uint64],
    local: npt.NDArray[np.uint64],
    d: Direction,
    short: Callable[[int, int], None],
    progress: Callable[[int], None] | None = None,
) -> int:
    """Move every piece `local[i]` <-> `remote[i]` (contiguous `(n, 2)` uint64 arrays of
    equal lengths) with `fn`, IOV_MAX pairs a call; returns the number of calls.

    EFAULT/EIO or a short count stop a call inside some piece `j`: `short(j, into)` then
    handles the rest of that piece from byte `into` (page granular) and the next call
    starts at piece `j + 1`. Any other errno raises `d`'s error. `progress(done)` hears
    each time the bytes of the pieces' stream moved so far (a prefix, in piece order)
    grew: the system calls move bytes in iovec order and stop at the first failure."""
    n = remote.shape[0]
    offsets = ends(remote)
    calls = 0
    i = 0
    while i < n:
        k = min(IOV_MAX, n - i)
        want = int(offsets[i + k] - offsets[i])
        got = fn(pid, local[i:].ctypes.data, k, remote[i:].ctypes.data, k)
        calls += 1
        if got == want:
            i += k
            if progress is not None:
                progress(int(offsets[i]))
            continue
        if got < 0:
            err = ctypes.get_errno()
            if err not in (errno.EFAULT, errno.EIO):
                d.fail(pid, err, int(remote[i, 0]))
            got = 0
        stop = int(offsets[i]) + got
        if progress is not None:
            progress(stop)
        j = int(np.searchsorted(offsets, stop, side="right")) - 1
        short(j, stop - int(offsets[j]))
        i = j + 1
        if progress is not None:
            progress(int(offsets[i]))
    return calls


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (its mm may be gone otherwise)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")
