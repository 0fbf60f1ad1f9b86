"""The fit check's comparison of a region's mappings now with those at the cut
(nodeagent/restore/fit.py, cpcoord/mapfacts.py), on synthetic /proc/PID/maps lines, and
the pure arithmetic of all-or-nothing writing (nodeagent/restore/undo.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpcoord.errors import ContentsInvalid, RegionMismatch
from cpcoord.gen.v1 import manifest_pb2
from cpcoord.mapfacts import MapFact, check_facts, differs, facts_for
from nodeagent.proc.procfs import Mapping
from nodeagent.proc.writer import ZERO_CHUNK, zero_source
from nodeagent.restore.apply import MemberLayout, RegionLayout
from nodeagent.restore.backup import Backed
from nodeagent.restore.fit import check_layout, fit_region
from nodeagent.restore.plan import Plan
from nodeagent.restore.undo import rollback_pieces, split

P = 4096
A = 0x7F0000000000


def anon(start: int, end: int, perms: str = "rw-p", path: str = "") -> Mapping:
    return Mapping(start, end, perms, start >> 12, "00:00", 0, path)


def file(start: int, end: int, inode: int = 42, offset: int = 0, perms: str = "rw-p") -> Mapping:
    return Mapping(start, end, perms, offset, "fd:01", inode, f"/data/f{inode}")


def region(cut: list[Mapping], start: int = A, end: int = A + 16 * P) -> RegionLayout:
    (facts,) = facts_for(cut, [(start, end)])
    return RegionLayout("r", start, end, mappings=facts)


def misfit(r: RegionLayout, now: list[Mapping]) -> str:
    with pytest.raises(RegionMismatch) as e:
        fit_region("m", r, now, explicit=True)
    return str(e.value)


def test_same_mappings_fit_also_split_merged_and_grown() -> None:
    r = region([anon(A, A + 16 * P)])
    fit_region("m", r, [anon(A, A + 16 * P)], explicit=True)
    fit_region("m", r, [anon(A, A + 4 * P), anon(A + 4 * P, A + 16 * P)], explicit=True)
    fit_region("m", r, [anon(A - P, A + 64 * P)], explicit=True)  # grew both ways
    two = region([file(A, A + 8 * P), file(A + 8 * P, A + 16 * P, offset=8 * P)])
    fit_region("m", two, [file(A, A + 16 * P)], explicit=True)  # merged: same offsets


@pytest.mark.parametrize(
    ("now", "says"),
    [
        ([anon(A, A + 16 * P, "r--p")], "permissions rw- -> r--"),
        ([anon(A, A + 16 * P, "rwxp")], "permissions rw- -> rwx"),
        ([anon(A, A + 16 * P, "rw-s")], "private -> shared"),
        ([file(A, A + 16 * P)], "anonymous memory -> /data/f42 (dev fd:01 inode 42"),
        ([anon(A, A + 8 * P), anon(A + 8 * P, A + 16 * P, "r--p")], "at 0x7f0000008000"),
    ],
)
def test_anonymous_region_remapped_is_a_misfit(now: list[Mapping], says: str) -> None:
    out = misfit(region([anon(A, A + 16 * P)]), now)
    assert "member m does not fit the generation: region r" in out
    assert says in out, out


@pytest.mark.parametrize(
    ("now", "says"),
    [
        ([file(A, A + 16 * P, inode=43)], "inode 42 offset 0x0) -> /data/f43"),
        ([file(A, A + 16 * P, offset=P)], "file offset 0x0 -> 0x1000"),
        ([anon(A, A + 16 * P)], "-> anonymous memory"),
    ],
)
def test_file_region_remapped_is_a_misfit(now: list[Mapping], says: str) -> None:
    assert says in misfit(region([file(A, A + 16 * P)]), now)


def test_bytes_unmapped_at_the_cut_must_stay_unmapped() -> None:
    r = region([anon(A, A + 4 * P), anon(A + 8 * P, A + 16 * P)])
    assert "was not mapped at the cut" in misfit(r, [anon(A, A + 16 * P)])


def test_without_facts_a_default_region_must_stay_readable_writable_and_of_its_kind() -> None:
    old = RegionLayout(f"anon-{A:x}", A, A + 4 * P)  # an older generation: no mappings
    fit_region("m", old, [anon(A, A + 4 * P)], explicit=False)
    fit_region("m", old, [anon(A, A + 4 * P, "r--p")], explicit=True)  # explicit: mapped only
    with pytest.raises(RegionMismatch, match="is r--p now"):
        fit_region("m", old, [anon(A, A + 4 * P, "r--p")], explicit=False)
    with pytest.raises(RegionMismatch, match="'file-f42' mapping now"):
        fit_region("m", old, [file(A, A + 4 * P)], explicit=False)


def test_bad_facts_in_a_layout_are_refused() -> None:
    bad = MapFact(A, A + 32 * P, "rw-p", "00:00", 0, 0)  # beyond the region
    lay = MemberLayout("m", (RegionLayout("r", A, A + 16 * P, mappings=(bad,)),))
    with pytest.raises(ContentsInvalid, match="outside the region"):
        check_layout(lay)


def test_facts_round_trip_and_validate() -> None:
    f = MapFact(A, A + P, "r-xs", "08:1f", 9, 0x3000, "/x")
    assert MapFact.from_proto(manifest_pb2.RegionMapping.FromString(
        f.to_proto().SerializeToString())) == f  # fmt: skip
    assert check_facts([f], A, A + P) == ""
    assert "permissions" in check_facts([MapFact(A, A + P, "rwq", "0:0", 0, 0)], A, A + P)
    assert "page-aligned" in check_facts([MapFact(A, A + 1, "rw-p", "0:0", 0, 0)], A, A + P)
    assert differs(f, f) == ""


@given(st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_facts_for_clips_each_range_to_its_mappings(sizes: list[int]) -> None:
    maps, at = [], A
    for i, n in enumerate(sizes):
        maps.append(file(at, at + n * P, inode=i + 1, offset=P))
        at += n * P + (P if i % 3 == 0 else 0)  # some holes
    lo, hi = A + P, at - P
    (got,) = facts_for(maps, [(lo, hi)])
    assert check_facts(got, lo, hi) == ""
    assert sum(f.end - f.start for f in got) == sum(
        max(0, min(m.end, hi) - max(m.start, lo)) for m in maps
    )
    for f in got:
        m = next(m for m in maps if m.start <= f.start < m.end)
        assert f.offset == m.offset + (f.start - m.start)


# -- all or nothing: steps and put-back pieces ------------------------------------------


def plan(pieces: list[tuple[int, int, int]]) -> Plan:
    """Pieces (address, length, local address; 0 = zeros)."""
    zs = zero_source()
    remote = np.array([[a, n] for a, n, _ in pieces], dtype=np.uint64)
    local = np.array([[lo or zs, n] for _, n, lo in pieces], dtype=np.uint64)
    forced = np.zeros(len(pieces), dtype=bool)
    return Plan(remote, local, forced, int(remote[:, 1].sum()), 0, ())


def test_split_cuts_long_pieces_into_steps_and_keeps_every_byte() -> None:
    src = 0x10000000
    p = plan([(A, 20 << 20, src), (A + (32 << 20), 3 * P, 0), (A + (40 << 20), P, src)])
    s = split(p, step=8 << 20)
    assert int(s.remote[:, 1].sum()) == (20 << 20) + 4 * P
    assert s.remote[:3, 1].tolist() == [8 << 20, 8 << 20, 4 << 20]
    assert s.local[:3, 0].tolist() == [src, src + (8 << 20), src + (16 << 20)]
    assert int(s.local[3, 0]) == zero_source()  # a zero piece keeps the zero source
    assert s.bounds[0] == 0 and s.bounds[-1] == s.remote.shape[0]
    assert s.count == 3


def test_rollback_covers_whole_steps_and_the_written_prefix_of_the_failed_one() -> None:
    def backed(runs: list[tuple[int, int, int]]) -> Backed:
        r = np.array([[a, n] for a, n, _ in runs], dtype=np.uint64)
        addr = np.array([x for _, _, x in runs], dtype=np.uint64)
        return Backed(r, addr, np.zeros(len(runs), bool), 0)

    done = backed([(A, 2 * P, 0x1000000), (A + 2 * P, ZERO_CHUNK + P, 0)])
    failed = backed([(A + (64 << 20), 4 * P, 0x2000000), (A + (65 << 20), 4 * P, 0x3000000)])
    remote, local, _ = rollback_pieces([done], failed, 5 * P + 100)
    spans = [(int(a), int(n)) for a, n in remote]
    assert spans == [
        (A, 2 * P),
        (A + 2 * P, ZERO_CHUNK),  # zeros, in pieces the zero source holds
        (A + 2 * P + ZERO_CHUNK, P),
        (A + (64 << 20), 4 * P),
        (A + (65 << 20), P + 100),  # the prefix that was written, to the byte
    ]
    assert local[1, 0] == local[2, 0] == zero_source()
    assert int(local[4, 0]) == 0x3000000
    r0, _, _ = rollback_pieces([done], failed, 0)
    assert int(r0[:, 1].sum()) == 2 * P + ZERO_CHUNK + P


def test_the_manifest_keeps_each_regions_mappings_and_old_ones_load_without() -> None:
    from coordinator.store import manifest_io
    from coordinator.store.manifest import Manifest, MemberMap, PageTable, RegionMap

    facts = (MapFact(A, A + 2 * P, "rw-p", "00:00", 0, 0, "[heap]"),
             MapFact(A + 2 * P, A + 4 * P, "r--p", "fd:01", 7, 0x2000, "/lib/x"))  # fmt: skip
    with_facts = RegionMap("r", A, A + 4 * P, PageTable.empty(), facts)
    without = RegionMap("s", A + 8 * P, A + 9 * P, PageTable.empty())
    m = Manifest("j", 1, None, 0, P, (MemberMap("m", (with_facts, without)),), "job:j")
    back = manifest_io.decode(manifest_io.encode(m))
    assert back.member("m").region("r").mappings == facts
    assert back.member("m").region("s").mappings == ()
    bad = RegionMap("r", A, A + P, PageTable.empty(), facts)  # facts outside the region
    with pytest.raises(Exception, match="mappings at the cut"):
        Manifest("j", 1, None, 0, P, (MemberMap("m", (bad,)),), "job:j").validate()
