"""Where a sparse file holds data (SEEK_DATA/SEEK_HOLE): for the tests that check an
image's region files allocate exactly the captured pages and leave holes elsewhere."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from cpcoord.ranges import PAGE_SIZE


def data_extents(path: Path) -> list[tuple[int, int]]:
    """[start, end) byte ranges of a sparse file that hold data."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                a = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            b = os.lseek(fd, a, os.SEEK_HOLE)
            out.append((a, b))
            pos = b
    finally:
        os.close(fd)
    return out


def data_extent_pages(path: Path) -> list[tuple[int, int]]:
    """[first page, end page) of each data extent of the file."""
    return [(a // PAGE_SIZE, b // PAGE_SIZE) for a, b in data_extents(path)]
