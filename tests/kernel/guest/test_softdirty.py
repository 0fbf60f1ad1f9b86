"""Soft-dirty tracker on a kernel that has it (run inside the qemu guest, see ../vm.py).

Every test fails, never skips, where soft-dirty is missing. A real target process
(testbed/target.py) writes known pages between collects; the changed set must hold
every written page, and, for pages of VMAs that existed at the last clear and were not
written since, none of them. Kernel behaviours that make the set a superset are pinned
too (new mappings, moved mappings, transparent huge pages).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import numpy as np
import pytest

from cpcoord import cli
from nodeagent.trackers import probe
from nodeagent.trackers.softdirty import SoftDirtyTracker
from testbed.driver import PAGE, Target
from tests.kernel.guest.support import (
    arm,
    changed_pages_of,
    collect,
    is_thp,
    pages_of,
    read_mapping,
    require_soft_dirty,
    within,
    write,
)

# name -> pages; page 0 and the last page become PROT_NONE guards, so no mapping of the
# interpreter can merge with ours (a merge after the clear marks the merged VMA dirty).
# At most 511 pages: no 2 MiB-aligned huge page fits, so precision is per 4 KiB page
# (the target madvises MADV_HUGEPAGE on every mapping, for "h").
MAPS = {"a": 64, "b": 300, "c": 16, "d": 3}
# Mappings of the other tests: writer threads, changes of mappings, a huge-page mapping.
OTHER_MAPS = {"w": 256, "idle": 64, "keep": 32, "grow": 16, "ro": 8, "h": 2048}


def inner(name: str) -> range:
    return range(1, MAPS[name] - 1)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One target for the whole module: a Python process costs seconds under TCG. Each
    test arms the tracker afresh and looks only at its own mappings."""
    require_soft_dirty()
    maps = [f"{n}:{p}" for n, p in {**MAPS, **OTHER_MAPS}.items()]
    t = Target(maps=maps, thp=True, tmpdir=tmp_path_factory.mktemp("t"))
    try:
        for n, p in MAPS.items():
            t.cmd("mprotect", name=n, page=0, count=1, prot="none")
            t.cmd("mprotect", name=n, page=p - 1, count=1, prot="none")
        yield t
    finally:
        t.close()


@pytest.fixture(scope="module")
def armed(target: Target) -> tuple[SoftDirtyTracker, Target]:
    tracker = SoftDirtyTracker()
    arm(tracker, target)
    return tracker, target


def universe(t: Target) -> np.ndarray:
    return np.concatenate([pages_of(t, n, list(inner(n))) for n in MAPS])


def test_probe_says_soft_dirty_works() -> None:
    require_soft_dirty()
    report = probe.probe_soft_dirty()
    assert report.available, report.reason
    assert all(c.ok for c in report.checks), report.checks


def test_written_pages_are_exactly_the_changed_ones(armed: tuple[SoftDirtyTracker, Target]):
    tracker, t = armed
    rng = np.random.default_rng(7)
    everything = universe(t)
    collect(tracker, t)  # start the rounds from a clean clear
    for rnd in range(1, 4):
        wrote = {}
        for n in MAPS:
            k = int(rng.integers(0, len(inner(n)) + 1))
            wrote[n] = sorted(rng.choice(list(inner(n)), size=k, replace=False).tolist())
        before = {n: read_mapping(t, n) for n in MAPS} if rnd == 1 else None
        for n, idx in wrote.items():
            write(t, n, idx, counter=1000 + rnd)
        changed, shots = collect(tracker, t, snap=MAPS)
        want = np.concatenate([pages_of(t, n, wrote[n]) for n in MAPS]).astype(np.uint64)
        got = within(changed, everything)
        missed = np.setdiff1d(want, got)
        extra = np.setdiff1d(got, want)
        assert missed.size == 0, f"round {rnd}: written pages not reported: {missed[:10]}"
        assert extra.size == 0, f"round {rnd}: untouched pages reported: {extra[:10]}"
        if before is not None:  # the writes really changed exactly those pages' bytes
            for n in MAPS:
                assert changed_pages_of(before[n], shots[n]) == wrote[n]


def test_quiet_interval_reports_none_of_our_pages(armed: tuple[SoftDirtyTracker, Target]):
    tracker, t = armed
    write(t, "b", [5, 6, 7], counter=1)
    first, _ = collect(tracker, t)
    assert set(pages_of(t, "b", [5, 6, 7]).tolist()) <= set(first.tolist())
    second, _ = collect(tracker, t)  # re-armed by the first collect; nothing written
    assert within(second, universe(t)).size == 0


@pytest.mark.parametrize("seed", range(3))
def test_random_write_patterns(armed: tuple[SoftDirtyTracker, Target], seed: int) -> None:
    """Property over random patterns (seeded, so a failure reproduces; hypothesis is left
    out because importing it costs ~10 s under TCG): for any runs of pages written between
    two collects, the changed set restricted to our pages equals the written pages."""
    tracker, t = armed
    rng = np.random.default_rng(seed)
    collect(tracker, t)
    for rnd in range(8):
        wrote: dict[str, set[int]] = {n: set() for n in MAPS}
        for _ in range(int(rng.integers(0, 9))):
            n = str(rng.choice(sorted(MAPS)))
            lo = 1 + int(rng.integers(0, len(inner(n))))
            hi = min(lo + int(rng.integers(1, 41)), MAPS[n] - 1)
            wrote[n].update(range(lo, hi))
        for n, idx in wrote.items():
            write(t, n, idx, counter=100 * seed + rnd)
        changed, _ = collect(tracker, t)
        want = np.concatenate([pages_of(t, n, sorted(wrote[n])) for n in MAPS])
        got = within(changed, universe(t))
        assert np.array_equal(np.unique(want), got), f"seed {seed} round {rnd}: {wrote}"


def test_writer_threads_every_content_change_is_reported(target: Target) -> None:
    """Four threads keep writing while collects freeze and re-arm; every page whose bytes
    changed between two collects (copied in the same frozen windows) is reported."""
    t = target
    tracker = SoftDirtyTracker()
    arm(tracker, t)
    _, shots = collect(tracker, t, snap=["w", "idle"])
    t.cmd("writers", name="w", count=4)
    busy_rounds = 0
    try:
        for _ in range(20):  # a loaded host may starve the writers of a round; bounded
            before = shots
            time.sleep(0.2)
            changed, shots = collect(tracker, t, snap=["w", "idle"])
            moved = changed_pages_of(before["w"], shots["w"])
            reported = set(changed.tolist())
            missed = set(pages_of(t, "w", moved).tolist()) - reported
            assert not missed, f"changed bytes, not reported: {sorted(missed)[:8]}"
            assert changed_pages_of(before["idle"], shots["idle"]) == []
            busy_rounds += bool(moved)
            if busy_rounds >= 4:
                break
    finally:
        t.cmd("stop_writers")
        tracker.forget(None)
    assert busy_rounds >= 4, "the writers hardly wrote: the test would prove nothing"


def test_new_grown_and_moved_mappings_count_fully(target: Target) -> None:
    """VM_SOFTDIRTY: a VMA created (or moved by mremap) after the clear reports every
    present page, written or not; pages dropped by MADV_DONTNEED are not reported until
    written again; a page made writable again by mprotect is reported when written."""
    t = target
    t.cmd("mprotect", name="ro", page=0, count=8, prot="r")
    tracker = SoftDirtyTracker()
    arm(tracker, t)
    t.cmd("mmap", name="new", pages=24)
    t.cmd("grow", name="grow", pages=400)
    t.cmd("dontneed", name="keep", page=0, count=8)
    write(t, "keep", [2], counter=3)
    t.cmd("mprotect", name="ro", page=0, count=8, prot="rw")
    write(t, "ro", [4], counter=3)
    changed, _ = collect(tracker, t)
    have = set(changed.tolist())
    assert set(pages_of(t, "new").tolist()) <= have
    assert set(pages_of(t, "grow").tolist()) <= have
    keep = set(pages_of(t, "keep").tolist()) & have
    assert pages_of(t, "keep", [2])[0] in keep
    assert not keep & set(pages_of(t, "keep", [0, 1, 3, 4, 5, 6, 7]).tolist())
    assert pages_of(t, "ro", [4])[0] in have


def test_huge_page_is_reported_whole(target: Target) -> None:
    """A write into a transparent huge page marks all of it (512 pages); elsewhere the
    tracker stays per page. Which it was is read from /proc/kpageflags."""
    t = target
    tracker = SoftDirtyTracker()
    arm(tracker, t)
    m = t.mapping("h")
    # Page 100 of the first 2 MiB-aligned block inside the mapping.
    huge_size = 2 << 20
    block0 = (-(-m.addr // huge_size) * huge_size - m.addr) // PAGE
    page = block0 + 100
    write(t, "h", [page], counter=9)
    huge = is_thp(t.pid, m.page(page))
    changed, _ = collect(tracker, t)
    got = within(changed, pages_of(t, "h"))
    assert pages_of(t, "h", [page])[0] in got
    if huge:
        block = pages_of(t, "h", range(block0, block0 + 512))
        assert np.array_equal(got, block), "a THP write should mark exactly its huge page"
    else:
        assert got.tolist() == pages_of(t, "h", [page]).tolist()


def test_cpcoord_check_in_guest(capsys: pytest.CaptureFixture[str]) -> None:
    """`cpcoord check` here: soft-dirty works, so exit 0; uffd-wp needs Linux >= 6.7.
    (In-process: another interpreter start costs seconds under TCG.)"""
    require_soft_dirty()
    assert cli.main(["check", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    by = {x["name"]: x for x in doc["trackers"]}
    assert by["soft-dirty"]["available"], by["soft-dirty"]
    assert "soft-dirty" in doc["kernel_assisted"]
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    if (major, minor) < (6, 7):
        assert not by["uffd-wp"]["available"]
        assert "WP_ASYNC" in by["uffd-wp"]["reason"], by["uffd-wp"]
