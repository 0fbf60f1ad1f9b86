"""Spare pack files in a node cache on tmpfs: pages allocated before a checkpoint needs them.

A write into a fresh tmpfs file makes the kernel allocate and zero every page inside the
write. Measured here, 512 MiB of a staged member take 0.26 s into a fresh file and 0.11 s
into a file whose pages were allocated before (posix_fallocate), and the checkpoint of
`--wait local` is mostly that write. So the cache keeps spare files of a pack's size (plus
slack), allocated on a thread of its own while no checkpoint runs, the way databases
preallocate their log segments. A pack's put renames a spare to its temporary name,
writes over it and cuts it to size (storecore/backend.py, `LocalBackend.spares`).

A spare is written full of zeros, not posix_fallocate'd: tmpfs fallocate allocates
pages without touching them, and in this microVM a guest page the host has not backed
yet (or took back after the guest freed it) costs a host fault at its first touch. The
put's copy then ran at ~0.35 GB/s instead of ~2.5 (0.19 against 0.03 CPU s per 64 MiB
pack, on whichever agent drew such pages: one of two agents, in most runs), and
`--wait local` took 1.1-1.8 s instead of 0.75-0.96. Zeros cost ~40 ms of kernel copy per
spare (written twice: `touch`), at the fill thread's priority.

How many: enough for the biggest member prepared on this node (`want`), filled when a
member is prepared and again after each generation ends, never past the room the cache
gives (`room`: its size less what it holds), at the lowest CPU priority. Spare bytes
count as cache bytes in use.
Spares left by an earlier agent are deleted at start (their size may be another's).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DIR = "spare"
NICE = 19  # the fill thread's priority (`_fill`)


class Spares:
    """Thread-safe pool of preallocated files under ROOT/spare (module docstring)."""

    def __init__(self, root: Path, room: Callable[[int], bool]) -> None:
        self.dir = Path(root) / DIR  # made by the first fill: a disk cache has none
        if self.dir.is_dir():
            for p in self.dir.iterdir():  # an earlier agent's: size unknown
                with contextlib.suppress(OSError):
                    p.unlink()
        self._room = room  # whether n more bytes fit in the cache
        self._lock = threading.Lock()
        self._ready: list[Path] = []
        self._size = 0  # bytes of one spare
        self._want = 0  # bytes of spares to keep
        self._serial = 0
        self._filling = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._ready)

    @property
    def bytes(self) -> int:
        with self._lock:
            return len(self._ready) * self._size

    def request(self, size: int, want: int) -> None:
        """Keep spares of `size` bytes, `want` bytes of them at least; fill now."""
        stale: list[Path] = []
        with self._lock:
            if size != self._size:
                stale, self._ready = self._ready, []
                self._size = size
            self._want = max(self._want, want)
        for p in stale:
            with contextlib.suppress(OSError):
                p.unlink()
        if not self.refill():
            log.info("cache spares ready", extra={"fields": {"made": 0, "bytes": self.bytes}})

    def refill(self) -> bool:
        """Fill up to `want`, on a thread of its own (one at a time); False when that
        is not needed (or a fill runs already)."""
        with self._lock:
            if self._filling or not self._size or self._short() <= 0:
                return False
            self._filling = True
        threading.Thread(target=self._fill, name="cache-spares", daemon=True).start()
        return True

    def _short(self) -> int:
        return self._want - len(self._ready) * self._size  # lock held

    def _fill(self) -> None:
        # Only idle CPU: a refill starts when a generation ends, while partner copies
        # and the drain of that generation may still run (Linux nice is per thread).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        t0, made = time.perf_counter(), 0
        try:
            self.dir.mkdir(mode=0o700, exist_ok=True)
            while True:
                with self._lock:
                    size = self._size
                    if self._short() <= 0:
                        ms = round((time.perf_counter() - t0) * 1e3, 3)
                        fields = {"made": made, "bytes": len(self._ready) * size, "ms": ms}
                        log.info("cache spares ready", extra={"fields": fields})
                        return
                    self._serial += 1
                    path = self.dir / f"{self._serial}"
                if not self._room(size):
                    return
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    touch(fd, size)
                finally:
                    os.close(fd)
                with self._lock:
                    if size == self._size:
                        self._ready.append(path)
                        made += 1
                        continue
                path.unlink()
        except OSError as e:  # a full tmpfs: the puts allocate as they write
            log.warning("cache spares not filled", extra={"fields": {"error": str(e)}})
            with contextlib.suppress(OSError, UnboundLocalError):
                path.unlink()
        finally:
            with self._lock:
                self._filling = False

    def take(self, dst: Path) -> bool:
        """Rename a spare to `dst` (a new temporary name on the same file system): True
        when there was one, and the put writes over it and cuts it to size."""
        with self._lock:
            if not self._ready:
                return False
            path = self._ready.pop()
        try:
            os.rename(path, dst)
        except OSError:
            with contextlib.suppress(OSError):
                path.unlink()
            return False
        return True


_ZERO = bytes(1 << 20)


def touch(fd: int, size: int) -> None:
    """Write `size` zero bytes at the start of `fd`, twice: every page allocated and
    touched (module docstring: not posix_fallocate), then written again, which moves it
    to the kernel's active list. A tmpfs page written once is marked referenced, and the
    next write of it activates it: an LRU move under a lock, per page. Done here, at the
    fill's priority, the put's write into the spare finds its pages active already:
    512 MiB into spares written once took 0.107-0.133 CPU s, written twice 0.078-0.094.
    OSError (ENOSPC) when the tmpfs is full."""
    zero = memoryview(_ZERO)
    for _ in range(2):
        done = 0
        while done < size:
            done += os.pwrite(fd, zero[: min(zero.nbytes, size - done)], done)
