"""plan_layout: what a restore in place changes in a whole-memory member's layout."""

from __future__ import annotations

import pytest

from cpcoord.errors import RestoreRefused
from cpcoord.mapfacts import MapFact
from nodeagent.proc.procfs import Mapping
from nodeagent.restore.layout_plan import FileCheck, LayoutChange, Reprotect, plan_layout

P = 4096


def cut(s: int, e: int, perms: str = "rw-p", path: str = "", inode: int = 0) -> MapFact:
    dev = "08:01" if inode else "00:00"
    return MapFact(s * P, e * P, perms, dev, inode, 0, path,
                   file_size=3 * P if inode else 0, file_mtime_ns=7)  # fmt: skip


def now(s: int, e: int, perms: str = "rw-p", path: str = "", inode: int = 0) -> Mapping:
    return Mapping(s * P, e * P, perms, 0, "08:01" if inode else "00:00", inode, path)


def same_file(f: MapFact) -> str:
    return ""


def plan(c: list[MapFact], n: list[Mapping], files: FileCheck = same_file) -> LayoutChange:
    return plan_layout("m", c, n, 100 * P, files)


def pages(spans: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    return [(a // P, b // P) for a, b in spans]


def test_unchanged_maps_change_nothing() -> None:
    c = [cut(10, 12), cut(20, 21, "r-xp", "/lib/x.so", 5)]
    ch = plan(c, [now(10, 12), now(20, 21, "r-xp", "/lib/x.so", 5)])
    assert ch.empty and len(ch.expected) == 2


def test_new_mappings_are_parked_and_removed_ones_recreated() -> None:
    ch = plan(
        [cut(10, 15), cut(20, 22), cut(50, 52, "---p")],
        [now(10, 13), now(20, 25), now(40, 41)],
    )
    assert pages(ch.park) == [(22, 25), (40, 41)]
    assert [(f.start // P, f.end // P, f.perms) for f in ch.create] == [
        (13, 15, "rw-p"),
        (50, 52, "---p"),
    ]
    assert not ch.protect and ch.brk_to is None


def test_another_backing_at_the_same_address_is_parked_then_recreated() -> None:
    ch = plan([cut(10, 12)], [now(10, 12, "rw-p", "/tmp/f", 9)])
    assert pages(ch.park) == [(10, 12)]
    assert [(f.start // P, f.end // P) for f in ch.create] == [(10, 12)]


def test_protections_go_back() -> None:
    ch = plan([cut(10, 14), cut(20, 21, "r--p")], [now(10, 11), now(11, 12, "r--p"),
               now(12, 14), now(20, 21)])  # fmt: skip
    assert ch.protect == (
        Reprotect(11 * P, 12 * P, "rw-p", "r--p"),
        Reprotect(20 * P, 21 * P, "r--p", "rw-p"),
    )


def test_heap_grown_is_parked_and_brk_lowered() -> None:
    ch = plan([cut(100, 104, path="[heap]")], [now(100, 110, path="[heap]")])
    assert pages(ch.park) == [(104, 110)] and ch.brk_to == 104 * P and not ch.create


def test_heap_shrunk_comes_back_through_brk() -> None:
    ch = plan([cut(100, 104, path="[heap]")], [now(100, 101, path="[heap]")])
    assert ch.brk_to == 104 * P and not ch.park and not ch.create


def test_heap_gone_and_new_heap() -> None:
    assert plan([cut(100, 104, path="[heap]")], []).brk_to == 104 * P
    ch = plan([], [now(100, 103, path="[heap]")])
    assert ch.brk_to == 100 * P and pages(ch.park) == [(100, 103)]


def test_a_grown_stack_is_kept() -> None:
    ch = plan([cut(500, 510, path="[stack]")], [now(490, 510, path="[stack]")])
    assert ch.empty
    assert (ch.expected[0].start, ch.expected[0].end) == (490 * P, 510 * P)


def test_a_removed_file_mapping_needs_the_unchanged_file() -> None:
    c = [cut(10, 12, "rw-p", "/tmp/f", 9)]
    assert plan(c, []).create == (c[0],)
    with pytest.raises(RestoreRefused, match="changed since the cut"):
        plan(c, [], lambda f: f"the file {f.path} changed since the cut")


@pytest.mark.parametrize(
    ("fact", "says"),
    [
        (cut(10, 12, "rw-s", "/dev/zero (deleted)", 4), "cannot be opened again"),
        (cut(10, 12, "rw-s"), "shared anonymous"),
        (cut(10, 12, "r--p"), "not captured"),
        (cut(10, 12, "rw-p", "/memfd:x (deleted)", 4), "cannot be opened again"),
        (cut(10, 12, "r--p", "[vvar]"), "kernel mapping"),
    ],
)
def test_what_cannot_be_recreated_is_refused(fact: MapFact, says: str) -> None:
    with pytest.raises(RestoreRefused, match=says):
        plan([fact], [])


def test_a_new_kernel_mapping_is_refused() -> None:
    with pytest.raises(RestoreRefused, match="kernel mapping"):
        plan([], [now(10, 12, "r-xp", "[vdso]")])
