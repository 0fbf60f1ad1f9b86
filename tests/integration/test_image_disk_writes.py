"""The image writer on disk (cpcoord/image_writer.py): big page-aligned runs go O_DIRECT,
the rest through the page cache, and the files are the same either way."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import numpy as np
import pytest

import cpcoord.image_writer as image_writer
from cpcoord.image import region_bytes
from cpcoord.image_files import memory_backed
from cpcoord.image_writer import ImageWriter
from cpcoord.ranges import PAGE_SIZE
from nodeagent.proc.staging import Staging
from tests.helpers.sparse import data_extent_pages

pytestmark = pytest.mark.integration


def test_disk_writer_direct_and_buffered_give_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off tmpfs, big page-aligned runs are written with O_DIRECT, a buffer that is not
    page-aligned through the page cache: the files are the same, holes where they belong."""
    n = 3 * image_writer.DIRECT_MIN // PAGE_SIZE
    staging = Staging(n * PAGE_SIZE)
    aligned = staging.pages(0, n)
    aligned[:] = np.random.default_rng(1).integers(1, 255, aligned.shape, dtype=np.uint8)
    aligned[7] = 0
    buf = np.empty((n + 1) * PAGE_SIZE, dtype=np.uint8)
    off = (32 - buf.ctypes.data) % PAGE_SIZE
    unaligned = buf[off : off + n * PAGE_SIZE].reshape(n, PAGE_SIZE)
    unaligned[:] = aligned
    pages = np.arange(n, dtype=np.uint64)
    pages[n // 2 :] += np.uint64(5)  # two runs, 5 pages of hole between them
    zero = np.zeros(n, dtype=np.bool_)
    zero[7] = True
    direct: list[bool] = []
    real = image_writer._pwrite_all

    def spy(fd: int, view: memoryview, offset: int) -> int:
        direct.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT))
        return real(fd, view, offset)

    monkeypatch.setattr(image_writer, "_pwrite_all", spy)
    images, used = [], []
    for i, data in enumerate((aligned, unaligned)):
        direct.clear()
        w = ImageWriter(tmp_path / f"img{i}")
        start = 0x10000000
        w.add_region("m", 1, 1, "r", start, start + (n + 5) * PAGE_SIZE, pages, data, zero)
        images.append(w.commit())
        used.append(list(direct))
    staging.close()
    if not memory_backed(tmp_path):
        assert any(used[0]), "no run went O_DIRECT"
    assert not any(used[1]), "a buffer that is not page-aligned went O_DIRECT"
    a, b = (region_bytes(img, "m", "r") for img in images)
    assert np.array_equal(a, b)
    assert np.array_equal(a[: n // 2], aligned[: n // 2])
    assert not a[n // 2 : n // 2 + 5].any()
    assert np.array_equal(a[n // 2 + 5 :], aligned[n // 2 :])
    for img in images:
        path = img.path / "m" / "r.raw"
        assert data_extent_pages(path) == [(0, 7), (8, n // 2), (n // 2 + 5, n + 5)]
