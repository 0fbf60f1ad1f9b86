"""Where an in-place capture puts each page (nodeagent/capture/inplace.py): at its offset in its
own region's memory, wherever that memory lies relative to the target's addresses."""

from __future__ import annotations

from typing import Any

import numpy as np

from cpcoord.ranges import PAGE_SIZE
from nodeagent.capture import inplace
from nodeagent.capture.regions import RegionSpec


class _At:
    """A Destination stand-in that only says where regions live."""

    def __init__(self, where: dict[str, int]) -> None:
        self.where = where

    def reserve(self, regions: Any, pages: Any) -> int:
        return 0

    def address(self, name: str) -> int:
        return self.where[name]

    def rows(self, name: str) -> np.ndarray:
        raise AssertionError("not used")


def test_local_rows_of_regions_below_and_above_their_memory() -> None:
    """Each page lands at its offset in its own region's memory, wherever that memory
    lies relative to the target's addresses (lower or higher)."""
    hi, lo = 0x7F0000000000, 0x10000
    specs = [
        RegionSpec("a", hi, hi + 16 * PAGE_SIZE),
        RegionSpec("b", hi + 16 * PAGE_SIZE, hi + 32 * PAGE_SIZE),
    ]
    pa = np.array([hi // PAGE_SIZE + 1, hi // PAGE_SIZE + 2], dtype=np.uint64)
    pb = np.array([hi // PAGE_SIZE + 16], dtype=np.uint64)
    rows = inplace.local_rows(specs, [pa, pb], _At({"a": lo, "b": 0x7FFF00000000}))
    assert rows.tolist() == [lo // PAGE_SIZE + 1, lo // PAGE_SIZE + 2, 0x7FFF00000000 // PAGE_SIZE]
