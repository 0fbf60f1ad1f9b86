"""uffd.py: the ABI numbers, the range -> page conversion, run merging, and the scanner's
resume loop (on the test process's own memory: the kernel is the only oracle here)."""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.pages import pages_of_ranges
from nodeagent.proc import uffd
from nodeagent.proc.procfs import Mapping
from nodeagent.trackers import uffd_avail
from nodeagent.trackers.uffd_open import high_fd_floor
from nodeagent.trackers.uffd_spans import spans_of
from tests.conftest import require

PAGE = 4096


def test_abi_numbers_match_the_kernel_headers() -> None:
    # Values from include/uapi/linux/{userfaultfd,fs}.h as compiled by gcc (Linux 6.18).
    assert uffd.UFFDIO_API == 0xC018AA3F
    assert uffd.UFFDIO_REGISTER == 0xC020AA00
    assert uffd.UFFDIO_UNREGISTER == 0x8010AA01
    assert uffd.UFFDIO_WRITEPROTECT == 0xC018AA06
    assert uffd.PAGEMAP_SCAN == 0xC0606610
    assert ctypes.sizeof(uffd.PmScanArg) == 96
    assert uffd.UFFD_FEATURE_WP_ASYNC == 1 << 15
    assert uffd.UFFD_FEATURE_WP_UNPOPULATED == 1 << 13


@st.composite
def disjoint_ranges(draw: st.DrawFn) -> list[tuple[int, int]]:
    gaps = draw(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 40)), max_size=30))
    out, pos = [], draw(st.integers(0, 1 << 30))
    for gap, length in gaps:
        pos += gap
        out.append((pos * PAGE, (pos + length) * PAGE))
        pos += length
    return out


@given(disjoint_ranges())
def test_pages_of_ranges_equals_the_naive_expansion(ranges: list[tuple[int, int]]) -> None:
    want = [p for s, e in ranges for p in range(s // PAGE, e // PAGE)]
    got = pages_of_ranges([s for s, _ in ranges], [e for _, e in ranges])
    assert got.dtype == np.uint64
    assert got.tolist() == want


def test_pages_of_ranges_empty() -> None:
    assert pages_of_ranges([], []).size == 0
    assert pages_of_ranges([PAGE], [PAGE]).size == 0


def _m(start: int, end: int, perms: str = "rw-p", path: str = "") -> Mapping:
    return Mapping(start * PAGE, end * PAGE, perms, 0, "00:00", 1 if path else 0, path)


def _pairs(maps: list[Mapping], tracked: list[Mapping], **kw: object) -> list[tuple[int, int]]:
    sp = spans_of(maps, tracked, **kw)  # type: ignore[arg-type]
    return [(a // PAGE, b // PAGE) for a, b in sp.pairs()]


def test_spans_cross_holes_and_guards_only() -> None:
    a, b, c, d, f, g, h = (
        _m(0, 4),
        _m(5, 6),
        _m(7, 9),
        _m(10, 12),
        _m(13, 14),
        _m(14, 15),
        _m(15, 16),
    )
    guard, lib, other = _m(6, 7, "---p"), _m(9, 10, "r--p", "/lib/x.so"), _m(12, 13)
    maps = [a, b, guard, c, lib, d, other, f, g, h]
    tracked = [a, b, c, d, f, g, h]  # `other` is writable but holds no region
    bar = frozenset({g.start})  # could not be registered
    assert _pairs(maps, tracked, join=True, barriers=bar) == [(0, 9), (10, 12), (13, 14), (15, 16)]
    assert _pairs(maps, tracked, join=False, barriers=bar) == [
        (0, 6),
        (7, 9),
        (10, 12),
        (13, 14),
        (15, 16),
    ]
    # A guard at the edge of a span is not part of it; maps given out of order are sorted.
    assert _pairs([guard, b], [b], join=True) == [(5, 6)]
    assert _pairs([], [], join=True) == []


_KINDS = ("tracked", "guard", "lib", "other", "barrier")


@given(st.lists(st.tuples(st.sampled_from(_KINDS), st.integers(0, 3), st.integers(1, 4))))
def test_spans_equal_the_naive_walk(layout: list[tuple[str, int, int]]) -> None:
    maps, tracked, bar, kinds = [], [], set(), []
    pos = 0
    for kind, gap, size in layout:
        pos += gap
        perms, path = {"guard": ("---p", ""), "lib": ("r-xp", "/lib/y")}.get(kind, ("rw-p", ""))
        m = _m(pos, pos + size, perms, path)
        pos += size
        maps.append(m)
        kinds.append(kind)
        if kind in ("tracked", "barrier"):
            tracked.append(m)
        if kind == "barrier":
            bar.add(m.start)
    for join in (True, False):
        want: list[tuple[int, int]] = []
        cur: list[int] | None = None
        for m, kind in zip(maps, kinds, strict=True):
            if kind == "tracked":
                cur = [m.start, m.end] if cur is None else [cur[0], m.end]
            elif kind == "guard" and join:
                continue
            else:
                if cur is not None:
                    want.append((cur[0] // PAGE, cur[1] // PAGE))
                cur = None
        if cur is not None:
            want.append((cur[0] // PAGE, cur[1] // PAGE))
        assert _pairs(maps, tracked, join=join, barriers=frozenset(bar)) == want


def test_high_fd_floor_stays_below_the_limit_and_the_ceiling() -> None:
    assert high_fd_floor(1024) == 1008
    assert high_fd_floor(1 << 20) == high_fd_floor(None) == 4080
    assert high_fd_floor(10) == 0  # too low a limit: keep the number userfaultfd gave


@pytest.fixture
def own_uffd() -> tuple[int, mmap.mmap, int]:
    avail = uffd_avail.availability()
    require(avail.available, f"uffd-wp: {avail.reason}")
    fd = uffd.userfaultfd(uffd.O_CLOEXEC | uffd.O_NONBLOCK | uffd.UFFD_USER_MODE_ONLY)
    uffd.ioctl(fd, uffd.UFFDIO_API, uffd.UffdioApi(uffd.UFFD_API, uffd.REQUIRED_FEATURES, 0))
    buf = mmap.mmap(-1, 16 * PAGE)
    buf.madvise(mmap.MADV_NOHUGEPAGE)
    for i in range(16):
        buf[i * PAGE] = 1
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    reg = uffd.UffdioRegister(addr, 16 * PAGE, uffd.UFFDIO_REGISTER_MODE_WP, 0)
    uffd.ioctl(fd, uffd.UFFDIO_REGISTER, reg)
    return fd, buf, addr


def test_scanner_resumes_when_the_vector_is_full(own_uffd: tuple[int, mmap.mmap, int]) -> None:
    fd, buf, addr = own_uffd
    sc = uffd.PagemapScanner(os.getpid(), vec_len=2)
    try:
        flags = uffd.PM_SCAN_WP_MATCHING | uffd.PM_SCAN_CHECK_WPASYNC
        armed = sc.scan(
            addr, addr + 16 * PAGE, flags=flags, anyof=uffd.PAGE_TAKEN, returns=uffd.PAGE_TAKEN
        )
        assert armed[:, :2].tolist() == [[addr, addr + 16 * PAGE]]
        for i in (1, 3, 4, 9, 15):
            buf[i * PAGE + 5] = 2
        sc.reset()
        calls = sc.calls
        got = sc.scan(
            addr,
            addr + 16 * PAGE,
            flags=flags,
            mask=uffd.PAGE_IS_WRITTEN,
            anyof=uffd.PAGE_TAKEN,
            returns=uffd.PAGE_IS_WRITTEN | uffd.PAGE_TAKEN,
        )
        assert sc.calls - calls >= 2  # the vector filled and the walk was resumed
        pages = pages_of_ranges(got[:, 0], got[:, 1]) - np.uint64(addr // PAGE)
        assert pages.tolist() == [1, 3, 4, 9, 15]
        again = sc.scan(addr, addr + 16 * PAGE, flags=flags, mask=uffd.PAGE_IS_WRITTEN)
        assert again.size == 0  # everything reported was protected again
    finally:
        sc.close()
        os.close(fd)
        buf.close()


def test_check_wpasync_refuses_an_unregistered_range() -> None:
    require(uffd_avail.availability().available, "uffd-wp unavailable")
    buf = mmap.mmap(-1, 4 * PAGE)
    buf[0] = 1
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    sc = uffd.PagemapScanner(os.getpid())
    try:
        with pytest.raises(OSError) as e:
            sc.scan(addr, addr + 4 * PAGE, flags=uffd.PM_SCAN_CHECK_WPASYNC)
        assert e.value.errno == 1  # EPERM
    finally:
        sc.close()
        buf.close()


def test_availability_names_what_it_checked() -> None:
    a = uffd_avail.availability()
    assert a.name == "uffd-wp"
    if a.available:
        assert "PAGEMAP_SCAN works" in a.reason
    else:
        assert a.reason


def test_the_tracker_satisfies_the_protocol() -> None:
    from nodeagent.trackers.base import Tracker
    from nodeagent.trackers.uffdwp import UffdWpTracker

    t: Tracker = UffdWpTracker()
    assert t.name == "uffd-wp"
    with pytest.raises(ValueError):
        UffdWpTracker(registration="magic")
