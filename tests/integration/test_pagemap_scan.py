"""Page selection through PAGEMAP_SCAN equals selection through pagemap words, on real
memory of a target: present, never-touched, read-only-touched (zero page), dropped,
guard-page and PROT_NONE pages, uffd-wp markers, and a huge page."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable

import numpy as np
import pytest

from cpcoord.ranges import PAGE_SIZE
from nodeagent.proc.pagemap import PagemapReader, taken_in
from testbed.driver import Target
from tests.conftest import require
from tests.helpers.uffd_markers import uffd_wp_markers

pytestmark = pytest.mark.integration
MakeTarget = Callable[..., Target]


def _both(pid: int, first: int, last: int) -> tuple[list[int], list[int]]:
    with PagemapReader(pid) as pm:
        scanned = pm.scanned_pages(first, last)
        words = pm.taken_pages(first, last)
    require(scanned is not None, "PAGEMAP_SCAN (Linux >= 6.7)")
    assert scanned is not None
    return scanned.tolist(), words.tolist()


def test_scan_equals_words_on_a_target(target_factory: MakeTarget) -> None:
    t = target_factory(maps=["a:64", "z:32:anon:none", "b:600"], thp=True)
    t.cmd("dontneed", name="a", page=10, count=5)
    t.cmd("guard", name="a", page=20, count=3)
    t.cmd("mprotect", name="a", page=40, count=2, prot="none")
    t.cmd("read", name="z", page=3, count=2)  # the shared zero page: present
    first = min(m.addr for m in t.mappings.values()) // PAGE_SIZE
    last = max(m.end for m in t.mappings.values()) // PAGE_SIZE
    scanned, words = _both(t.pid, first, last)
    assert scanned == words
    a = t.mapping("a").addr // PAGE_SIZE
    assert a + 9 in words and a + 10 not in words and a + 20 not in words
    t.assert_running()


def test_scan_leaves_out_uffd_wp_markers() -> None:
    mm = mmap.mmap(-1, 16 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = np.frombuffer(mm, dtype=np.uint8)
    addr = int(buf.ctypes.data)
    buf[3 * PAGE_SIZE] = 1
    fd = uffd_wp_markers(addr, 16 * PAGE_SIZE)
    require(fd is not None, "userfaultfd WP_ASYNC + WP_UNPOPULATED (Linux >= 6.7)")
    assert fd is not None
    try:
        first = addr // PAGE_SIZE
        scanned, words = _both(os.getpid(), first, first + 16)
        assert scanned == words == [first + 3]
        with PagemapReader(os.getpid()) as pm:
            lo = np.array([first], dtype=np.uint64)
            got = taken_in(pm, lo, lo + np.uint64(16), scan=True)
        assert got.tolist() == [first + 3]
    finally:
        os.close(fd)
        del buf
        mm.close()
