"""Restore of real processes, in place and into new ones.

Captures come from nodeagent.capture.process on targets with known contents; the tests then
change memory in every way that matters (rewrite present pages, write pages that were
absent or zero at the cut, drop present pages, unmap), restore, and compare every byte of
every region with what the cut held: its pages, and zeros everywhere else.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from cpcoord.errors import ContentsInvalid, RegionMismatch, RestoreUndone
from cpcoord.ranges import PAGE_SIZE, AddressRange
from nodeagent.capture.process import capture
from nodeagent.pages import empty_runs
from nodeagent.proc.freeze import frozen
from nodeagent.proc.iovec import vm_syscall
from nodeagent.proc.procfs import ProcessIdentity, read_maps
from nodeagent.restore import livebackup
from nodeagent.restore.apply import (
    MemberLayout,
    RegionContents,
    RegionLayout,
    check_fit,
    restore_into,
    restore_members,
    write,
)
from nodeagent.restore.backup import BackupStore
from nodeagent.restore.livebackup import LiveBackup
from nodeagent.restore.undo import STEP
from testbed import patterns
from testbed.driver import Target
from tests.helpers.restore_c import RESTORE_TARGET, CmdTarget, build_c, digest, read_mem

pytestmark = pytest.mark.integration
MakeTarget = Callable[..., Target]


@pytest.fixture(scope="module")
def c_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(RESTORE_TARGET, tmp_path_factory.mktemp("c"))


def snapshot(t: Target, names: Sequence[str]) -> list[RegionContents]:
    """Capture the named mappings of a target as explicit regions (copied out)."""
    ranges = [AddressRange(t.mapping(n).addr, t.mapping(n).end) for n in names]
    cap = capture(ProcessIdentity.of(t.pid), ranges)
    return [RegionContents.from_captured(r) for r in cap.regions]


def expected(c: RegionContents) -> np.ndarray:
    """The whole region as the cut held it: its pages, zeros elsewhere."""
    out = np.zeros((c.size // PAGE_SIZE, PAGE_SIZE), dtype=np.uint8)
    out[c.pages.astype(np.int64)] = c.data
    return out


def layout(member: str, contents: Sequence[RegionContents]) -> MemberLayout:
    return MemberLayout(member, tuple(RegionLayout(c.name, c.start, c.end) for c in contents))


def by_start(contents: Sequence[RegionContents], addr: int) -> RegionContents:
    return next(c for c in contents if c.start == addr)


def test_in_place_returns_every_byte_of_every_region(target_factory: MakeTarget) -> None:
    a = target_factory(maps=["hot:64", "cold:32:anon:zero", "sparse:48:anon:random:7"])
    b = target_factory(maps=["data:40:anon:random:3", "mem:16:memfd", "sh:8:shared:zero"])
    a.cmd("dontneed", name="sparse", page=8, count=16)  # absent at the cut
    cut_a = snapshot(a, ["hot", "cold", "sparse"])
    cut_b = snapshot(b, ["data", "mem", "sh"])
    assert by_start(cut_a, a.mapping("sparse").addr).pages.size == 48 - 16
    # After the cut: every kind of change.
    a.cmd("write", name="hot", page=0, count=64, counter=5)
    a.cmd("write", name="cold", page=4, count=8, counter=1)  # zero at the cut
    a.cmd("write", name="sparse", page=8, count=16, counter=2)  # absent at the cut
    a.cmd("dontneed", name="sparse", page=30, count=4)  # present at the cut, absent now
    b.cmd("write", name="data", page=0, count=40, counter=9)
    b.cmd("zero", name="mem", page=0, count=16)
    b.cmd("write", name="sh", page=2, count=3, counter=4)  # shared, zero at the cut
    for t, cut, names in ((a, cut_a, ["hot", "cold", "sparse"]), (b, cut_b, ["data", "mem", "sh"])):
        for n in names:
            assert not np.array_equal(t.read(n), expected(by_start(cut, t.mapping(n).addr)))
    ia, ib = ProcessIdentity.of(a.pid), ProcessIdentity.of(b.pid)
    with frozen(ia) as fa, frozen(ib) as fb:
        stats = restore_members([(fa, layout("a", cut_a), cut_a), (fb, layout("b", cut_b), cut_b)])
    for t, cut, names in ((a, cut_a, ["hot", "cold", "sparse"]), (b, cut_b, ["data", "mem", "sh"])):
        for n in names:
            got = t.read(n)
            want = expected(by_start(cut, t.mapping(n).addr))
            bad = np.flatnonzero((got != want).any(axis=1))
            assert bad.size == 0, f"{n}: pages {bad[:8].tolist()} differ from the cut"
        t.assert_running()
    # Zeros went exactly where the cut had none and memory has pages now: the 16 pages of
    # `sparse` absent then and written since (a); all of `sh` is shared, so all 8 (b).
    assert stats[0].zero_bytes == 16 * PAGE_SIZE
    assert stats[1].zero_bytes == 0  # `sh` was zero-filled, so its pages are data rows
    assert stats[0].bytes_written == (64 + 32 + 48) * PAGE_SIZE
    assert stats[0].mem_bytes == 0 and stats[1].mem_bytes == 0


def test_restored_processes_keep_running_and_check_themselves(c_exe: Path) -> None:
    with CmdTarget(c_exe, 64) as m1, CmdTarget(c_exe, 96) as m2:
        m1.step(10)
        m2.step(30)
        cut_state = {t.pid: t.check() for t in (m1, m2)}
        cut_bytes = {t.pid: t.region().copy() for t in (m1, m2)}
        conts = {}
        for t in (m1, m2):
            cap = capture(ProcessIdentity.of(t.pid), [AddressRange(t.addr, t.end)])
            conts[t.pid] = [RegionContents.from_captured(r) for r in cap.regions]
        m1.step(25)  # pages absent at the cut get data: they must become zeros again
        m2.step(200)  # every page rewritten, twice
        assert m1.check()["steps"] == "35" and m2.check()["steps"] == "230"
        with ExitStack() as stack:
            fps = [stack.enter_context(frozen(ProcessIdentity.of(t.pid))) for t in (m1, m2)]
            restore_members(
                [
                    (fp, layout(str(t.pid), conts[t.pid]), conts[t.pid])
                    for fp, t in zip(fps, (m1, m2), strict=True)
                ]
            )
            for t in (m1, m2):  # still frozen: exactly the cut, every byte
                got = np.frombuffer(read_mem(t.pid, t.addr, t.end - t.addr), np.uint8)
                assert np.array_equal(got, cut_bytes[t.pid])
        for t in (m1, m2):
            assert t.check() == cut_state[t.pid]  # the program agrees: steps and sum
        before = {t.pid: int(t.stats()["checks"]) for t in (m1, m2)}
        out1 = m1.step(7)
        out2 = m2.step(3)
        for t in (m1, m2):  # the checker thread goes on validating, and finds no fault
            deadline = time.monotonic() + 10
            while int((s := t.stats())["checks"]) <= before[t.pid] + 3:
                assert time.monotonic() < deadline, f"checker of {t.pid} stopped: {s}"
                time.sleep(0.01)
            assert s["bad"] == "0", f"checker of {t.pid} saw a broken invariant: {s}"
        # It continues with the right results: the same as a process that never rolled back.
        with CmdTarget(c_exe, 64) as f1, CmdTarget(c_exe, 96) as f2:
            assert f1.step(17) == out1
            assert f2.step(33) == out2


@pytest.mark.parametrize("how", ["part", "whole"])
def test_mismatch_refuses_and_writes_nothing_anywhere(target_factory: MakeTarget, how: str) -> None:
    a = target_factory(maps=["x:32", "y:16:anon:random:1"])
    b = target_factory(maps=["p:32", "q:32:anon:random:2"])
    cut_a, cut_b = snapshot(a, ["x", "y"]), snapshot(b, ["p", "q"])
    q = by_start(cut_b, b.mapping("q").addr)
    a.cmd("write", name="x", page=0, count=32, counter=3)
    b.cmd("write", name="p", page=0, count=32, counter=3)
    if how == "part":
        b.cmd("munmap", name="q", page=8, count=8)
    else:
        b.cmd("munmap", name="q", page=0, count=32)

    def spans(pid: int, contents: Sequence[RegionContents]) -> list[tuple[int, int]]:
        out = []
        for m in read_maps(pid):
            for c in contents:
                lo, hi = max(m.start, c.start), min(m.end, c.end)
                if lo < hi and m.readable:
                    out.append((lo, hi))
        return sorted(out)

    ia, ib = ProcessIdentity.of(a.pid), ProcessIdentity.of(b.pid)
    with frozen(ia) as fa, frozen(ib) as fb:
        before = (digest(a.pid, spans(a.pid, cut_a)), digest(b.pid, spans(b.pid, cut_b)))
        with pytest.raises(RegionMismatch) as err:
            restore_members(
                [(fa, layout("rank-a", cut_a), cut_a), (fb, layout("rank-b", cut_b), cut_b)]
            )
        after = (digest(a.pid, spans(a.pid, cut_a)), digest(b.pid, spans(b.pid, cut_b)))
    assert before == after, "a refused restore wrote memory"
    msg = str(err.value)
    assert "rank-b" in msg and q.name in msg and "not mapped any more" in msg, msg
    assert np.array_equal(a.read("x"), a.expected("x", 0, 32, 3))  # a kept its own state
    a.assert_running()
    b.assert_running()


def test_read_only_mapping_is_restored_through_proc_mem(target_factory: MakeTarget) -> None:
    t = target_factory(maps=["ro:32:anon:random:5", "rw:8"])
    cut = snapshot(t, ["ro", "rw"])
    t.cmd("write", name="ro", page=0, count=32, counter=1)
    t.cmd("write", name="rw", page=0, count=8, counter=1)
    t.cmd("mprotect", name="ro", page=0, count=32, prot="r")
    ro = t.mapping("ro")
    ident = ProcessIdentity.of(t.pid)
    with frozen(ident) as fp:
        (stats,) = restore_members([(fp, layout("m", cut), cut)])
    assert stats.mem_bytes == 32 * PAGE_SIZE  # the read-only mapping, and only it
    for n in ("ro", "rw"):
        assert np.array_equal(t.read(n), expected(by_start(cut, t.mapping(n).addr)))
    perms = next(m.perms for m in read_maps(t.pid) if m.start <= ro.addr < m.end)
    assert perms == "r--p", "restore must not change protections"
    t.assert_running()


def test_short_writev_falls_back_to_proc_mem(target_factory: MakeTarget) -> None:
    t = target_factory(maps=["d:64:anon:random:9"])
    cut = snapshot(t, ["d"])
    t.cmd("write", name="d", page=0, count=64, counter=8)
    calls = []

    def refuse(pid: int, local: int, nl: int, remote: int, nr: int) -> int:
        calls.append(nr)
        ctypes.set_errno(errno.EFAULT)
        return -1

    with frozen(ProcessIdentity.of(t.pid)) as fp:
        stats = write(check_fit(fp, layout("m", cut)), cut, writev=refuse)
    assert calls and stats.mem_bytes == 64 * PAGE_SIZE
    assert np.array_equal(t.read("d"), expected(cut[0]))


def test_shared_read_only_mapping_is_a_mismatch(target_factory: MakeTarget) -> None:
    t = target_factory(maps=["s:8:shared"])
    cut = snapshot(t, ["s"])
    t.cmd("mprotect", name="s", page=0, count=8, prot="r")
    with (
        frozen(ProcessIdentity.of(t.pid)) as fp,
        pytest.raises(RegionMismatch, match="read-only shared"),
    ):
        check_fit(fp, layout("m", cut))


def test_bad_contents_write_nothing(target_factory: MakeTarget) -> None:
    t = target_factory(maps=["d:16", "e:16"])
    cut = snapshot(t, ["d", "e"])
    t.cmd("write", name="d", page=0, count=16, counter=2)
    wrong = [
        cut[0],
        RegionContents(cut[1].name, cut[1].start, cut[1].end, cut[1].pages[:-1], cut[1].data),
    ]
    with frozen(ProcessIdentity.of(t.pid)) as fp:
        fitted = check_fit(fp, layout("m", cut))
        with pytest.raises(ContentsInvalid):
            write(fitted, wrong)
        with pytest.raises(ContentsInvalid, match="missing"):
            write(fitted, cut[:1])
    assert np.array_equal(t.read("d"), t.expected("d", 0, 16, 2))


def test_restore_into_a_new_process_at_another_address(target_factory: MakeTarget) -> None:
    old = target_factory(maps=["state:40:anon:random:4"])
    old.cmd("dontneed", name="state", page=20, count=5)
    cut = snapshot(old, ["state"])
    c = cut[0]
    new = target_factory(maps=["pad:100:anon:random:6", "state:40:anon:random:8"])
    addr = new.mapping("state").addr
    assert addr != c.start
    size = 40 * PAGE_SIZE - 100  # the last 100 bytes belong to a neighbour: untouched
    before = new.read("state")
    stats = restore_into(new.pid, {c.name: (addr, size)}, cut, member="rank-0")
    got = new.read("state").reshape(-1)
    assert np.array_equal(got[:size], expected(c).reshape(-1)[:size])
    assert np.array_equal(got[size:], before.reshape(-1)[size:])
    assert stats.bytes_written == size
    pad = patterns.random_pages(6, 0, 100).view(np.uint8).reshape(100, PAGE_SIZE)
    assert np.array_equal(new.read("pad"), pad)  # the neighbouring mapping is untouched
    new.assert_running()
    with pytest.raises(RegionMismatch, match="bytes now"):
        restore_into(new.pid, {c.name: (addr, 41 * PAGE_SIZE)}, cut)
    with pytest.raises(RegionMismatch, match="not in the generation"):
        restore_into(new.pid, {"other": (addr, size)}, cut)
    with pytest.raises(RegionMismatch, match="not page-aligned"):
        restore_into(new.pid, {c.name: (addr + 8, size)}, cut)
    with pytest.raises(RegionMismatch, match="not mapped"):
        new.cmd("munmap", name="state", page=30, count=10)
        restore_into(new.pid, {c.name: (addr, size)}, cut)


def test_file_pages_absent_at_the_cut_come_back_as_the_file(target_factory: MakeTarget) -> None:
    """A private file mapping whose pages were never touched at the cut (so not
    captured: they read as the file) and are copied on write since: restore gives them
    the file's bytes again, not zeros."""
    t = target_factory(maps=["data:8:file:none"])
    m = t.mapping("data")
    on_disk = np.random.default_rng(5).integers(1, 255, size=(8, PAGE_SIZE), dtype=np.uint8)
    Path(m.path).write_bytes(on_disk.tobytes())  # the pages read through to the file
    (c,) = snapshot(t, ["data"])
    assert c.pages.size == 0, "untouched file pages are absent at the cut"
    t.cmd("write", name="data", page=2, count=3, counter=5)  # private copies now
    assert not np.array_equal(t.read("data", 2, 3), on_disk[2:5])
    with frozen(ProcessIdentity.of(t.pid)) as fp:
        (st,) = restore_members([(fp, layout("f", [c]), [c])])
    assert st.zero_bytes == 0
    assert np.array_equal(t.read("data"), on_disk), "not the file's bytes"
    t.assert_running()


def test_a_restore_the_kernel_refuses_part_way_puts_every_byte_back(
    target_factory: MakeTarget,
) -> None:
    """Issue 12, defect 7, with a real refusal: a shared file mapping of three steps
    whose file was cut to one and a half since the cut. The first step is written before
    the kernel refuses the pages past the end of the file; every byte written goes back."""
    pages = 3 * STEP // PAGE_SIZE
    half = 3 * STEP // 2
    t = target_factory(maps=[f"f:{pages}:file-shared:random:3"])
    cut = snapshot(t, ["f"])
    t.cmd("write", name="f", page=0, count=pages, counter=7)
    os.truncate(t.mapping("f").path, half)  # pages past it: SIGBUS now
    m = t.mapping("f")
    before = read_mem(t.pid, m.addr, half)
    with (
        frozen(ProcessIdentity.of(t.pid)) as fp,
        pytest.raises(RestoreUndone, match=rf"\({STEP} bytes written were put back\)"),
    ):
        restore_members([(fp, layout("m", cut), cut)])
    assert read_mem(t.pid, m.addr, half) == before
    t.assert_running()


def test_a_refusal_inside_a_step_puts_back_exactly_what_was_written(
    target_factory: MakeTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """process_vm_writev stops half-way through the second step and the /proc/PID/mem
    fallback is refused: one and a half steps went in, and exactly those go back."""
    pages = 3 * STEP // PAGE_SIZE
    t = target_factory(maps=[f"d:{pages}:anon:random:4"])
    cut = snapshot(t, ["d"])
    t.cmd("write", name="d", page=0, count=pages, counter=9)
    before = t.read("d").copy()
    real = vm_syscall("process_vm_writev")
    calls: list[int] = []
    refused: list[int] = []

    def writev(pid: int, local: int, nl: int, remote: int, nr: int) -> int:
        calls.append(nr)
        if len(calls) != 2:
            return real(pid, local, nl, remote, nr)
        # Move the first half of the first piece only, as the kernel does at a bad page.
        lv = (ctypes.c_uint64 * 2).from_address(local)
        rv = (ctypes.c_uint64 * 2).from_address(remote)
        half = (ctypes.c_uint64 * 2)(lv[0], lv[1] // 2)
        rhalf = (ctypes.c_uint64 * 2)(rv[0], rv[1] // 2)
        return real(pid, ctypes.addressof(half), 1, ctypes.addressof(rhalf), 1)

    def no_pwritev(fd: int, bufs: object, offset: int) -> int:
        refused.append(offset)
        raise OSError(errno.EIO, "refused by the test")

    monkeypatch.setattr("nodeagent.proc.writer.os.pwritev", no_pwritev)
    with (
        frozen(ProcessIdentity.of(t.pid)) as fp,
        pytest.raises(RestoreUndone, match=rf"\({3 * STEP // 2} bytes written were put back\)"),
    ):
        write(check_fit(fp, layout("m", cut)), cut, writev=writev)
    assert refused, "the fallback was never asked"
    assert np.array_equal(t.read("d"), before)
    t.assert_running()


_FORKER = """
import mmap, os, signal, sys, ctypes
n = int(sys.argv[1])
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.write(os.urandom(n))
print(hex(ctypes.addressof(ctypes.c_char.from_buffer(m))), flush=True)
sys.stdin.readline()
child = os.fork()
if child == 0:
    signal.pause()
    os._exit(0)
print(child, flush=True)
sys.stdin.readline()
"""


def test_backing_up_never_breaks_copy_on_write_sharing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A parent whose region is COW-shared with its child (forked after the cut): a
    restore that fails before its second step has backed up (read) the pages of the
    steps after the first without unsharing them; only the pages it wrote (and put
    back) are the parent's own now."""
    import subprocess
    import sys

    from cpcoord import faults
    from nodeagent.proc.pagemap import PM_EXCLUSIVE, PM_PRESENT, PagemapReader

    size = 3 * STEP
    p = subprocess.Popen([sys.executable, "-c", _FORKER, str(size)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdin is not None and p.stdout is not None
    child = 0
    try:
        addr = int(p.stdout.readline(), 16)
        ident = ProcessIdentity.of(p.pid)
        cap = capture(ident, [AddressRange(addr, addr + size)])
        cut = [RegionContents.from_captured(r) for r in cap.regions]
        p.stdin.write("fork\n")
        p.stdin.flush()
        child = int(p.stdout.readline())

        def words() -> np.ndarray:
            with PagemapReader(p.pid) as pm:
                return pm.words(addr >> 12, size >> 12).copy()

        w = words()
        assert np.all(w & PM_PRESENT) and not np.any(w & PM_EXCLUSIVE), "not COW-shared"
        before = read_mem(p.pid, addr, size)
        monkeypatch.setenv(faults.ENV_FAIL, "agent.restore.write@2")
        monkeypatch.setattr(faults, "_passes", {})
        with frozen(ident) as fp, pytest.raises(RestoreUndone, match=rf"\({STEP} bytes"):
            restore_members([(fp, layout("m", cut), cut)])
        assert read_mem(p.pid, addr, size) == before
        w = words()
        pages = STEP >> 12
        assert np.all(w[:pages] & PM_EXCLUSIVE), "the written step is the parent's own"
        shared = ~(w[pages:] & PM_EXCLUSIVE).astype(bool)
        assert shared.all(), f"{int((~shared).sum())} pages only backed up were unshared"
    finally:
        if child:
            os.kill(child, 9)  # the parent's child: reaped by init once the parent is gone
        p.kill()
        p.wait()


def test_a_live_backup_puts_back_what_the_process_held_at_the_freeze(
    target_factory: MakeTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """restore/livebackup.py: the pages a rollback overwrites are read while the process
    runs; then some are written (the tracker reports them), some dropped (MADV_DONTNEED:
    zeros now), some absent at the live read are written. The write fails in its third
    step: every byte goes back as the process held it at the freeze, not as the live
    read saw it. Then a restore with a live backup succeeds, exactly, reading nothing
    frozen but what changed."""
    pages = 3 * STEP // PAGE_SIZE
    t = target_factory(maps=[f"d:{pages}:anon:random:4"])
    cut = snapshot(t, ["d"])
    t.cmd("write", name="d", page=0, count=pages, counter=9)
    t.cmd("dontneed", name="d", page=100, count=50)  # absent at the live read
    first = t.mapping("d").addr // PAGE_SIZE
    allp = np.arange(first, first + pages, dtype=np.uint64)
    ident = ProcessIdentity.of(t.pid)

    def take() -> LiveBackup:
        store = BackupStore(None)
        return livebackup.take(t.pid, allp, read_maps(t.pid), store, time.monotonic() + 60)

    def mark(live: LiveBackup, written: np.ndarray) -> None:  # as the agent does, frozen
        live.mark(allp[written], livebackup.own_pages(t.pid, live.pages), empty_runs())

    live = take()
    assert live.nbytes == (pages - 50) * PAGE_SIZE
    t.cmd("write", name="d", page=10, count=20, counter=11)  # written since: reported
    t.cmd("write", name="d", page=110, count=5, counter=12)  # absent then, written now
    t.cmd("dontneed", name="d", page=5000, count=30)  # dropped since: zeros now
    before = t.read("d").copy()
    mark(live, np.r_[10:30, 110:115])
    real = vm_syscall("process_vm_writev")
    calls: list[int] = []

    def writev(pid: int, local: int, nl: int, remote: int, nr: int) -> int:
        calls.append(nr)
        return 0 if len(calls) == 3 else real(pid, local, nl, remote, nr)

    def no_pwritev(fd: int, bufs: object, offset: int) -> int:
        raise OSError(errno.EIO, "refused by the test")

    with monkeypatch.context() as mp:
        mp.setattr("nodeagent.proc.writer.os.pwritev", no_pwritev)
        with frozen(ident) as fp, pytest.raises(RestoreUndone):
            write(check_fit(fp, layout("m", cut)), cut, writev=writev, live=live)
    live.close()
    diff = np.flatnonzero((t.read("d").reshape(pages, -1) != before.reshape(pages, -1)).any(axis=1))
    assert not diff.size, f"the undo put back what the live read saw: pages {diff[:20]} {diff.size}"
    t.assert_running()
    # Success: exact, and only what changed since the live read is read frozen.
    live = take()
    t.cmd("write", name="d", page=7, count=3, counter=13)
    mark(live, np.r_[7:10])
    with frozen(ident) as fp:
        st = write(check_fit(fp, layout("m", cut)), cut, live=live)
    live.close()
    assert np.array_equal(t.read("d").reshape(pages, PAGE_SIZE), expected(cut[0]))
    assert st.backup_bytes == 3 * PAGE_SIZE, st
    assert st.backup_live_bytes == (pages - 3) * PAGE_SIZE, st
    t.assert_running()
