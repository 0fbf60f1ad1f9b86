"""The uffd-wp tracker on real processes: exactly the written pages, nothing else.

The target is the plain C program tests/helpers/c/uffd_target.c in `mem` mode: it maps
private anonymous regions (4 KiB pages, THP off), writes every page, then writes exactly
the pages the test names. The tracker is armed on those regions only, so the changed set
must equal the written pages, page for page.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cpcoord.errors import UffdLost
from nodeagent.proc.freeze import frozen
from nodeagent.trackers.uffdwp import UffdWpTracker
from tests.helpers.uffd_target import PAGE, MemTarget

pytestmark = pytest.mark.integration


@pytest.fixture
def target(c_target: Path) -> Iterator[MemTarget]:
    t = MemTarget(c_target, 16, 40, 8, 64)
    yield t
    if t.proc.poll() is None:
        t.proc.kill()
        t.proc.wait()


def _arm(t: MemTarget, tr: UffdWpTracker) -> None:
    with frozen(t.ident) as fp:
        tr.arm(fp, t.mappings())


def _collect(t: MemTarget, tr: UffdWpTracker) -> list[int]:
    with frozen(t.ident) as fp:
        return [int(p) for p in tr.collect(fp, t.mappings()).pages]


def test_changed_set_is_exactly_the_written_pages(target: MemTarget) -> None:
    t = target
    tr = UffdWpTracker()
    _arm(t, tr)
    assert tr.untracked == {}
    fd = tr.fd
    assert fd is not None and os.readlink(f"/proc/{t.pid}/fd/{fd}") == "anon_inode:[userfaultfd]"
    assert _collect(t, tr) == []  # nothing written since arm
    every = [p for i in range(len(t.regions)) for p in t.pages(i)]
    rng = random.Random(3)
    for _ in range(6):
        written = sorted(rng.sample(every, rng.randint(1, 40)))
        t.write(written)
        assert _collect(t, tr) == written
        assert _collect(t, tr) == []  # re-armed by the same scan
    assert t.close() == 0


def test_kernel_writes_count(target: MemTarget) -> None:
    """read(2) into a protected page writes from kernel mode: it must neither fail nor
    be missed (async WP resolves kernel faults too, despite UFFD_USER_MODE_ONLY)."""
    t = target
    tr = UffdWpTracker()
    _arm(t, tr)
    page = t.pages(1)[7]
    assert t.cmd(f"p {page * PAGE + 100:x}") == ["5"]
    assert _collect(t, tr) == [page]


def test_mapping_changes(target: MemTarget) -> None:
    t = target
    tr = UffdWpTracker()
    _arm(t, tr)
    # A new mapping: registered at collect, every page it holds counts as written.
    (new,) = t.cmd("m 5")
    t.regions.append((int(new, 16), 5 * PAGE))
    assert _collect(t, tr) == t.pages(4)
    assert tr.last is not None and tr.last.registered == 1
    t.write([t.pages(4)[2]])
    assert _collect(t, tr) == [t.pages(4)[2]]
    # munmap + mmap at the same address: the same maps line, but a fresh VMA.
    start, n = t.regions[2]
    t.cmd(f"U {start:x} {n // PAGE}")
    assert _collect(t, tr) == t.pages(2)
    assert _collect(t, tr) == []
    # MADV_DONTNEED: the pages are gone (not written); reading them back maps zero pages,
    # which must be reported (their content changed), writing them too.
    zap = t.pages(3)[10:14]
    t.cmd(f"d {zap[0] * PAGE:x} 4")
    assert _collect(t, tr) == []
    t.cmd(f"r {zap[0] * PAGE:x} 2")
    t.write([zap[3]])
    assert _collect(t, tr) == [zap[0], zap[1], zap[3]]
    # mremap to a new place: the moved pages are reported at their new addresses.
    start, n = t.regions[0]
    (moved,) = t.cmd(f"M {start:x} {n // PAGE} {n // PAGE + 4}")
    t.regions[0] = (int(moved, 16), n + 4 * PAGE)
    got = _collect(t, tr)
    assert got == t.pages(0)[: n // PAGE]  # the 4 grown pages are not present
    assert _collect(t, tr) == []
    assert t.close() == 0


def test_a_mapping_owned_by_another_userfaultfd_is_untracked(target: MemTarget) -> None:
    """UFFDIO_REGISTER fails (EBUSY) where the target has its own userfaultfd: that
    mapping falls back to 'always changed' and is listed as untracked."""
    t = target
    (own,) = t.cmd("o 6")
    t.regions.append((int(own, 16), 6 * PAGE))
    tr = UffdWpTracker()
    _arm(t, tr)
    assert list(tr.untracked.values()) == ["UFFDIO_REGISTER: EBUSY"]
    (rng,) = tr.untracked
    assert (rng.start, rng.end) == (int(own, 16), int(own, 16) + 6 * PAGE)
    written = [t.pages(1)[0]]
    t.write(written)
    assert _collect(t, tr) == sorted(written + t.pages(4))
    assert _collect(t, tr) == t.pages(4)
    with frozen(t.ident) as fp:
        tr.forget(fp)  # else its uffd owns every mapping and the next one gets EBUSY
    only = UffdWpTracker(untracked_as_changed=False)
    _arm(t, only)
    assert len(only.untracked) == 1
    t.write(written)
    assert _collect(t, only) == written


def test_forget_closes_the_fd_and_rearm_keeps_one(target: MemTarget) -> None:
    t = target
    tr = UffdWpTracker()
    fds0 = set(os.listdir(f"/proc/{t.pid}/fd"))
    _arm(t, tr)
    _arm(t, tr)  # re-arm replaces the uffd, never stacks them
    fds = set(os.listdir(f"/proc/{t.pid}/fd")) - fds0
    assert fds == {str(tr.fd)}
    fd = tr.fd
    with frozen(t.ident) as fp:
        tr.forget(fp)
    assert set(os.listdir(f"/proc/{t.pid}/fd")) == fds0
    assert not os.path.exists(f"/proc/{t.pid}/fd/{fd}")
    assert tr.fd is None
    smaps = Path(f"/proc/{t.pid}/smaps").read_text()
    assert " uw" not in smaps, "a mapping stayed registered after forget"
    tr.forget(None)  # nothing to do, no error
    assert t.close() == 0


def test_target_closing_the_fd_is_detected(target: MemTarget) -> None:
    t = target
    tr = UffdWpTracker()
    _arm(t, tr)
    assert t.cmd(f"c {tr.fd}") == ["0"]
    with pytest.raises(UffdLost):
        _collect(t, tr)
    _arm(t, tr)  # a fresh arm recovers
    t.write([t.pages(0)[1]])
    assert _collect(t, tr) == [t.pages(0)[1]]


def test_forget_after_exit_is_quiet(target: MemTarget) -> None:
    t = target
    tr = UffdWpTracker()
    _arm(t, tr)
    assert t.close() == 0
    tr.forget(None)
    assert tr.fd is None


def test_seccomp_target_is_tracked(c_target: Path) -> None:
    t = MemTarget(c_target, 8, mode="mem-seccomp")
    try:
        tr = UffdWpTracker()
        _arm(t, tr)
        t.write([t.pages(0)[5]])
        assert _collect(t, tr) == [t.pages(0)[5]]
        assert t.close() == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()


def test_changed_set_is_sorted_unique_uint64(target: MemTarget) -> None:
    t = target
    tr = UffdWpTracker()
    _arm(t, tr)
    t.write([t.pages(3)[5], t.pages(0)[2], t.pages(3)[6]])
    with frozen(t.ident) as fp:
        pages = tr.collect(fp, t.mappings()).pages
    assert pages.dtype == np.uint64
    assert np.all(np.diff(pages.astype(np.int64)) > 0)


def test_fork_child_writes_are_not_the_parents(target: MemTarget) -> None:
    """The child inherits the fd but not the registration (no UFFD_FEATURE_EVENT_FORK):
    its writes land in its own copies; the parent's writes after fork are still seen.
    Until the child exits its fd copy keeps the parent's ranges registered after forget."""
    t = target
    tr = UffdWpTracker()
    _arm(t, tr)
    (child,) = t.cmd("F 1500")  # the child writes page 0 of region 0, then sleeps
    t.write([t.pages(0)[3]])
    time.sleep(0.2)
    assert _collect(t, tr) == [t.pages(0)[3]]
    assert os.readlink(f"/proc/{child}/fd/{tr.fd}") == "anon_inode:[userfaultfd]"
    assert " uw" not in Path(f"/proc/{child}/smaps").read_text()
    with frozen(t.ident) as fp:
        tr.forget(fp)
    assert " uw" in Path(f"/proc/{t.pid}/smaps").read_text()  # the child's copy holds it
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{child}/fd") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert " uw" not in Path(f"/proc/{t.pid}/smaps").read_text()
    assert t.close() == 0


def test_transparent_huge_pages_keep_4k_precision(target: MemTarget) -> None:
    """A write to a protected THP splits it (async WP): one 4 KiB page is reported, not
    512. Holds whether or not the kernel gave us huge pages here."""
    t = target
    (addr,) = t.cmd("h 1024")
    t.regions.append((int(addr, 16), 1024 * PAGE))
    tr = UffdWpTracker()
    _arm(t, tr)
    page = t.pages(4)[700]
    t.write([page])
    assert _collect(t, tr) == [page]
    t.write([page, page + 1])
    assert _collect(t, tr) == [page, page + 1]


def test_more_written_ranges_than_the_output_vector_holds(c_target: Path) -> None:
    """17 000 separate written pages: the scan fills its 16 384-entry vector, grows it
    and resumes from walk_end; not one page may be lost or protected unreported."""
    t = MemTarget(c_target, 34_100)
    try:
        tr = UffdWpTracker()
        _arm(t, tr)
        start = t.regions[0][0]
        t.cmd(f"w {start:x} 17000 2")
        want = [start // PAGE + 2 * i for i in range(17000)]
        assert _collect(t, tr) == want
        assert tr.last is not None and tr.last.scan_calls >= 3
        assert _collect(t, tr) == []
        assert t.close() == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()
