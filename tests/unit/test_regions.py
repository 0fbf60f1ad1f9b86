"""Region resolution: the default set rule, names, range alignment, segments."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpcoord.errors import RangesOverlap, RangeUnmapped
from cpcoord.ranges import PAGE_SIZE, AddressRange, check_name
from nodeagent.capture.regions import (
    default_region_name,
    default_regions,
    is_default_mapping,
    new_or_changed_pages,
    range_regions,
    segment_pages,
    segments,
)
from nodeagent.proc.procfs import Mapping, parse_maps

MAPS = """\
55d0c2a00000-55d0c2a01000 r--p 00000000 fd:01 1001 /usr/bin/prog
55d0c2a01000-55d0c2a02000 rw-p 00001000 fd:01 1001 /usr/bin/prog
55d0c2a3b000-55d0c2a5c000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f0000100000-7f0000101000 ---p 00000000 00:00 0
7f0000101000-7f0000200000 rw-s 00000000 00:01 77 /dev/zero (deleted)
7f0000200000-7f0000300000 rw-s 00000000 00:01 78 /memfd:buf (deleted)
7f0000300000-7f0000400000 rw-s 00000000 00:01 65536 /SYSV00000000 (deleted)
7f0000400000-7f0000500000 rw-s 00000000 fd:01 2002 /data/shared.bin
7f0000500000-7f0000600000 rw-s 00000000 fd:01 2003 /data/gone.bin (deleted)
7f0000600000-7f0000700000 r--p 00000000 fd:01 2004 /usr/lib/libc.so.6
7f0000700000-7f0000701000 -w-p 00000000 00:00 0
7f0000701000-7f0000702000 rw-p 00000000 00:00 0 [anon:jit heap]
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]
7ffc00100000-7ffc00102000 r--p 00000000 00:00 0 [vvar]
"""


def test_default_set_rule() -> None:
    maps = parse_maps(MAPS)
    chosen = {r.name for r in default_regions(maps)}
    assert chosen == {
        "file-prog-55d0c2a01000",  # private writable file data (.data)
        "heap",
        "anon-7f0000000000",
        "shmem-7f0000101000",  # shared anonymous
        "memfd-buf-7f0000200000",
        "sysv-00000000-7f0000300000",
        "file-gone.bin-7f0000500000",  # shared, but the file is deleted: only copy left
        "anon-jit_heap-7f0000701000",
        "stack",
    }
    shared_file = next(m for m in maps if m.path == "/data/shared.bin")
    assert not is_default_mapping(shared_file)
    no_read = next(m for m in maps if m.perms == "-w-p")
    assert not is_default_mapping(no_read)


def test_default_names_are_valid_unique_and_address_suffixed_when_ambiguous() -> None:
    text = MAPS + "7ffd00000000-7ffd00001000 rw-p 00000000 00:00 0 [stack]\n"
    names = [r.name for r in default_regions(parse_maps(text))]
    assert len(names) == len(set(names))
    assert "stack-7ffc00000000" in names and "stack-7ffd00000000" in names
    for n in names:
        check_name(n)
    long = Mapping(0x7F0000000000, 0x7F0000001000, "rw-p", 0, "fd:01", 9, "/x/" + "a" * 200)
    name = default_region_name(long)
    assert len(name) <= 64 and name.endswith("-7f0000000000")
    check_name(name)


def test_range_regions_align_inward_and_sort() -> None:
    maps = parse_maps(MAPS)
    r1 = AddressRange(0x7F0000000010, 0x7F0000003005)  # unaligned both ends
    r2 = AddressRange(0x55D0C2A3B000, 0x55D0C2A3D000)
    specs = range_regions([r1, r2], maps, 42)
    assert [s.start for s in specs] == [0x55D0C2A3B000, 0x7F0000001000]
    s = specs[1]
    assert (s.start, s.end) == (0x7F0000001000, 0x7F0000003000)
    assert s.name == "range-7f0000001000-7f0000003000"
    assert s.requested == r1


def test_range_errors() -> None:
    maps = parse_maps(MAPS)
    with pytest.raises(RangeUnmapped) as e:
        range_regions([AddressRange(0x1000, 0x5000)], maps, 42)
    assert str(e.value) == "range 0x1000-0x5000 is not mapped in pid 42"
    a = AddressRange(0x7F0000000000, 0x7F0000003000)
    b = AddressRange(0x7F0000002000, 0x7F0000005000)  # both take page 0x7f0000002000
    with pytest.raises(RangesOverlap) as o:
        range_regions([a, b], maps, 42)
    assert "0x7f0000000000-0x7f0000003000 and 0x7f0000002000-0x7f0000005000 overlap" in str(o.value)
    # Bytes may overlap as long as no whole page is taken twice: the shared partial page
    # belongs to neither range.
    c = AddressRange(0x7F0000002800, 0x7F0000006000)
    a2 = AddressRange(0x7F0000000000, 0x7F0000002C00)
    assert len(range_regions([a2, c], maps, 42)) == 2


def test_segments_skip_unreadable_mappings() -> None:
    maps = parse_maps(MAPS)
    spec = range_regions([AddressRange(0x7F00000FF000, 0x7F0000102000)], maps, 1)[0]
    assert segments(spec, maps) == [
        (0x7F00000FF000, 0x7F0000100000),
        (0x7F0000101000, 0x7F0000102000),
    ]


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[Mapping], list[AddressRange]]:
    bounds = sorted(draw(st.lists(st.integers(1, 400), min_size=2, max_size=40, unique=True)))
    maps = []
    for a, b in zip(bounds[0::2], bounds[1::2], strict=False):
        perms = draw(st.sampled_from(["rw-p", "r--p", "---p", "rw-s"]))
        maps.append(Mapping(a * PAGE_SIZE, b * PAGE_SIZE, perms, 0, "00:00", 0, ""))
    cuts = sorted(draw(st.lists(st.integers(0, 401 * PAGE_SIZE), max_size=12, unique=True)))
    ranges = [
        AddressRange(a, b)
        for a, b in zip(cuts[0::2], cuts[1::2], strict=False)
        if AddressRange(a, b).page_end > AddressRange(a, b).page_start
    ]
    return maps, ranges


@settings(max_examples=80, deadline=None)
@given(layouts())
def test_segment_pages_equals_per_page_reference(
    layout: tuple[list[Mapping], list[AddressRange]],
) -> None:
    maps, ranges = layout
    specs = [
        s
        for s in (
            range_regions([r], maps, 1)[0]
            for r in ranges
            if any(m.start < r.page_end and r.page_start < m.end for m in maps)
        )
    ]
    specs.sort(key=lambda s: s.start)
    specs = [s for i, s in enumerate(specs) if i == 0 or s.start >= specs[i - 1].end]
    lo, hi = segment_pages(specs, maps)
    got = np.zeros(402, dtype=bool)
    for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
        assert not got[a:b].any(), "segments overlap"
        got[a:b] = True
    want = np.zeros(402, dtype=bool)
    for s in specs:
        for m in maps:
            if m.readable:
                a, b = max(s.start, m.start) // PAGE_SIZE, min(s.end, m.end) // PAGE_SIZE
                want[a : max(a, b)] = True
    assert np.array_equal(got, want)
    assert np.all(np.diff(lo.astype(np.int64)) > 0) if lo.size > 1 else True


def test_new_or_changed_pages() -> None:
    armed = parse_maps(
        "7f0000000000-7f0000004000 rw-p 00000000 00:00 0\n"
        "7f0000010000-7f0000012000 rw-p 00000000 00:00 0 [heap]\n"
        "7f0000020000-7f0000022000 rw-p 00000000 00:00 0\n"
        "7f0000030000-7f0000031000 rw-p 00000000 00:00 0\n"
    )
    now = parse_maps(
        "7f0000000000-7f0000004000 rw-p 00000000 00:00 0\n"  # unchanged
        "7f0000010000-7f0000013000 rw-p 00000000 00:00 0 [heap]\n"  # grown by one page
        "7f0000020000-7f0000022000 r--p 00000000 00:00 0\n"  # mprotect: fully changed
        "7f0000040000-7f0000042000 rw-p 00000000 00:00 0\n"  # new (or moved here)
        "7f0000050000-7f0000051000 ---p 00000000 00:00 0\n"  # unreadable: never read
    )
    base = 0x7F0000000000 >> 12
    got = (new_or_changed_pages(armed, now) - np.uint64(base)).tolist()
    assert got == [0x12, 0x20, 0x21, 0x40, 0x41]
    assert new_or_changed_pages(armed, armed).size == 0
