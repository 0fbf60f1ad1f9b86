"""A checkpoint keeps copy-on-write sharing.

A C program (tests/helpers/c/cow_target.c) fills memory and forks: parent and child share
every page copy-on-write. `process_vm_readv` pins the pages it reads, and pinning an
anonymous page that is not exclusive makes the kernel unshare it: one checkpoint used to
turn the parent's `Shared_Dirty` into `Private_Dirty`, doubling the pair's memory. Now
pages the pagemap does not mark exclusive are read through /proc/PID/mem. For every
tracker available here (uffd-wp, hash, none; the hash tracker reads every page at each
collect), after a full and an incremental capture: the parent's memory is still shared
with the child (smaps_rollup of both), the capture holds exactly the pattern, and both
processes still find their pattern intact.

Locally (nodeagent.capture.incremental.TrackedCapture, 256 MiB) and through the real coordinator
and agent (64 MiB, whole-memory member, exported generation compared).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from cpcoord.image import load_image, region_bytes, stored_offsets
from cpcoord.ranges import AddressRange
from nodeagent.capture.incremental import TrackedCapture
from nodeagent.capture.process import capture
from nodeagent.proc.freeze import frozen
from nodeagent.proc.procfs import ProcessIdentity
from nodeagent.trackers import registry
from testbed.cluster import Cluster
from testbed.driver import Target, dirty_mib
from tests.conftest import require
from tests.helpers.restore_c import COW_TARGET, CowTarget, build_c

pytestmark = pytest.mark.integration

TRACKERS = ["uffd-wp", "hash", "none"]
SLACK_MIB = 8  # stack pages, injected system calls, the tracker's own pages


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(COW_TARGET, tmp_path_factory.mktemp("c"))


@pytest.fixture
def spawn(exe: Path) -> Iterator[Callable[[int], CowTarget]]:
    made: list[CowTarget] = []

    def make(mib: int) -> CowTarget:
        t = CowTarget(exe, mib)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def _available(tracker: str) -> None:
    if tracker != "none":
        av = registry.availability(tracker)
        require(av.available, f"tracker {tracker}: {av.reason}")


def _still_shared(t: CowTarget, before: dict[int, dict[str, float]], what: str) -> None:
    for pid in (t.pid, t.child):
        now = dirty_mib(pid)
        who = "parent" if pid == t.pid else "child"
        assert now["Shared_Dirty"] >= t.mib - SLACK_MIB, f"{what}: {who} {before[pid]} -> {now}"
        grew = now["Private_Dirty"] - before[pid]["Private_Dirty"]
        assert grew < SLACK_MIB, f"{what}: {who} {before[pid]} -> {now}"


@pytest.mark.parametrize("tracker", TRACKERS)
def test_local_captures_keep_the_fork_shared(
    spawn: Callable[[int], CowTarget], tracker: str
) -> None:
    _available(tracker)
    t = spawn(256)
    before = {pid: dirty_mib(pid) for pid in (t.pid, t.child)}
    assert before[t.pid]["Shared_Dirty"] >= t.mib, before
    want = t.expected()
    ident = ProcessIdentity.of(t.pid)
    tc = TrackedCapture(ident, [AddressRange(t.addr, t.end)], tracker)
    for rnd in range(2):  # full, then incremental (the hash tracker reads it all again)
        with frozen(ident) as fp:
            res = tc.capture(fp=fp)
        tc.commit()
        _still_shared(t, before, f"{tracker} capture {rnd}")
        (reg,) = res.capture.regions
        if rnd == 0:
            assert reg.pages.size == want.shape[0]
            assert np.array_equal(reg.data, want), "the capture is not the pattern"
            assert res.capture.shared_bytes == t.mib << 20, "shared pages read another way"
    tc.forget()
    assert t.check() == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("tracker", TRACKERS)
def test_checkpoints_keep_the_fork_shared(
    cluster_factory: Callable[..., Cluster],
    spawn: Callable[[int], CowTarget],
    tmp_path: Path,
    tracker: str,
) -> None:
    _available(tracker)
    c = cluster_factory(nodes=("node-a",))
    t = spawn(64)
    before = {pid: dirty_mib(pid) for pid in (t.pid, t.child)}
    c.cli("attach", "--job", "j", "--member", "p", "--pid", str(t.pid), "--tracker", tracker)
    gens = []
    for _ in range(2):
        r = c.cli_json("checkpoint", "--job", "j")
        assert r["state"] == "committed", r
        gens.append(int(r["generation"]))
        _still_shared(t, before, f"{tracker} generation {gens[-1]}")
    assert t.check() == "ok"
    for g in gens:
        out = tmp_path / f"g{g}"
        c.cli("export", "--job", "j", "--generation", str(g), "--out", str(out))
        im = load_image(out)
        (reg,) = [r for r in im.member("p").regions if r.start <= t.addr < r.end]
        first = (t.addr - reg.start) // 4096
        rows = np.asarray(region_bytes(im, "p", reg.name)).reshape(-1, 4096)
        n = t.mib * 256
        listed = stored_offsets(reg.pages)
        assert np.isin(np.arange(first, first + n), listed).all(), f"generation {g} lacks pages"
        assert np.array_equal(rows[first : first + n], t.expected()), f"generation {g} differs"


def test_mixed_sharing_reads_each_page_the_right_way(target_factory: Callable[..., Target]) -> None:
    """After a fork, the parent rewrites stretches of 1 to 40 pages (they become its own,
    exclusive; the rest stays shared with the child). A capture reads exclusive
    stretches of 16 pages and more with process_vm_readv, everything else through
    /proc/PID/mem, keeps the shared pages shared and copies every byte exactly."""
    t = target_factory(maps=["d:400:anon:random:5"])
    child = int(t.cmd("fork")["child"])
    m = t.mapping("d")
    spans = [(3, 1), (10, 5), (30, 15), (60, 16), (90, 17), (150, 40), (399, 1)]
    for page, count in spans:
        t.cmd("write", name="d", page=page, count=count, counter=9)
    mine = sum(c for _, c in spans)
    before = {pid: dirty_mib(pid) for pid in (t.pid, child)}
    cap = capture(ProcessIdentity.of(t.pid), [AddressRange(m.addr, m.end)])
    after = {pid: dirty_mib(pid) for pid in (t.pid, child)}
    for pid in (t.pid, child):
        grew = after[pid]["Private_Dirty"] - before[pid]["Private_Dirty"]
        assert grew < 1.0, f"{pid}: {before[pid]} -> {after[pid]}"
    (reg,) = cap.regions
    assert np.array_equal(reg.data, t.read("d")), "the capture is not the memory"
    shared = 400 - mine
    # Stretches of 16+ pages by process_vm_readv (3 of them: 16, 17, 40 pages); shorter
    # ones between shared pages absorbed into the /proc/PID/mem reads around them.
    assert cap.readv_calls >= 1
    assert cap.shared_bytes == (shared + 1 + 5 + 15) * 4096, cap.shared_bytes
