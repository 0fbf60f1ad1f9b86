"""The per-mapping pieces of the frozen window, against naive references:
tracked mappings by binary search, deliver sets in bulk, maps read once per change."""

from __future__ import annotations

import subprocess
import time

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.capture import changeset, trackstate
from nodeagent.capture.regions import RegionSpec
from nodeagent.proc import mapscache
from nodeagent.proc.procfs import Mapping

PAGE = 4096


def _layout(items: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, pos = [], 0
    for gap, size in items:
        pos += gap
        out.append((pos, pos + size))
        pos += size
    return out


@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(1, 5)), max_size=25),
    st.lists(st.tuples(st.integers(0, 6), st.integers(1, 8)), max_size=10),
)
def test_tracked_maps_equals_the_naive_overlap(
    maps_in: list[tuple[int, int]], specs_in: list[tuple[int, int]]
) -> None:
    maps = [Mapping(a * PAGE, b * PAGE, "rw-p", 0, "00:00", 0, "") for a, b in _layout(maps_in)]
    specs = [RegionSpec(f"r{i}", a * PAGE, b * PAGE) for i, (a, b) in enumerate(_layout(specs_in))]
    want = [m for m in maps if any(m.start < s.end and s.start < m.end for s in specs)]
    assert trackstate.tracked_mappings(specs, maps) == want


@given(
    st.lists(st.lists(st.integers(0, 30), unique=True, max_size=12), max_size=8),
    st.lists(st.integers(0, 400), unique=True, max_size=60),
    st.data(),
)
def test_pick_equals_the_per_region_rule(
    per_region: list[list[int]], changed_in: list[int], data: st.DataObject
) -> None:
    taken = [
        np.array(sorted(p), dtype=np.uint64) + np.uint64(50 * i) for i, p in enumerate(per_region)
    ]
    now = np.concatenate(taken) if taken else np.zeros(0, dtype=np.uint64)
    changed = np.array(sorted(changed_in), dtype=np.uint64)
    whole = np.array(
        data.draw(st.lists(st.booleans(), min_size=len(taken), max_size=len(taken))), dtype=np.bool_
    )
    out, delivered = changeset.pick(taken, now, changed, whole)
    want = [t if w else t[np.isin(t, changed)] for t, w in zip(taken, whole, strict=True)]
    assert [o.tolist() for o in out] == [w.tolist() for w in want]
    assert delivered.tolist() == [int(p) for w in want for p in w]


def test_maps_are_shared_while_unchanged_and_derived_once() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])  # maps that do not change
    try:
        time.sleep(0.05)
        a = mapscache.read_maps_shared(sleeper.pid)
        assert mapscache.read_maps_shared(sleeper.pid) is a  # the text did not change
    finally:
        sleeper.kill()
        sleeper.wait()
    calls = []

    @mapscache.derived
    def count(maps: list[Mapping], flag: bool = False) -> int:
        calls.append(1)
        return len(maps)

    m1 = [Mapping(0, PAGE, "rw-p", 0, "00:00", 0, "")]
    m2 = list(m1)  # equal, but another list: computed again
    assert count(m1) == count(m1) == 1 and len(calls) == 1
    assert count(m2) == 1 and len(calls) == 2
    assert count(m1, flag=True) == 1 and len(calls) == 3  # other arguments, by value


@given(
    st.lists(st.lists(st.integers(0, 30), unique=True, max_size=12), max_size=8),
    st.lists(st.integers(0, 400), unique=True, max_size=60),
)
def test_pick_without_whole_regions_is_the_per_region_intersection(
    per_region: list[list[int]], changed_in: list[int]
) -> None:
    taken = [
        np.array(sorted(p), dtype=np.uint64) + np.uint64(50 * i) for i, p in enumerate(per_region)
    ]
    changed = np.array(sorted(changed_in), dtype=np.uint64)
    now = np.concatenate(taken) if taken else np.zeros(0, dtype=np.uint64)
    got = changeset.pick(taken, now, changed)[0]
    assert [g.tolist() for g in got] == [
        [int(p) for p in t if int(p) in set(changed_in)] for t in taken
    ]
