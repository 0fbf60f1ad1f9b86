"""The hash tracker on real processes: exact changed sets across several mappings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest

from cpcoord.ranges import PAGE_SHIFT
from nodeagent.proc.freeze import frozen
from nodeagent.proc.procfs import Mapping, ProcessIdentity, read_maps
from nodeagent.trackers.hashtrk import HashTracker
from testbed.driver import Target

pytestmark = pytest.mark.integration


def _pages(t: Target, name: str, first: int, count: int) -> np.ndarray:
    base = t.mapping(name).addr >> PAGE_SHIFT
    return np.arange(base + first, base + first + count, dtype=np.uint64)


def _maps(t: Target, names: list[str]) -> list[Mapping]:
    """The target's mappings clipped to the named ones (the kernel may merge neighbours)."""
    out = []
    for n in names:
        lo, hi = t.mapping(n).addr, t.mapping(n).end
        out += [
            replace(m, start=max(m.start, lo), end=min(m.end, hi))
            for m in read_maps(t.pid)
            if m.start < hi and m.end > lo
        ]
    return out


def test_changed_set_is_exactly_the_rewritten_pages(
    target_factory: Callable[..., Target],
) -> None:
    t = target_factory(maps=["hot:64", "cold:32", "mf:16:memfd"])
    ident = ProcessIdentity.of(t.pid)
    tr = HashTracker(batch_bytes=16 * 4096)  # several batches per scan
    names = ["hot", "cold", "mf"]
    with frozen(ident) as fp:
        tr.arm(fp, _maps(t, names))
    # The shared memfd has no digests: shared mappings count as changed at every
    # capture (changeset.always_changed_runs), the tracker answers for private ones.
    assert tr.table_bytes == (64 + 32) * 24

    t.cmd("write", name="hot", page=3, count=5, counter=7)
    t.cmd("write", name="mf", page=15, count=1, counter=7)
    t.cmd("write", name="cold", page=0, count=2, counter=0)  # same bytes as before
    with frozen(ident) as fp:
        got = tr.collect(fp, _maps(t, names))
    assert np.array_equal(got.pages, _pages(t, "hot", 3, 5))

    with frozen(ident) as fp:  # nothing written since: nothing changed
        assert len(tr.collect(fp, _maps(t, names))) == 0
    t.assert_running()


def test_vanished_pages_are_not_changed_and_return_as_new(
    target_factory: Callable[..., Target],
) -> None:
    t = target_factory(maps=["data:32"])
    ident = ProcessIdentity.of(t.pid)
    tr = HashTracker()
    with frozen(ident) as fp:
        tr.arm(fp, _maps(t, ["data"]))
    t.cmd("dontneed", name="data", page=4, count=4)
    with frozen(ident) as fp:
        assert len(tr.collect(fp, _maps(t, ["data"]))) == 0
    # Touching them again (zero-filled, present): newly present counts as changed.
    t.cmd("zero", name="data", page=4, count=2)
    with frozen(ident) as fp:
        got = tr.collect(fp, _maps(t, ["data"]))
    assert np.array_equal(got.pages, _pages(t, "data", 4, 2))
    tr.forget(None)
    assert tr.table_bytes == 0
