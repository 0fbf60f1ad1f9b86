"""Pure state of the worker: pending changed sets, layout stability, region validation,
the tracker registry's choices. No process is stopped here (tests/integration/
test_agent_worker.py does that)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cpcoord.errors import (
    InvalidArgument,
    InvalidName,
    RangeBeyondAddressSpace,
    RangesOverlap,
    RangeUnmapped,
    TrackerUnavailable,
)
from cpcoord.gen.v1 import types_pb2
from nodeagent.capture.regions import RegionSpec
from nodeagent.daemon.membership import HeldMember, check_regions
from nodeagent.proc.procfs import Mapping, ProcessIdentity
from nodeagent.trackers import registry
from nodeagent.trackers.base import Availability

PAGE = 4096


def _member() -> HeldMember:
    return HeldMember("job", "m", ProcessIdentity(1, 1), None)


def _u64(xs: list[int]) -> np.ndarray:
    return np.array(xs, dtype=np.uint64)


def test_pending_accumulates_until_committed() -> None:
    m = _member()
    lay = {"heap": (0x1000, 0x9000)}
    m.record_capture(1, _u64([1, 2]), lay)
    m.record_capture(2, _u64([2, 7]), lay)  # generation 1 never committed (aborted)
    assert m.pending_pages().tolist() == [1, 2, 7]
    assert not m.committed_through(5)  # not a generation this member delivered for
    assert m.pending_pages().tolist() == [1, 2, 7] and m.committed == 0
    assert m.committed_through(2)  # drops 2 and everything before it
    assert m.pending_pages().size == 0 and m.committed == 2 and m.base_layout == lay
    m.record_capture(3, _u64([9]), lay)
    m.record_capture(4, _u64([11]), lay)
    assert m.committed_through(3)
    assert m.pending_pages().tolist() == [11] and m.committed == 3


def test_layout_stable_only_if_equal_in_base_and_every_pending_capture() -> None:
    m = _member()
    heap = RegionSpec("heap", 0x1000, 0x9000)
    assert not m.stable(heap)  # nothing committed: deliver whole
    m.record_capture(1, _u64([1]), {"heap": (0x1000, 0x9000)})
    m.committed_through(1)
    assert m.stable(heap)
    assert not m.stable(RegionSpec("heap", 0x1000, 0xA000))  # grew
    assert not m.stable(RegionSpec("stack", 0x1000, 0x9000))  # new name
    # An uncommitted capture saw it grown: the coordinator's parent may be either one.
    m.record_capture(2, _u64([1]), {"heap": (0x1000, 0xA000)})
    assert not m.stable(heap)
    assert not m.stable(RegionSpec("heap", 0x1000, 0xA000))
    m.committed_through(2)
    assert m.stable(RegionSpec("heap", 0x1000, 0xA000))


def _maps(*spans: tuple[int, int]) -> list[Mapping]:
    return [Mapping(s, e, "rw-p", 0, "00:00", 0, "") for s, e in spans]


def _reg(name: str, start: int, end: int) -> types_pb2.Region:
    return types_pb2.Region(name=name, start=start, end=end)


def test_check_regions_accepts_and_names() -> None:
    maps = _maps((0x10000, 0x20000), (0x30000, 0x40000))
    assert check_regions([], maps, 1) is None  # default set
    specs = check_regions([_reg("b", 0x30000, 0x31000), _reg("", 0x10000, 0x12000)], maps, 1)
    assert specs == (RegionSpec("r0", 0x10000, 0x12000), RegionSpec("b", 0x30000, 0x31000))


@pytest.mark.parametrize(
    ("regions", "error"),
    [
        ([_reg("a", 0x10001, 0x12000)], InvalidArgument),  # not page-aligned
        ([_reg("a", 0x12000, 0x12000)], InvalidArgument),  # empty
        ([_reg("a", 0x12000, 0x11000)], InvalidArgument),  # inverted
        ([_reg("a", 0x10000, 1 << 60)], RangeBeyondAddressSpace),
        ([_reg("a", 0x10000, 0x12000), _reg("b", 0x11000, 0x13000)], RangesOverlap),
        ([_reg("a", 0x10000, 0x11000), _reg("a", 0x11000, 0x12000)], InvalidArgument),
        ([_reg("../x", 0x10000, 0x11000)], InvalidName),
        ([_reg("a", 0x50000, 0x51000)], RangeUnmapped),  # touches no mapping
    ],
)
def test_check_regions_refuses(regions: list[types_pb2.Region], error: type) -> None:
    with pytest.raises(error):
        check_regions(regions, _maps((0x10000, 0x20000)), 1)


def test_registry_names_and_order() -> None:
    assert registry.canonical("full") == registry.NONE
    assert registry.canonical("") == registry.AUTO
    with pytest.raises(InvalidArgument):
        registry.canonical("dirty-bits")
    names = [a.name for a in registry.report()]
    assert names == [*registry.AUTO_ORDER, registry.NONE]
    assert registry.create(registry.NONE) is None


def test_registry_auto_picks_the_best_available(monkeypatch: pytest.MonkeyPatch) -> None:
    verdicts = {"uffd-wp": False, "soft-dirty": True, "hash": True}

    def fake(name: str) -> Availability:
        n = registry.canonical(name)
        return Availability(n, verdicts.get(n, True), "test")

    monkeypatch.setattr(registry, "availability", fake)
    assert registry.choose(registry.AUTO) == "soft-dirty"
    assert registry.choose(registry.AUTO, frozenset({"soft-dirty"})) == "hash"
    assert registry.choose(registry.AUTO, frozenset({"soft-dirty", "hash"})) == registry.NONE
    with pytest.raises(TrackerUnavailable):
        registry.choose("uffd-wp")
    assert registry.choose("hash") == "hash"


def test_reconnect_backoff_doubles_with_jitter() -> None:
    """The agent's redial schedule (nodeagent/daemon/agent.py: backoff)."""
    from nodeagent.daemon.agent import backoff

    lo = list(itertools.islice(backoff(0.2, 5.0, rand=lambda: 0.0), 8))
    hi = list(itertools.islice(backoff(0.2, 5.0, rand=lambda: 1.0), 8))
    assert lo == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.5, 2.5, 2.5])
    assert hi == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
    mid = list(itertools.islice(backoff(0.2, 5.0), 50))
    assert all(a <= m <= b for a, m, b in zip(lo + [2.5] * 42, mid, hi + [5.0] * 42, strict=True))
    assert len(set(mid)) > 40  # jittered, not lockstep


def test_appeared_pages() -> None:
    """Pages present now that the last capture did not take count as changed."""
    from nodeagent.capture.changeset import mark_appeared

    def appeared(taken: np.ndarray, before: np.ndarray) -> list[int]:
        mask = np.zeros(taken.size, dtype=np.bool_)
        mark_appeared(taken, before, mask)
        return [int(p) for p in taken[mask]]

    assert appeared(_u64([1, 2, 3]), _u64([1, 2, 3])) == []
    assert appeared(_u64([1, 2, 5, 9]), _u64([2, 3, 9])) == [1, 5]
    assert appeared(_u64([4, 7]), _u64([])) == [4, 7]
    assert appeared(_u64([]), _u64([1])) == []
    assert appeared(_u64([10, 11]), _u64([1, 2])) == [10, 11]  # past the end
