"""Capture of real processes.

Targets are spawned by the tests (testbed/target.py) with known per-page stamps;
writer threads keep stamping while captures run, and patterns.check_writer proves the
captured pages equal the memory of one instant. Every test ends with the target running.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nodeagent.capture.process as capmod
from cpcoord.image import load_image, region_bytes
from cpcoord.ranges import PAGE_SIZE, AddressRange
from nodeagent.capture.process import Capture, CapturedRegion, capture
from nodeagent.capture.regions import RegionSpec, default_region_name
from nodeagent.proc.freeze import FrozenProcess
from nodeagent.proc.pagemap import PM_SWAPPED, PagemapReader
from nodeagent.proc.procfs import Mapping, ProcessIdentity, process_state, read_maps
from nodeagent.proc.reader import MemoryReader, sys_readv
from nodeagent.proc.staging import Staging
from nodeagent.trackers.base import ChangedSet
from testbed import patterns
from testbed.driver import REPO, Target, task_states
from tests.conftest import require
from tests.helpers.uffd_markers import uffd_wp_markers

pytestmark = pytest.mark.integration
MakeTarget = Callable[..., Target]


def region_at(cap: Capture, addr: int) -> CapturedRegion:
    for r in cap.regions:
        if r.start <= addr < r.end:
            return r
    raise AssertionError(f"no region holds 0x{addr:x}")


def captured_pages(cap: Capture, addr: int, count: int) -> np.ndarray:
    """`(count, PAGE)` bytes of pages at addr..; fails if any of them was not captured."""
    r = region_at(cap, addr)
    want = np.arange(count, dtype=np.uint64) + np.uint64((addr - r.start) // PAGE_SIZE)
    idx = np.searchsorted(r.pages, want)
    assert np.all(idx < r.pages.size) and np.array_equal(r.pages[idx], want), "page missing"
    return r.data[idx]


def offsets_in(r: CapturedRegion, addr: int, count: int) -> list[int]:
    """Captured page indices (relative to addr) among the `count` pages at addr."""
    base = (addr - r.start) // PAGE_SIZE
    sel = r.pages[(r.pages >= base) & (r.pages < base + count)]
    return (sel - np.uint64(base)).astype(int).tolist()


def wait_writers_past(pid: int, addr: int, steps: list[int], timeout: float = 30) -> None:
    """Wait until each writer (64 pages each at addr) has finished a step past `steps`, so
    the next capture must show a higher one. Polls the running target's memory through
    /proc/PID/mem (a fixed sleep is not enough under CI load: a writer may not run)."""
    deadline = time.monotonic() + timeout
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        while True:
            raw = os.pread(f.fileno(), 64 * len(steps) * PAGE_SIZE, addr)
            counters = np.frombuffer(raw, np.uint64).reshape(len(steps), -1)[:, 1::2]
            # The highest counter is the step in flight: one past it is complete.
            if all(int(c.max()) >= s + 2 for c, s in zip(counters, steps, strict=True)):
                return
            assert time.monotonic() < deadline, f"writers stuck at {steps}"
            time.sleep(0.01)


def test_writers_captured_at_one_instant(target_factory: MakeTarget) -> None:
    t = target_factory(maps=["hot:256", "cold:64"], writers=["hot:4"])
    ident = ProcessIdentity.of(t.pid)
    hot, cold = t.mapping("hot"), t.mapping("cold")
    staging = Staging()
    steps_seen: list[list[int]] = []
    for _ in range(6):
        cap = capture(ident, None, staging=staging)
        words = captured_pages(cap, hot.addr, 256).view(np.uint64).reshape(256, patterns.WORDS)
        steps = [
            patterns.check_writer(words[w * 64 : (w + 1) * 64], hot.id, w * 64, 64)
            for w in range(4)
        ]
        steps_seen.append(steps)
        assert np.array_equal(captured_pages(cap, cold.addr, 64), t.expected("cold", 0, 64))
        assert len(cap.regions) > 5  # the default set: heap, stacks, libraries' data, ...
        t.assert_running()
        wait_writers_past(t.pid, hot.addr, steps)
    # The writers ran between (and during) captures: their steps moved on each time.
    for w in range(4):
        assert all(a[w] < b[w] for a, b in itertools.pairwise(steps_seen))
    assert staging.allocations == 1  # reused, sized before the first freeze
    stopped = t.cmd("stop_writers")["writers"]
    assert all(s["steps"] > steps_seen[-1][i] for i, s in enumerate(stopped))


def test_unaligned_range_takes_only_whole_pages(target_factory: MakeTarget) -> None:
    t = target_factory(maps=["a:16"])
    a = t.mapping("a")
    rng = AddressRange(a.addr + 100, a.addr + 10 * PAGE_SIZE + 5)
    cap = capture(ProcessIdentity.of(t.pid), [rng])
    (r,) = cap.regions
    assert (r.start, r.end) == (a.addr + PAGE_SIZE, a.addr + 10 * PAGE_SIZE)
    assert r.name == f"range-{a.addr + PAGE_SIZE:x}-{a.addr + 10 * PAGE_SIZE:x}"
    assert r.requested == rng
    assert r.pages.tolist() == list(range(9))  # pages 1..9 of the mapping
    assert np.array_equal(r.data, t.expected("a", 1, 9))
    # A page partly outside on either side is not taken; exact page bounds take them all.
    cap2 = capture(ProcessIdentity.of(t.pid), [AddressRange(a.addr, a.addr + 10 * PAGE_SIZE)])
    assert cap2.regions[0].pages.tolist() == list(range(10))
    t.assert_running()


def test_range_across_mappings_with_guards_inside(target_factory: MakeTarget) -> None:
    t = target_factory(maps=["a:32"])
    a = t.mapping("a")
    t.cmd("mprotect", name="a", page=8, count=4, prot="none")  # PROT_NONE guard: own VMA
    t.cmd("mprotect", name="a", page=20, count=2, prot="r")  # read-only: still taken
    t.cmd("guard", name="a", page=26, count=2)  # MADV_GUARD_INSTALL inside a VMA
    maps = [m for m in _maps(t.pid) if a.addr <= m.start < a.end]
    assert len(maps) >= 4  # the one mapping is now several
    cap = capture(ProcessIdentity.of(t.pid), [AddressRange(a.addr, a.end)])
    (r,) = cap.regions
    want = [p for p in range(32) if not (8 <= p < 12 or 26 <= p < 28)]
    assert r.pages.tolist() == want
    assert cap.unreadable_pages == 0
    assert np.array_equal(r.data, t.expected("a", 0, 32)[want])
    t.assert_running()


def _maps(pid: int) -> list[Mapping]:
    return read_maps(pid)


def test_non_present_pages_are_not_taken_and_zero_pages_are_marked(
    target_factory: MakeTarget,
) -> None:
    t = target_factory(maps=["never:64:anon:none", "some:64", "z:16:anon:zero"])
    t.cmd("dontneed", name="some", page=10, count=20)  # present -> gone
    t.cmd("zero", name="some", page=40, count=3)  # present, all zeros
    t.cmd("write", name="some", page=50, count=2, counter=99)
    never, some, z = t.mapping("never"), t.mapping("some"), t.mapping("z")
    cap = capture(ProcessIdentity.of(t.pid), None)
    r = region_at(cap, some.addr)
    got = offsets_in(r, some.addr, 64)
    assert got == [p for p in range(64) if not 10 <= p < 30]
    data = captured_pages(cap, some.addr, 10)
    assert np.array_equal(data, t.expected("some", 0, 10))
    assert np.array_equal(
        captured_pages(cap, some.addr + 50 * PAGE_SIZE, 2), t.expected("some", 50, 2, counter=99)
    )
    base = (some.addr - r.start) // PAGE_SIZE
    zero_offsets = (r.pages[r.zero] - np.uint64(base)).astype(int).tolist()
    assert [p for p in zero_offsets if 0 <= p < 64] == [40, 41, 42]
    # never-touched memory: no page at all; a mapping of zeros: all present and zero
    # (the kernel may merge these adjacent anonymous mappings into one region)
    assert offsets_in(region_at(cap, never.addr), never.addr, 64) == []
    rz = region_at(cap, z.addr)
    zoffs = offsets_in(rz, z.addr, 16)
    assert zoffs == list(range(16))
    assert rz.zero_count >= 16
    t.assert_running()


def test_default_set_by_mapping_kind(target_factory: MakeTarget) -> None:
    t = target_factory(
        maps=[
            "anon:8",
            "shared:8:shared",
            "memfd:8:memfd",
            "sysv:8:sysv",
            "fpriv:8:file",
            "fshared:8:file-shared",
            "fdeleted:8:file-shared",
        ]
    )
    t.cmd("unlink", name="fdeleted")
    cap = capture(ProcessIdentity.of(t.pid), None)
    maps = {m.start: m for m in cap.maps}
    for name in ("anon", "shared", "memfd", "sysv", "fpriv", "fdeleted"):
        m = t.mapping(name)
        r = region_at(cap, m.addr)
        assert r.name == default_region_name(maps[m.addr]), name
        assert np.array_equal(captured_pages(cap, m.addr, 8), t.expected(name, 0, 8)), name
    fs = t.mapping("fshared")
    assert not any(r.start <= fs.addr < r.end for r in cap.regions)
    kinds = {region_at(cap, t.mapping(n).addr).name.split("-")[0] for n in ("shared", "memfd")}
    assert kinds == {"shmem", "memfd"}
    t.assert_running()


def test_threads_appearing_and_vanishing_during_capture(target_factory: MakeTarget) -> None:
    t = target_factory(maps=["hot:128"], writers=["hot:2"])
    t.cmd("threads", count=6)
    t.cmd("churn", on=True)
    ident = ProcessIdentity.of(t.pid)
    hot = t.mapping("hot")
    for _ in range(8):
        cap = capture(ident, [AddressRange(hot.addr, hot.end)])
        words = cap.regions[0].data.view(np.uint64).reshape(128, patterns.WORDS)
        patterns.check_writer(words[:64], hot.id, 0, 64)
        patterns.check_writer(words[64:], hot.id, 64, 64)
        t.assert_running()
    t.cmd("churn", on=False)


class RecordingHooks:
    """A stand-in tracker: restricts the copy to given pages, records the frozen state."""

    def __init__(self, pages: np.ndarray) -> None:
        self.pages = pages
        self.states: list[str] = []

    def changed(self, fp: FrozenProcess, maps: Sequence[Mapping]) -> ChangedSet | None:
        self.states.append(process_state(fp.pid))
        return ChangedSet.of(self.pages)

    def after_copy(self, fp: FrozenProcess, maps: Sequence[Mapping]) -> None:
        self.states.append(process_state(fp.pid))


def test_hooks_restrict_the_copy_while_frozen(target_factory: MakeTarget) -> None:
    t = target_factory(maps=["a:32"])
    a = t.mapping("a")
    t.cmd("dontneed", name="a", page=0, count=4)
    first = a.addr // PAGE_SIZE
    # pages 2..5 asked for; 2 and 3 are not present, so only 4 and 5 are copied
    hooks = RecordingHooks(np.arange(first + 2, first + 6, dtype=np.uint64))
    cap = capture(ProcessIdentity.of(t.pid), [AddressRange(a.addr, a.end)], hooks=hooks)
    (r,) = cap.regions
    assert cap.incremental
    assert r.pages.tolist() == [4, 5]
    assert r.all_pages.tolist() == list(range(4, 32))
    assert np.array_equal(r.data, t.expected("a", 4, 2))
    assert hooks.states == ["t", "t"]  # both calls saw the target in a ptrace stop
    t.assert_running()


def test_fallback_to_proc_mem_gives_the_same_bytes(target_factory: MakeTarget) -> None:
    t = target_factory(maps=["a:64"])
    a = t.mapping("a")
    t.cmd("mprotect", name="a", page=30, count=2, prot="none")  # two runs

    def flaky(pid: int, local: int, nlocal: int, remote: int, nremote: int) -> int:
        # Like a VM_IO mapping: readv delivers the first 5 pages of a call, then fails.
        got = sys_readv(pid, local, nlocal, remote, 1)
        return min(got, 5 * PAGE_SIZE)

    def broken(pid: int, local: int, nlocal: int, remote: int, nremote: int) -> int:
        ctypes.set_errno(errno.EFAULT)
        return -1

    ident = ProcessIdentity.of(t.pid)
    want = t.expected("a", 0, 64)[[p for p in range(64) if not 30 <= p < 32]]
    for readv in (flaky, broken):
        cap = capture(ident, [AddressRange(a.addr, a.end)], readv=readv)
        (r,) = cap.regions
        assert cap.fallback_bytes > 0
        assert np.array_equal(r.data, want), readv.__name__
    t.assert_running()


def test_reader_reports_unreadable_pages(target_factory: MakeTarget) -> None:
    t = target_factory(maps=["a:16"])
    a = t.mapping("a")
    t.cmd("guard", name="a", page=5, count=2)  # fault for every reader, ptrace included
    staging = Staging(16 * PAGE_SIZE)
    reader = MemoryReader(t.pid)
    remote = np.array([[a.addr, 16 * PAGE_SIZE]], dtype=np.uint64)
    stats = reader.read_runs(remote, staging.address)
    reader.close()
    first = a.addr // PAGE_SIZE
    assert stats.unreadable.tolist() == [first + 5, first + 6]
    rows = staging.pages(0, 16)
    good = [p for p in range(16) if p not in (5, 6)]
    assert np.array_equal(rows[good], t.expected("a", 0, 16)[good])
    assert not rows[[5, 6]].any()
    t.assert_running()


def test_growth_and_new_mappings_between_captures(target_factory: MakeTarget) -> None:
    t = target_factory(maps=["a:8"])
    ident = ProcessIdentity.of(t.pid)
    staging = Staging()
    cap1 = capture(ident, None, staging=staging)
    t.cmd("grow", name="a", pages=4096)  # mremap: may move; many more pages than staged
    t.cmd("mmap", name="b", pages=16)
    cap2 = capture(ident, None, staging=staging)
    a, b = t.mapping("a"), t.mapping("b")
    assert np.array_equal(captured_pages(cap2, a.addr, 4096), t.expected("a", 0, 4096))
    assert np.array_equal(captured_pages(cap2, b.addr, 16), t.expected("b", 0, 16))
    assert cap2.pages > cap1.pages + 4000
    t.assert_running()


def test_uffd_wp_markers_on_untouched_pages_are_not_taken() -> None:
    """The uffd-wp tracker leaves PTE markers on never-touched pages, which
    pagemap reports as swapped: they hold nothing and must not be captured."""
    mm = mmap.mmap(-1, 16 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = np.frombuffer(mm, dtype=np.uint8)
    addr = int(buf.ctypes.data)
    buf[3 * PAGE_SIZE] = 1  # page 3 present
    fd = uffd_wp_markers(addr, 16 * PAGE_SIZE)
    require(fd is not None, "userfaultfd WP_ASYNC + WP_UNPOPULATED (Linux >= 6.7)")
    assert fd is not None
    try:
        with PagemapReader(os.getpid()) as pm:
            words = pm.words(addr // PAGE_SIZE, 16).copy()
            taken = pm.taken(addr, addr + 16 * PAGE_SIZE)
        assert int(np.count_nonzero(words & PM_SWAPPED)) == 15  # the markers
        assert taken.tolist() == [addr // PAGE_SIZE + 3]
    finally:
        os.close(fd)
        del buf
        mm.close()


def test_job_control_stop_is_kept(target_factory: MakeTarget) -> None:
    """A process stopped by SIGSTOP is captured and stays stopped (T, not our t):
    we release what we froze, we do not resume what someone else stopped."""
    t = target_factory(maps=["a:8"], writers=["a:2"])

    def settle() -> set[str]:
        # A detached thread passes through R on its way back into the group stop.
        deadline = time.monotonic() + 10
        while set(task_states(t.pid).values()) != {"T"} and time.monotonic() < deadline:
            time.sleep(0.005)
        return set(task_states(t.pid).values())

    os.kill(t.pid, signal.SIGSTOP)
    assert settle() == {"T"}
    a = t.mapping("a")
    cap = capture(ProcessIdentity.of(t.pid), [AddressRange(a.addr, a.end)])
    assert cap.regions[0].pages.size == 8
    assert settle() == {"T"}
    os.kill(t.pid, signal.SIGCONT)
    t.assert_running()


def test_cli_writes_the_image(target_factory: MakeTarget, tmp_path: Path) -> None:
    t = target_factory(maps=["a:32", "b:16"], writers=["a:2"])
    t.cmd("zero", name="b", page=4, count=2)
    t.cmd("dontneed", name="b", page=10, count=3)
    a, b = t.mapping("a"), t.mapping("b")
    out = tmp_path / "img"
    ra = f"0x{a.addr:x}-0x{a.end:x}"
    rb = f"{b.addr + 10}-{b.end - 1}"  # decimal, unaligned: pages 1..14 of b
    argv = [sys.executable, "-m", "cpcoord", "capture", "--pid", str(t.pid), "--range", rb]
    argv += ["--range", ra, "--name", "rank0", "--out", str(out), "--json"]
    res = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["member"] == "rank0" and summary["pid"] == t.pid
    assert summary["frozen_s"] > 0 and summary["pages"] == 32 + 11
    t.assert_running()

    img = load_image(out)
    (m,) = img.members
    assert (m.name, m.pid, m.start_time) == ("rank0", t.pid, ProcessIdentity.of(t.pid).start_time)
    names = [r.name for r in m.regions]
    ga, gb = (a.addr, a.end), (b.addr + PAGE_SIZE, b.end - PAGE_SIZE)
    assert names == [f"range-{x:x}-{y:x}" for x, y in sorted([ga, gb])]
    reg_b = m.region(f"range-{gb[0]:x}-{gb[1]:x}")
    assert (reg_b.start, reg_b.end) == gb
    # offsets from the region start (page 1 of b): 0..8 and 12..13; 3,4 are zero pages
    assert reg_b.pages.tolist() == [[0, 9], [12, 2]]
    rows_b = region_bytes(img, "rank0", reg_b.name)
    want_b = t.expected("b", 1, 14)
    want_b[3:5] = 0
    want_b[9:12] = 0
    assert np.array_equal(rows_b, want_b)
    words = region_bytes(img, "rank0", f"range-{ga[0]:x}-{ga[1]:x}").view(np.uint64)
    words = words.reshape(32, patterns.WORDS)
    patterns.check_writer(np.array(words[:16]), a.id, 0, 16)
    patterns.check_writer(np.array(words[16:]), a.id, 16, 16)


def test_staging_grows_while_frozen_when_the_prepass_was_short(
    target_factory: MakeTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages that appear between the pre-pass and the freeze still get copied: staging
    is grown inside the frozen window (the pre-pass is made to see nothing)."""
    t = target_factory(maps=["a:2048"])
    a = t.mapping("a")
    real = capmod.select_pages
    calls: list[int] = []

    def short_first(
        pm: PagemapReader, specs: Sequence[RegionSpec], maps: Sequence[Mapping], *more: Any
    ) -> list[np.ndarray]:
        calls.append(1)
        got = real(pm, specs, maps, *more)
        return [p[:0] for p in got] if len(calls) == 1 else got

    monkeypatch.setattr(capmod, "select_pages", short_first)
    staging = Staging()
    cap = capture(ProcessIdentity.of(t.pid), [AddressRange(a.addr, a.end)], staging=staging)
    assert staging.allocations == 2 and staging.capacity >= 2048 * PAGE_SIZE
    assert np.array_equal(cap.regions[0].data, t.expected("a", 0, 2048))
    t.assert_running()


@pytest.fixture
def swap(tmp_path: Path) -> Iterator[Path]:
    """A small swap file, on only for the test (the machine has no swap otherwise)."""
    path = tmp_path / "swap"
    ok = False
    if shutil.which("mkswap") and shutil.which("swapon"):
        with open(path, "wb") as f:
            f.truncate(0)
            f.write(b"\0" * (16 << 20))
        os.chmod(path, 0o600)
        ok = (
            subprocess.run(["mkswap", str(path)], capture_output=True).returncode == 0
            and subprocess.run(["swapon", str(path)], capture_output=True).returncode == 0
        )
    require(ok, "cannot enable a swap file (mkswap/swapon)")
    try:
        yield path
    finally:
        subprocess.run(["swapoff", str(path)], check=True)


def test_swapped_pages_are_taken(target_factory: MakeTarget, swap: Path) -> None:
    t = target_factory(maps=["a:64"])
    a = t.mapping("a")
    t.cmd("pageout", name="a", page=8, count=16)
    with PagemapReader(t.pid) as pm:
        words = pm.words(a.addr // PAGE_SIZE, 64).copy()
    swapped = np.flatnonzero((words & PM_SWAPPED) != 0).tolist()
    require(len(swapped) > 0, "MADV_PAGEOUT swapped nothing out")
    assert set(swapped) <= set(range(8, 24))
    cap = capture(ProcessIdentity.of(t.pid), [AddressRange(a.addr, a.end)])
    (r,) = cap.regions
    assert r.pages.tolist() == list(range(64))  # swapped pages are taken with the rest
    assert np.array_equal(r.data, t.expected("a", 0, 64))
    t.assert_running()
