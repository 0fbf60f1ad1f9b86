"""uffd-wp plugged into the capture engine: an incremental capture copies exactly the
written pages, and their bytes equal those of a full capture taken at the same state."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from cpcoord.ranges import AddressRange
from nodeagent.capture.process import Capture, capture
from nodeagent.proc.freeze import FrozenProcess
from nodeagent.proc.procfs import Mapping
from nodeagent.trackers.base import ChangedSet
from nodeagent.trackers.uffdwp import UffdWpTracker
from tests.helpers.uffd_target import PAGE, MemTarget

pytestmark = pytest.mark.integration


class UffdHooks:
    """Full capture and arm the first time; collect (which re-arms) afterwards."""

    def __init__(self, ranges: Sequence[AddressRange]) -> None:
        self.tracker = UffdWpTracker()
        self.ranges = ranges
        self.armed = False

    def _mine(self, maps: Sequence[Mapping]) -> list[Mapping]:
        return [m for m in maps if any(m.start < r.end and m.end > r.start for r in self.ranges)]

    def changed(self, fp: FrozenProcess, maps: Sequence[Mapping]) -> ChangedSet | None:
        return self.tracker.collect(fp, self._mine(maps)) if self.armed else None

    def after_copy(self, fp: FrozenProcess, maps: Sequence[Mapping]) -> None:
        if not self.armed:
            self.tracker.arm(fp, self._mine(maps))
            self.armed = True


@pytest.fixture
def target(c_target: Path) -> Iterator[MemTarget]:
    t = MemTarget(c_target, 64, 32)
    yield t
    if t.proc.poll() is None:
        t.proc.kill()
        t.proc.wait()


def _pages(c: Capture) -> dict[int, bytes]:
    """Absolute page number -> bytes, over every region of the capture."""
    out: dict[int, bytes] = {}
    for r in c.regions:
        base = r.start // PAGE
        for off, row in zip(r.pages.tolist(), r.data, strict=True):
            out[base + off] = row.tobytes()
    return out


def test_incremental_capture_copies_exactly_the_written_pages(target: MemTarget) -> None:
    t = target
    ranges = [AddressRange(s, s + n) for s, n in t.regions]
    hooks = UffdHooks(ranges)
    first = capture(t.ident, ranges, hooks=hooks)
    assert not first.incremental and first.pages == 96
    written = sorted([t.pages(0)[1], t.pages(0)[40], t.pages(1)[0], t.pages(1)[31]])
    t.write(written)
    inc = capture(t.ident, ranges, hooks=hooks)
    assert inc.incremental
    inc_pages = _pages(inc)
    assert sorted(inc_pages) == written
    full = _pages(capture(t.ident, ranges))
    assert all(inc_pages[p] == full[p] for p in written)
    assert len(full) == 96
    # Nothing written since: the next incremental copies nothing.
    again = capture(t.ident, ranges, hooks=hooks)
    assert again.pages == 0
    assert np.all([r.all_pages.size for r in again.regions])  # the pages are all still there
    assert inc.timings.frozen < 1.0
