"""Manifests: save/load round trips, corruption always detected, validation, overlay."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.store import manifest_io
from coordinator.store.manifest import Manifest, MemberMap, PageTable, RegionMap, overlay
from cpcoord.errors import DataCorrupted, ManifestInvalid, StoreError
from storecore.ids import ZERO_BYTES, as_id_array, ids_to_bytes

PS = 4096
IDS = [os.urandom(32) for _ in range(6)] + [ZERO_BYTES]


@st.composite
def page_tables(draw: st.DrawFn, region_pages: int) -> PageTable:
    """Sorted, disjoint entries inside a region of region_pages pages."""
    offsets, counts, ids, skips = [], [], [], []
    page = draw(st.integers(0, 3))
    while page < region_pages and draw(st.integers(0, 9)):
        count = draw(st.integers(1, min(8, region_pages - page)))
        cid = draw(st.sampled_from(IDS))
        offsets.append(page)
        counts.append(count)
        ids.append(cid)
        skips.append(0 if cid == ZERO_BYTES else draw(st.integers(0, 3)))
        page += count + draw(st.integers(0, 3))
    if not offsets:
        return PageTable.empty()
    return PageTable.of(offsets, counts, ids, skips)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    members = []
    for mi in range(draw(st.integers(0, 3))):
        regions = []
        for ri in range(draw(st.integers(0, 3))):
            pages = draw(st.integers(1, 64))
            start = (ri + 1) << 32
            name = draw(st.sampled_from(["heap", "stack", "[anon]", "/lib/x.so", "r"])) + str(ri)
            regions.append(RegionMap(name, start, start + pages * PS, draw(page_tables(pages))))
        members.append(MemberMap(f"rank-{mi}", tuple(regions)))
    gen = draw(st.integers(1, 1 << 40))
    parent = draw(st.one_of(st.none(), st.integers(1, gen - 1) if gen > 1 else st.none()))
    return Manifest(
        job=draw(st.sampled_from(["train-42", "j", "a.b_c-d"])),
        generation=gen,
        parent=parent,
        time_ns=draw(st.integers(0, 1 << 62)),
        page_size=PS,
        members=tuple(members),
        namespace=draw(st.sampled_from(["", "job:train-42", "shared"])),
    )


@settings(max_examples=150, deadline=None)
@given(manifests())
def test_round_trip(m: Manifest) -> None:
    data = manifest_io.encode(m)
    back = manifest_io.decode(data, "t")
    assert back == m
    assert back.page_count == m.page_count and back.zero_pages == m.zero_pages


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(manifests(), st.data())
def test_truncation_and_bit_flips_are_detected(m: Manifest, data: st.DataObject) -> None:
    raw = bytearray(manifest_io.encode(m))
    if data.draw(st.booleans()):
        for _ in range(data.draw(st.integers(1, 3))):
            bit = data.draw(st.integers(0, len(raw) * 8 - 1))
            raw[bit // 8] ^= 1 << (bit % 8)
        if bytes(raw) == manifest_io.encode(m):
            return  # flips cancelled out
    else:
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    with pytest.raises(DataCorrupted):
        manifest_io.decode(bytes(raw), "t")


def test_large_region_is_split_into_frames() -> None:
    n = 200_000
    ids = np.frombuffer(os.urandom(32 * n), dtype="V32")
    t = PageTable.of(np.arange(n) * 2, np.ones(n), ids)
    m = Manifest("j", 1, None, 0, PS, (MemberMap("m", (RegionMap("r", 0, 2 * n * PS, t),)),))
    data = manifest_io.encode(m)
    assert len(data) < n * 48 + 4096  # columns, not per-entry messages
    assert manifest_io.decode(data) == m


def _m(region: RegionMap, **kw: object) -> Manifest:
    base: dict[str, object] = {
        "job": "j",
        "generation": 2,
        "parent": 1,
        "time_ns": 0,
        "page_size": PS,
        "members": (MemberMap("m", (region,)),),
    }
    base.update(kw)
    return Manifest(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "region, kw, why",
    [
        (RegionMap("r", 1, PS), {}, "page-aligned"),
        (RegionMap("r", PS, PS), {}, "page-aligned"),
        (RegionMap("r", 0, 4 * PS, PageTable.of([0, 1], [2, 1], IDS[:2])), {}, "sorted"),
        (RegionMap("r", 0, 4 * PS, PageTable.of([3], [2], IDS[:1])), {}, "beyond"),
        (RegionMap("r", 0, 4 * PS, PageTable.of([0], [0], IDS[:1])), {}, "no page"),
        (RegionMap("r", 0, 4 * PS, PageTable.of([0], [1], [ZERO_BYTES], [1])), {}, "skip"),
        (RegionMap("r", 0, PS), {"parent": 2}, "parent"),
        (RegionMap("r", 0, PS), {"generation": 0, "parent": None}, "start at 1"),
        (RegionMap("r", 0, PS), {"page_size": 3000}, "page size"),
        (RegionMap("", 0, PS), {}, "region name"),
    ],
)
def test_validation(region: RegionMap, kw: dict[str, object], why: str) -> None:
    with pytest.raises(ManifestInvalid, match=why):
        _m(region, **kw).validate()
    with pytest.raises(StoreError):
        manifest_io.encode(_m(region, **kw))


def test_duplicate_names_refused() -> None:
    r = RegionMap("r", 0, PS)
    with pytest.raises(ManifestInvalid, match="duplicate member"):
        _m(r, members=(MemberMap("m", (r,)), MemberMap("m", ()))).validate()
    with pytest.raises(ManifestInvalid, match="duplicate region"):
        _m(r, members=(MemberMap("m", (r, r)),)).validate()


# -- overlay ----------------------------------------------------------------------------


def per_page(t: PageTable) -> dict[int, tuple[bytes, int]]:
    """Page -> (chunk id, page within chunk): the model overlay must agree with."""
    out = {}
    for o, c, s, cid in zip(t.offsets, t.counts, t.skips, ids_to_bytes(t.ids), strict=True):
        for k in range(int(c)):
            out[int(o) + k] = (cid, 0 if cid == ZERO_BYTES else int(s) + k)
    return out


@settings(max_examples=200, deadline=None)
@given(page_tables(64), page_tables(64), st.one_of(st.none(), st.sets(st.integers(0, 63))))
def test_overlay_matches_per_page_model(
    base: PageTable, delta: PageTable, present: set[int] | None
) -> None:
    pr = None if present is None else np.array(sorted(present), dtype=np.uint64)
    got = overlay(base, delta, pr)
    assert not got.problems(64)
    expect = per_page(base)
    if present is not None:
        expect = {p: v for p, v in expect.items() if p in present}
    expect.update(per_page(delta))
    assert per_page(got) == expect
    # coalesced: no two adjacent entries could have been one
    for i in range(len(got) - 1):
        a_end = int(got.offsets[i] + got.counts[i])
        same = got.ids[i] == got.ids[i + 1]
        zero = ids_to_bytes(got.ids[i : i + 1])[0] == ZERO_BYTES
        contiguous_chunk = zero or int(got.skips[i] + got.counts[i]) == int(got.skips[i + 1])
        assert not (a_end == int(got.offsets[i + 1]) and same and contiguous_chunk)


def test_overlay_splits_a_run_chunk() -> None:
    a, b = IDS[0], IDS[1]
    base = PageTable.of([0], [16], [a])  # one 16-page chunk
    delta = PageTable.of([5], [1], [b])  # page 5 changed
    got = overlay(base, delta)
    assert list(got.offsets) == [0, 5, 6]
    assert list(got.counts) == [5, 1, 10]
    assert list(got.skips) == [0, 0, 6]
    assert ids_to_bytes(got.ids) == [a, b, a]
    assert as_id_array([a]).size == 1
