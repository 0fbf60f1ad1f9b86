"""Pack arenas: reused, page-aligned buffers that an open pack copies its chunks into.

A pack being built must own its chunk bytes (the caller's buffers, e.g. an agent's
staging, are reused). Copying each chunk into a fresh `bytes` object costs more than
the copy: a big allocation is a fresh mapping, and every page of it faults in (the
kernel zeroes it first; in a microVM the first touch of a guest page is slower still).
Measured here, 512 MiB of 64 KiB chunks: 0.6 s into fresh `bytes`, 0.03 s into memory
already faulted in. So a sink takes an arena per open pack from a pool, copies chunks
into it, and gives it back once the pack is stored; the pool keeps a few arenas
between packs and generations, so in steady state no chunk byte lands on a fresh page.

With an arena a pack is laid out whole in it (header, every blob, trailer: PackWriter),
so the finished pack is one page-aligned buffer that the local backend writes with
O_DIRECT straight from here (storecore/directio.py), with no bounce copy; on tmpfs (a
node cache) the one copy left is the kernel's. The mapping is private: a shared
anonymous mapping is tmpfs-backed and its first touch costs more.

An arena is handed out for one pack at a time. Views it returns stay valid until the
arena goes back to the pool (the pack's put returned): whoever returns it must drop
the pack's blobs first. Thread-safe pool; an arena itself is used by one writer.
"""

from __future__ import annotations

import contextlib
import threading

from cpcoord.anonmem import huge_map, populate
from storecore.backend import Buffer

SLACK = 8 << 20  # a pack overshoots its target by at most one add (a few MiB)
# Arenas in use at once by a sink: the open pack and the writer.MAX_IN_TRANSIT (3)
# packs in a put (an arena goes back when its put returns). Kept so that none is made
# afresh per pack.
KEEP = 4


class Arena:
    """One page-aligned buffer: `take` appends a copy and returns a view of it."""

    def __init__(self, size: int, prefault: bool = False) -> None:
        self.size = size
        self._mm = huge_map(size)
        if prefault:
            populate(self._mm)
        self._view = memoryview(self._mm)
        self.pos = 0

    def take(self, data: Buffer) -> memoryview | None:
        """A view of a copy of `data` in the arena; None when it does not fit (the
        caller copies it elsewhere)."""
        src = memoryview(data).cast("B")
        n = src.nbytes
        if self.pos + n > self.size:
            return None
        out = self._view[self.pos : self.pos + n]
        out[:] = src
        self.pos += n
        return out

    def span(self, start: int, end: int) -> memoryview:
        """The arena's bytes [start, end) (what `take` has filled)."""
        return self._view[start:end]

    def reset(self) -> None:
        self.pos = 0

    def close(self) -> None:
        # A view still held somewhere keeps the mapping: the GC unmaps it later.
        with contextlib.suppress(BufferError):
            self._view.release()
            self._mm.close()


class ArenaPool:
    """Arenas of `size` bytes; up to `keep` are kept between uses (module docstring)."""

    def __init__(self, size: int, keep: int = KEEP) -> None:
        self.size = size
        self.keep = keep
        self._free: list[Arena] = []
        self._lock = threading.Lock()
        self.created = 0

    def get(self) -> Arena:
        with self._lock:
            if self._free:
                return self._free.pop()
            self.created += 1
        return Arena(self.size)

    def warm(self, n: int) -> int:
        """Hold at least min(n, keep) free arenas, every page faulted in: an agent asks
        when it has prepared a member's staging, for as many packs as the member fills,
        so that its first checkpoint does not fault in fresh arena pages while it copies
        chunks (0.55 of 1.75 CPU s of an agent, 512 MiB member, first touch in this VM).
        A member smaller than a pack asks for none: that one arena faults in only as far
        as it is written. Returns the free arenas held."""
        with self._lock:
            want = max(0, min(n, self.keep) - len(self._free))
            self.created += want
        made = [Arena(self.size, prefault=True) for _ in range(want)]
        with self._lock:
            self._free.extend(made)
            return len(self._free)

    def put(self, arena: Arena) -> None:
        arena.reset()
        with self._lock:
            if len(self._free) < self.keep and arena.size == self.size:
                self._free.append(arena)
                return
        arena.close()

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for a in free:
            a.close()


_pools: dict[int, ArenaPool] = {}
_pools_lock = threading.Lock()


def shared_pool(pack_size: int) -> ArenaPool:
    """The process's pool for packs of `pack_size` (one per size: a store's packs)."""
    with _pools_lock:
        p = _pools.get(pack_size)
        if p is None:
            p = _pools[pack_size] = ArenaPool(pack_size + SLACK)
        return p
