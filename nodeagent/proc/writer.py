"""Writing pages into another process: batched `process_vm_writev`, `/proc/PID/mem` fallback.

Owns the write side of restore, the mirror of reader.py. Callers hand in *pieces*, built in
bulk with NumPy: `(n, 2)` remote iovecs `[address, length]` and `(n, 2)` local iovecs of
the same lengths (one local per remote, so a short write maps back to its piece).

- Pieces in mappings the target may write go out in `process_vm_writev` calls of at most
  IOV_MAX pairs. A short write (a page the kernel refused) continues through
  `/proc/PID/mem` from the byte where it stopped.
- Pieces in mappings the target may not write (read-only private mappings) go straight
  to `/proc/PID/mem`: its writes use FOLL_FORCE, like a debugger's breakpoint, and break
  copy-on-write. Remote-contiguous pieces are written by one `pwritev` (iovecs in bulk).
- Zero runs read from `zero_source()`: a read-only anonymous mapping that is never written,
  so all of it is the kernel's shared zero page and costs no memory here.

A byte neither path can write is an error (WriteFailed), never skipped.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
from dataclasses import dataclass
from functools import cache

import numpy as np
import numpy.typing as npt

from cpcoord.closing import Closing
from cpcoord.errors import ProcessExited, WriteFailed
from nodeagent.proc.iovec import IOV_MAX, WRITE, VmFn, ends, mem_all, transfer, vm_syscall

ZERO_CHUNK = 8 << 20  # bytes of the zero source; longer zero runs are split into pieces

_libc = ctypes.CDLL(None, use_errno=True)
_pwritev = _libc.pwritev
_pwritev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_long]
_pwritev.restype = ctypes.c_ssize_t
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]

WritevFn = VmFn
sys_writev: WritevFn = vm_syscall("process_vm_writev")


@cache
def zero_source() -> int:
    """Address of ZERO_CHUNK bytes that read as zeros for the life of this process."""
    prot_read, map_private, map_anon = 1, 0x02, 0x20
    addr = _libc.mmap(None, ZERO_CHUNK, prot_read, map_private | map_anon, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of the zero source: {os.strerror(err)}")
    return int(addr)


@dataclass(frozen=True)
class WriteStats:
    writev_calls: int
    writev_bytes: int  # written by process_vm_writev
    mem_bytes: int  # written through /proc/PID/mem (read-only mappings, short writes)


class MemoryWriter(Closing):
    """Writes pieces of local memory into another process (which should be frozen).

    `written` is how far the last `write` got: the bytes of its pieces, in their order,
    that reached the target (a prefix: every path writes in order and stops at the first
    refusal), also after it raised. Restore puts back exactly those (restore_undo.py)."""

    def __init__(self, pid: int, writev: WritevFn = sys_writev) -> None:
        self.pid = pid
        self._writev = writev  # injectable so tests can make process_vm_writev fail
        self._mem_fd = -1
        self.written = 0

    def close(self) -> None:
        if self._mem_fd >= 0:
            os.close(self._mem_fd)
            self._mem_fd = -1

    def write(
        self,
        remote: npt.NDArray[np.uint64],
        local: npt.NDArray[np.uint64],
        forced: npt.NDArray[np.bool_],
    ) -> WriteStats:
        """Write every piece, in order: `remote[i]` <- `local[i]` (same lengths); pieces
        with `forced[i]` lie in mappings the target cannot write and go through
        /proc/PID/mem."""
        remote = np.ascontiguousarray(remote, dtype=np.uint64).reshape(-1, 2)
        local = np.ascontiguousarray(local, dtype=np.uint64).reshape(-1, 2)
        forced = np.asarray(forced, dtype=bool).reshape(-1)
        if remote.shape != local.shape or np.any(remote[:, 1] != local[:, 1]):
            raise ValueError("remote and local pieces must pair up with equal lengths")
        self.written = 0
        calls = vbytes = fell = mem = 0
        # Runs of pieces that take the same path, in order (usually one).
        cut = np.flatnonzero(forced[1:] != forced[:-1]) + 1
        bounds = np.concatenate(([0], cut, [forced.size])).tolist()
        for a, b in itertools.pairwise(bounds):
            if a == b:
                continue
            r, lo = remote[a:b], local[a:b]
            if forced[a]:
                mem += self._mem_pieces(r, lo)
            else:
                c, v, f = self._writev_pieces(r, lo)
                calls, vbytes, fell = calls + c, vbytes + v, fell + f
        return WriteStats(calls, vbytes - fell, fell + mem)

    # -- process_vm_writev ------------------------------------------------------------

    def _writev_pieces(
        self, remote: npt.NDArray[np.uint64], local: npt.NDArray[np.uint64]
    ) -> tuple[int, int, int]:
        fallback = 0
        base = self.written

        def short(j: int, into: int) -> None:
            # Short: the rest of the piece it stopped in goes through /proc/PID/mem.
            nonlocal fallback
            rest = int(remote[j, 1]) - into
            self._mem_write(int(remote[j, 0]) + into, rest, int(local[j, 0]) + into)
            fallback += rest

        def progress(done: int) -> None:
            self.written = base + done

        calls = transfer(self._writev, self.pid, remote, local, WRITE, short, progress)
        return calls, int(remote[:, 1].sum()), fallback

    # -- /proc/PID/mem ----------------------------------------------------------------

    def _mem(self) -> int:
        if self._mem_fd < 0:
            self._mem_fd = WRITE.open_mem(self.pid)
        return self._mem_fd

    def _mem_pieces(self, remote: npt.NDArray[np.uint64], local: npt.NDArray[np.uint64]) -> int:
        """pwritev per group of remote-contiguous pieces (at most IOV_MAX each)."""
        n = remote.shape[0]
        if n == 0:
            return 0
        local = np.ascontiguousarray(local)
        contiguous = remote[1:, 0] == remote[:-1, 0] + remote[:-1, 1]
        starts = np.concatenate(([0], np.flatnonzero(~contiguous) + 1, [n]))
        total = 0
        for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
            for lo in range(a, b, IOV_MAX):
                hi = min(b, lo + IOV_MAX)
                total += self._mem_group(remote[lo:hi], local[lo:hi])
        return total

    def _mem_group(self, remote: npt.NDArray[np.uint64], local: npt.NDArray[np.uint64]) -> int:
        fd = self._mem()
        offsets = ends(remote)
        want = int(offsets[-1])
        base = int(remote[0, 0])
        got = int(_pwritev(fd, local.ctypes.data, local.shape[0], base))
        if got == want:
            self.written += want
            return want
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.ESRCH:
                raise ProcessExited(self.pid, "restore")
            if err not in (errno.EIO, errno.EFAULT):
                raise WriteFailed(self.pid, f"0x{base:x}", os.strerror(err))
            got = 0
        self.written += got
        # Short: finish piece by piece from where it stopped (each raises if it cannot).
        j = int(np.searchsorted(offsets, got, side="right")) - 1
        into = got - int(offsets[j])
        self._mem_write(int(remote[j, 0]) + into, int(remote[j, 1]) - into, int(local[j, 0]) + into)
        for r in range(j + 1, remote.shape[0]):
            self._mem_write(int(remote[r, 0]), int(remote[r, 1]), int(local[r, 0]))
        return want

    def _mem_write(self, addr: int, length: int, src: int) -> None:
        mem_all(
            WRITE, self._mem(), self.pid, addr, length, src, during="restore", moved=self._moved
        )

    def _moved(self, n: int) -> None:
        self.written += n
