"""The chunks of a member's last upload, where its staging still holds them: a restore
of this member reads them from memory instead of the store.

Why: the common restore is a rollback to the generation just taken, and right after a
checkpoint every chunk of it lies in the member's staging, which nothing writes until
the next capture. On the direct path the packs were written with O_DIRECT, so reading
them back means the disk (measured here, 1% of a 1 GiB member: 0.45-1.2 s for ~10 MiB
of cold packs against a few milliseconds from memory).

Safety: nothing here is trusted. `get` returns candidate bytes, copied out of staging;
the reader (cpcoord/packread.py) hashes each copy and uses it only when its BLAKE3 is
the chunk's id, else reads the pack as before. Staging's `version` (a capture wrote
it, or it was replaced) and `clobbered` (a restore's backup wrote its first bytes)
only spare hashing bytes known to have changed. The record holds the Staging object,
never a view of its memory, so it keeps no memory alive: a reader takes the buffer for
the length of one copy (nodeagent/proc/staging.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cpcoord.ranges import PAGE_SIZE
from nodeagent.proc.staging import Staging
from storecore.ids import ID_DTYPE, ID_SIZE, IdArray, search_ids

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class RecentChunks:
    """Chunk `ids[i]` (sorted, unique) was `counts[i]` pages at staging row `rows[i]`
    when staging was at `version`."""

    staging: Staging
    version: int
    ids: IdArray
    rows: I64
    counts: I64

    @classmethod
    def of(
        cls,
        staging: Staging,
        version: int,
        ids: npt.NDArray[np.uint8],
        rows: I64,
        counts: I64,
    ) -> RecentChunks:
        """From an upload's chunks: `ids` (n, 32) bytes, each chunk's first staging row
        and page count (zero entries left out by the caller)."""
        v = np.ascontiguousarray(ids, dtype=np.uint8).reshape(-1, ID_SIZE).view(ID_DTYPE).ravel()
        order = np.argsort(v, kind="stable")
        v, r, c = v[order], np.asarray(rows, np.int64)[order], np.asarray(counts, np.int64)[order]
        keep = np.ones(v.size, dtype=bool)
        keep[1:] = v[1:] != v[:-1]  # one place per id is enough
        return cls(staging, version, v[keep], r[keep], c[keep])

    @property
    def nbytes(self) -> int:
        return int(self.counts.sum()) * PAGE_SIZE

    def get(self, want: IdArray) -> list[bytes | None]:
        """Per wanted id: a copy of the bytes staging holds for it, unchecked; None when
        it holds none (or they are known to have changed)."""
        out: list[bytes | None] = [None] * int(want.size)
        st = self.staging
        if not want.size or not self.ids.size or st.version != self.version:
            return out
        arr = st.array()  # held while copying: a close meanwhile cannot unmap it
        pos = np.minimum(search_ids(self.ids, want), self.ids.size - 1)
        hit = np.asarray(np.take(self.ids, pos) == want)
        start = np.take(self.rows, pos) * PAGE_SIZE
        end = start + np.take(self.counts, pos) * PAGE_SIZE
        hit &= (start >= st.clobbered) & (end <= arr.size)
        for i, a, b in zip(
            np.flatnonzero(hit).tolist(), start[hit].tolist(), end[hit].tolist(), strict=True
        ):  # per chunk wanted, never per page
            out[i] = arr[a:b].tobytes()
        return out
