"""One process owns a store at a time: an exclusive flock on `lock` in the state
directory (beside the catalog), and a LOCKS object in the store naming the owner
(host, pid) for people looking at the store. Holding the flock makes every LOCKS object
found at open stale, so they are removed before ours is put.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from cpcoord.errors import StoreLocked
from storecore.backend import Backend, Kind


class Ownership:
    def __init__(self, state: Path, location: str) -> None:
        """Take the flock (StoreLocked if another process holds it)."""
        path = state / "lock"
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise StoreLocked(location, f"lock {path} is held") from None
        self._name = f"{socket.gethostname()}-{os.getpid()}"

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def announce(self, backend: Backend) -> None:
        """Replace the stale LOCKS objects by ours."""
        for stale in list(backend.list(Kind.LOCKS)):  # we hold the flock: all stale
            backend.delete(Kind.LOCKS, stale.name)
        owner = {"host": socket.gethostname(), "pid": os.getpid()}
        backend.put(Kind.LOCKS, self._name, json.dumps(owner).encode())

    def withdraw(self, backend: Backend) -> None:
        backend.delete(Kind.LOCKS, self._name)

    def release(self) -> None:
        """Drop the flock (once)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
