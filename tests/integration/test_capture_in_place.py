"""Captures that copy straight into an image's region files on tmpfs (cpcoord/image_files.py).

The in-place image must be the very image the staged path writes: same image.json, same
bytes, zero pages (and pages not stored) as holes, holes of shared objects never
allocated; the copy while frozen takes no page fault on our side; pages or regions that
differ between the pre-pass and the cut are handled inside the window. Targets are real
processes with known contents (testbed/target.py).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cpcoord.image_files as image_files
import nodeagent.capture.process as capmod
import nodeagent.proc.reader as readermod
from cpcoord.image import Image, load_image, region_bytes
from cpcoord.image_files import memory_backed
from cpcoord.image_writer import ImageWriter
from cpcoord.ranges import PAGE_SIZE, AddressRange
from nodeagent.capture.process import Capture, capture
from nodeagent.capture.regions import RegionSpec
from nodeagent.proc.freeze import frozen
from nodeagent.proc.pagemap import PagemapReader
from nodeagent.proc.procfs import Mapping, ProcessIdentity
from testbed import patterns
from testbed.driver import REPO, Target
from tests.conftest import require
from tests.helpers.sparse import data_extent_pages

pytestmark = pytest.mark.integration
MakeTarget = Callable[..., Target]


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A fresh directory on tmpfs (where captures go in place)."""
    base = Path("/dev/shm")
    require(base.is_dir() and memory_backed(base), "no tmpfs at /dev/shm")
    d = Path(tempfile.mkdtemp(prefix=f"cpt-inplace-{os.getpid()}-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def runs_extents(offsets: np.ndarray) -> list[tuple[int, int]]:
    p = np.asarray(offsets, dtype=np.int64)
    if p.size == 0:
        return []
    brk = np.flatnonzero(np.diff(p) != 1) + 1
    lo, hi = np.concatenate(([0], brk)), np.concatenate((brk, [p.size]))
    return [(int(p[a]), int(p[b - 1]) + 1) for a, b in zip(lo, hi, strict=True)]


def write_staged(cap: Capture, out: Path, member: str) -> Image:
    w = ImageWriter(out)
    w.add_member(member, cap.ident.pid, cap.ident.start_time)
    for r in cap.regions:
        w.add_region(
            member, cap.ident.pid, cap.ident.start_time, r.name, r.start, r.end, r.pages,
            r.data, r.zero,
        )  # fmt: skip
    return w.commit()


def record_in_place(w: ImageWriter, cap: Capture, member: str) -> Image:
    w.add_member(member, cap.ident.pid, cap.ident.start_time)
    for r in cap.regions:
        assert r.in_place
        w.add_region_in_place(
            member, cap.ident.pid, cap.ident.start_time, r.name, r.start, r.end, r.pages, r.zero
        )
    return w.commit()


def assert_same_image(a: Image, b: Image, member: str) -> None:
    ra, rb = a.member(member).regions, b.member(member).regions
    assert [(r.name, r.start, r.end) for r in ra] == [(r.name, r.start, r.end) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert np.array_equal(x.pages, y.pages), x.name
        assert np.array_equal(region_bytes(a, member, x.name), region_bytes(b, member, y.name))


def test_in_place_image_is_the_staged_image(
    target_factory: MakeTarget, tmp_path: Path, shm_dir: Path
) -> None:
    """One cut, captured both ways (the default set: heap, stacks, Python's own memory,
    and our mappings with zero pages, dropped pages and a sparse memfd): the images are
    the same, and the in-place files hold data exactly where non-zero pages are."""
    t = target_factory(
        maps=["a:512", "z:64:anon:zero", "d:300", "m:4096:memfd:none"], writers=["a:2"]
    )
    t.cmd("dontneed", name="d", page=10, count=100)
    t.cmd("zero", name="d", page=200, count=7)
    for page in (0, 999, 4000):
        t.cmd("write", name="m", page=page, count=3, counter=5)
    ident = ProcessIdentity.of(t.pid)
    w = ImageWriter(shm_dir / "img")
    files = w.in_place("m0")
    assert files is not None
    with frozen(ident) as fp:
        staged = capture(ident, None, fp=fp)
        inplace = capture(ident, None, fp=fp, into=files)
    t.assert_running()
    a = write_staged(staged, tmp_path / "staged", "m0")
    b = record_in_place(w, inplace, "m0")
    img = load_image(shm_dir / "img")
    # First (reading a tmpfs file through a mapping allocates the holes it reads).
    for reg, r in zip(img.member("m0").regions, inplace.regions, strict=True):
        path = img.path / "m0" / f"{reg.name}.raw"
        assert os.stat(path).st_size == reg.end - reg.start
        assert data_extent_pages(path) == runs_extents(r.pages[~r.zero]), reg.name
    mm = t.mapping("m")
    assert os.stat(img.path / "m0" / f"{region_of(img, mm)}.raw").st_blocks * 512 <= (
        9 * PAGE_SIZE
    ), "holes of the memfd were allocated"
    assert_same_image(a, b, "m0")
    # Our mappings, byte for byte, and the writers' pages from one instant.
    am = t.mapping("a")
    words = np.array(reg_rows(img, am)).view(np.uint64).reshape(512, patterns.WORDS)
    patterns.check_writer(words[:256], am.id, 0, 256)  # two writers, a half each
    patterns.check_writer(words[256:], am.id, 256, 256)
    mrows = reg_rows(img, mm)
    for page in (0, 999, 4000):
        assert np.array_equal(mrows[page : page + 3], t.expected("m", page, 3, counter=5))
    assert sorted(p.name for p in (shm_dir / "img" / "m0").iterdir()) == sorted(
        f"{r.name}.raw" for r in img.member("m0").regions
    )


def region_of(img: Image, m: Any) -> str:
    for r in img.member("m0").regions:
        if r.start <= m.addr < r.end:
            return r.name
    raise AssertionError(f"no region holds 0x{m.addr:x}")


def reg_rows(img: Image, m: Any) -> np.ndarray:
    name = region_of(img, m)
    r = img.member("m0").region(name)
    first = (m.addr - r.start) // PAGE_SIZE
    return region_bytes(img, "m0", name)[first : first + m.pages]


class _NoPopulate:
    """image_files' libc without MADV_POPULATE_READ: pages allocated but not mapped."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def madvise(self, addr: int, size: int, advice: int) -> int:
        return (
            0
            if advice == image_files.MADV_POPULATE_READ
            else int(self._real.madvise(addr, size, advice))
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.mark.parametrize("populate", [True, False], ids=["populated", "control-unpopulated"])
def test_copy_while_frozen_takes_no_page_fault(
    target_factory: MakeTarget,
    shm_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    populate: bool,
) -> None:
    """The in-place copy writes into pages mapped before the freeze: the copying thread
    takes no minor fault for them. The control run (no populate) shows the count would
    see them: one per page."""
    t = target_factory(maps=["a:1024"])
    a = t.mapping("a")
    if not populate:
        monkeypatch.setattr(image_files, "_libc", _NoPopulate(image_files._libc))
    faults: list[int] = []
    real = readermod.transfer

    def counted(*args: Any) -> int:  # the process_vm_readv calls of the copy
        f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        try:
            return real(*args)
        finally:
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0)

    monkeypatch.setattr(readermod, "transfer", counted)
    w = ImageWriter(shm_dir / "img")
    files = w.in_place("m0")
    assert files is not None
    cap = capture(ProcessIdentity.of(t.pid), [AddressRange(a.addr, a.end)], into=files)
    (r,) = cap.regions
    assert np.array_equal(r.data, t.expected("a", 0, 1024))
    # None per page (a stray fault of the interpreter's own heap may happen anywhere).
    if populate:
        assert len(faults) == 1 and faults[0] < 16, faults
    else:
        assert faults[0] >= 1024, faults
    w.abort()
    t.assert_running()


def test_pages_that_appear_after_the_pre_pass_are_reserved_while_frozen(
    target_factory: MakeTarget, shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = target_factory(maps=["a:2048"])
    a = t.mapping("a")
    real = capmod.select_pages
    calls: list[int] = []

    def short_first(pm: PagemapReader, specs: Sequence[RegionSpec], *rest: Any) -> Any:
        calls.append(1)
        got = real(pm, specs, *rest)
        return [p[:0] for p in got] if len(calls) == 1 else got

    monkeypatch.setattr(capmod, "select_pages", short_first)
    w = ImageWriter(shm_dir / "img")
    files = w.in_place("m0")
    assert files is not None
    cap = capture(ProcessIdentity.of(t.pid), [AddressRange(a.addr, a.end)], into=files)
    img = record_in_place(w, cap, "m0")
    (reg,) = img.member("m0").regions
    assert np.array_equal(region_bytes(img, "m0", reg.name), t.expected("a", 0, 2048))
    t.assert_running()


def test_regions_that_change_between_the_pre_pass_and_the_cut(
    target_factory: MakeTarget, shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pre-pass sees region `x` one page shorter and a region `ghost` that is gone at
    the cut: `x` starts over at its real bounds, `ghost`'s file is not in the image."""
    t = target_factory(maps=["a:64", "g:32"])
    a, g = t.mapping("a"), t.mapping("g")
    calls: list[int] = []

    def regions(ranges: Any, maps: Sequence[Mapping], pid: int) -> list[RegionSpec]:
        calls.append(1)
        if len(calls) == 1:
            first = [RegionSpec("x", a.addr, a.end - PAGE_SIZE), RegionSpec("ghost", g.addr, g.end)]
            return sorted(first, key=lambda s: s.start)
        return [RegionSpec("x", a.addr, a.end)]

    monkeypatch.setattr(capmod, "resolve_regions", regions)
    w = ImageWriter(shm_dir / "img")
    files = w.in_place("m0")
    assert files is not None
    cap = capture(ProcessIdentity.of(t.pid), None, into=files)
    img = record_in_place(w, cap, "m0")
    assert [r.name for r in img.member("m0").regions] == ["x"]
    assert np.array_equal(region_bytes(img, "m0", "x"), t.expected("a", 0, 64))
    assert sorted(p.name for p in (img.path / "m0").iterdir()) == ["x.raw"]
    t.assert_running()


def test_cli_onto_tmpfs_writes_the_image_in_place(
    target_factory: MakeTarget, shm_dir: Path
) -> None:
    """`cpcoord capture` as a user runs it, default regions and tracker, image on tmpfs:
    our mappings exact, zero pages are holes, nothing but the image in the directory."""
    t = target_factory(maps=["a:256", "b:64"], writers=["a:2"])
    t.cmd("zero", name="b", page=4, count=8)
    t.cmd("dontneed", name="b", page=30, count=10)
    out = shm_dir / "img"
    argv = [sys.executable, "-m", "cpcoord", "capture", "--pid", str(t.pid), "--name", "m0"]
    argv += ["--out", str(out), "--json"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    t.assert_running()
    img = load_image(out)
    am, bm = t.mapping("a"), t.mapping("b")
    name = region_of(img, bm)
    first = (bm.addr - img.member("m0").region(name).start) // PAGE_SIZE
    ext = data_extent_pages(out / "m0" / f"{name}.raw")  # before any read (reads allocate)
    for lo, hi in [(first + 4, first + 12), (first + 30, first + 40)]:
        assert not any(s < hi and lo < e for s, e in ext), (lo, hi, ext)
    words = np.array(reg_rows(img, am)).view(np.uint64).reshape(256, patterns.WORDS)
    patterns.check_writer(words[:128], am.id, 0, 128)  # two writers, a half each
    patterns.check_writer(words[128:], am.id, 128, 128)
    want = t.expected("b", 0, 64)
    want[4:12] = 0
    want[30:40] = 0
    assert np.array_equal(reg_rows(img, bm), want)
    stored = sum(int(r.pages[:, 1].sum()) for r in img.member("m0").regions)
    assert stored == summary["pages"]
    raws = {p.name for p in (out / "m0").iterdir()}
    assert raws == {f"{r.name}.raw" for r in img.member("m0").regions}
    assert {p.name for p in out.iterdir()} == {"image.json", "m0", ".tracker"}


def test_holes_of_shared_objects_are_never_allocated(
    target_factory: MakeTarget, tmp_path: Path
) -> None:
    """A 64 MiB memfd with 12 pages written, captured in place onto a 4 MiB tmpfs: the
    holes are never reserved (they would not fit), and the image holds the data pages."""
    t = target_factory(maps=["big:16384:memfd:none"])
    for page in (0, 5000, 16380):
        t.cmd("write", name="big", page=page, count=4, counter=9)
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)])
    require(r.returncode == 0, "cannot mount a small tmpfs")
    try:
        _capture_sparse_memfd(t, mnt / "img")
    finally:
        gc.collect()  # the capture's views of the mappings
        subprocess.run(["umount", "--lazy", str(mnt)], check=True)


def _capture_sparse_memfd(t: Target, out: Path) -> None:
    m = t.mapping("big")
    w = ImageWriter(out)
    try:
        files = w.in_place("m0")
        assert files is not None
        cap = capture(ProcessIdentity.of(t.pid), [AddressRange(m.addr, m.end)], into=files)
        img = record_in_place(w, cap, "m0")
        (reg,) = img.member("m0").regions
        assert reg.pages.tolist() == [[0, 16384]]
        path = img.path / "m0" / f"{reg.name}.raw"
        assert data_extent_pages(path) == [(0, 4), (5000, 5004), (16380, 16384)]
        with open(path, "rb") as f:  # read(), not a mapping: holes stay holes
            for page in (0, 5000, 16380):
                got = np.frombuffer(os.pread(f.fileno(), 4 * PAGE_SIZE, page * PAGE_SIZE), np.uint8)
                assert np.array_equal(got.reshape(4, PAGE_SIZE), t.expected("big", page, 4, 9))
        t.assert_running()
    finally:
        w.abort()  # unmaps (the capture's views go when it returns)


@pytest.mark.parametrize("in_place", [False, True], ids=["staging", "in-place"])
def test_copy_shared_out_to_threads_with_fallbacks(
    target_factory: MakeTarget, shm_dir: Path, monkeypatch: pytest.MonkeyPatch, in_place: bool
) -> None:
    """A copy cut into shares on three threads (made to happen at 1 MiB), where
    process_vm_readv gives up part-way through each call: every byte still arrives, the
    rest of each piece through /proc/PID/mem, in staging and in place alike."""
    monkeypatch.setattr(readermod, "PARALLEL_MIN", 1 << 20)
    monkeypatch.setattr(readermod, "COPY_PIECE", 96 * PAGE_SIZE)
    monkeypatch.setattr(readermod, "COPY_THREADS", 3)
    t = target_factory(maps=["a:1024", "b:700"])
    a, b = t.mapping("a"), t.mapping("b")
    t.cmd("mprotect", name="a", page=300, count=2, prot="none")
    shares: list[int] = []
    real = readermod._shares

    def counted(*args: Any) -> Any:
        out = real(*args)
        shares.append(len(out))
        return out

    monkeypatch.setattr(readermod, "_shares", counted)

    def flaky(pid: int, local: int, nlocal: int, remote: int, nremote: int) -> int:
        got = readermod.sys_readv(pid, local, nlocal, remote, 1)
        return min(got, 5 * PAGE_SIZE)

    w = ImageWriter(shm_dir / "img")
    files = w.in_place("m0") if in_place else None
    ranges = [AddressRange(a.addr, a.end), AddressRange(b.addr, b.end)]
    cap = capture(ProcessIdentity.of(t.pid), ranges, readv=flaky, into=files)
    ra, rb = (next(r for r in cap.regions if r.start == m.addr) for m in (a, b))
    assert cap.fallback_bytes > 0 and shares == [3]
    keep = [p for p in range(1024) if not 300 <= p < 302]
    assert np.array_equal(ra.data, t.expected("a", 0, 1024)[keep])
    assert np.array_equal(rb.data, t.expected("b", 0, 700))
    w.abort()
    t.assert_running()
