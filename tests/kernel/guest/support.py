"""Helpers of the guest tests: arm/collect a tracker on a frozen target, page sets of the
target's mappings, memory snapshots and huge-page facts read from /proc."""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
import pytest

from nodeagent.proc.freeze import frozen
from nodeagent.proc.procfs import Mapping, ProcessIdentity, read_maps
from nodeagent.trackers import softdirty
from nodeagent.trackers.softdirty import SoftDirtyTracker
from testbed.driver import PAGE, Target

SHIFT = PAGE.bit_length() - 1
Pages = npt.NDArray[np.uint64]


def require_soft_dirty() -> None:
    """Fail (never skip): these tests exist to prove soft-dirty on a kernel that has it."""
    avail = softdirty.availability()
    if not avail.available:
        pytest.fail(f"soft-dirty not available on kernel {os.uname().release}: {avail.reason}")


def writable_maps(pid: int) -> list[Mapping]:
    return [m for m in read_maps(pid) if m.writable]


def arm(tracker: SoftDirtyTracker, t: Target) -> None:
    ident = ProcessIdentity.of(t.pid)
    with frozen(ident) as fp:
        tracker.arm(fp, writable_maps(t.pid))
    t.assert_running()


def collect(
    tracker: SoftDirtyTracker, t: Target, snap: Iterable[str] = ()
) -> tuple[Pages, dict[str, npt.NDArray[np.uint8]]]:
    """Collect while frozen; with `snap`, also copy those mappings' bytes in the same
    frozen window (the memory the changed set describes)."""
    ident = ProcessIdentity.of(t.pid)
    with frozen(ident) as fp:
        changed = tracker.collect(fp, writable_maps(t.pid)).pages
        shots = {name: read_mapping(t, name) for name in snap}
    t.assert_running()
    return changed, shots


def read_mapping(t: Target, name: str) -> npt.NDArray[np.uint8]:
    m = t.mapping(name)
    fd = os.open(f"/proc/{t.pid}/mem", os.O_RDONLY)
    try:
        data = os.pread(fd, m.pages * PAGE, m.addr)
    finally:
        os.close(fd)
    assert len(data) == m.pages * PAGE
    return np.frombuffer(data, dtype=np.uint8).reshape(m.pages, PAGE)


def pages_of(t: Target, name: str, idx: Iterable[int] | npt.ArrayLike | None = None) -> Pages:
    """Page numbers of mapping `name` (all of it, or the given page indices)."""
    m = t.mapping(name)
    first = m.addr >> SHIFT
    if idx is None:
        return np.arange(first, first + m.pages, dtype=np.uint64)
    return np.asarray(sorted(int(i) for i in np.asarray(idx).ravel()), dtype=np.uint64) + first


def within(changed: Pages, universe: Pages) -> Pages:
    return np.intersect1d(changed, universe).astype(np.uint64)


def changed_pages_of(before: npt.NDArray[np.uint8], after: npt.NDArray[np.uint8]) -> list[int]:
    """Indices of pages whose bytes differ."""
    return np.flatnonzero((before != after).any(axis=1)).tolist()


def runs(idx: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted page indices -> (first, count) runs, for one write command per run."""
    out: list[tuple[int, int]] = []
    for i in sorted(set(idx)):
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


def write(t: Target, name: str, idx: Iterable[int], counter: int) -> None:
    for first, count in runs(idx):
        t.cmd("write", name=name, page=first, count=count, counter=counter)


def is_thp(pid: int, addr: int) -> bool:
    """Whether the page at `addr` is part of a transparent huge page (pagemap PFN, then
    /proc/kpageflags bit 22 KPF_THP; both need root)."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek((addr >> SHIFT) * 8)
        word = int.from_bytes(f.read(8), "little")
    if not word >> 63:
        return False
    pfn = word & ((1 << 55) - 1)
    with open("/proc/kpageflags", "rb") as f:
        f.seek(pfn * 8)
        flags = int.from_bytes(f.read(8), "little")
    return bool(flags >> 22 & 1)
