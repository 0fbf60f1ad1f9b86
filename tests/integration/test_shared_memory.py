"""Shared memory through the real coordinator and agent.

A C program (tests/helpers/c/shared_target.c) holds four shared objects whose pages are
not in its own page tables: a memfd filled with write() and mapped untouched, shared
anonymous memory and a SysV segment written only by a forked child, and a /dev/shm file
filled with write() (a quarter of the memfd and the file left as holes). It checks its
own objects on command. Through `cpcoord checkpoint` / `restore` / `export`:
- restoring the generation just taken, nothing changed, leaves every object intact
  (it used to write zeros over all of it and report success);
- after a child rewrote everything, restoring it brings back exactly the cut, holes
  included (holes are captured as zero pages);
- an incremental generation taken after another process wrote the objects holds and
  restores those writes (trackers cannot see them: shared mappings count as changed);
- the export lists every page of each object, with its bytes.
Both as the whole-memory region set (restored with registers) and as explicit ranges,
where the /dev/shm file still exists (the default set leaves such a file to itself).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from cpcoord.gen.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from cpcoord.grpcopts import channel_options
from cpcoord.image import load_image, region_bytes, stored_offsets
from cpcoord.ranges import AddressRange
from nodeagent.capture.process import capture
from nodeagent.proc.procfs import ProcessIdentity
from testbed.cluster import Cluster
from testbed.driver import Target
from tests.helpers.restore_c import SHARED_TARGET, SharedTarget, build_c, cpt_mix

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PAGE = 4096
PAGES = 64
OBJ = {n: i for i, n in enumerate(SharedTarget.OBJECTS)}


def expected(name: str, version: int) -> np.ndarray:
    """The object's pages `(PAGES, PAGE)` at a version, as shared_target.c fills them."""
    obj = OBJ[name]
    page = np.arange(PAGES, dtype=np.uint64)[:, None]
    i = np.arange(PAGE // 8, dtype=np.uint64)[None, :]
    key = (np.uint64(obj) << np.uint64(56)) ^ (np.uint64(version) << np.uint64(40))
    words = cpt_mix(key ^ (page << np.uint64(12)) ^ i)
    if version == 0 and name in ("memfd", "shm"):
        words[PAGES - PAGES // 4 :] = 0  # holes: written with write(), last quarter never
    return words.view(np.uint8).reshape(PAGES, PAGE)


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(SHARED_TARGET, tmp_path_factory.mktemp("c"))


@pytest.fixture
def cluster(cluster_factory: Callable[..., Cluster]) -> Cluster:
    return cluster_factory(nodes=("node-a",))


@pytest.fixture
def target(exe: Path, request: pytest.FixtureRequest) -> Iterator[SharedTarget]:
    keep = getattr(request, "param", False)
    t = SharedTarget(exe, PAGES, keep=keep)
    try:
        yield t
    finally:
        t.close()


def _checkpoint(c: Cluster, job: str) -> int:
    r = c.cli_json("checkpoint", "--job", job)
    assert r["state"] == "committed", r
    return int(r["generation"])


def _export_is(c: Cluster, t: SharedTarget, gen: int, out: Path, version: int) -> None:
    """The exported generation lists every page of each object, with its bytes."""
    c.cli("export", "--job", "j", "--generation", str(gen), "--out", str(out))
    im = load_image(out)
    regions = {r.start: r for r in im.member("s").regions}
    for name, (start, end) in ((n, t.span(n)) for n in t.OBJECTS):
        r = regions.get(start)
        assert r is not None and r.end == end, f"{name}: no region {start:#x}-{end:#x}"
        listed = stored_offsets(r.pages)
        assert np.array_equal(listed, np.arange(PAGES, dtype=np.uint64)), (
            f"{name}: the export lists {listed.size} of its {PAGES} pages"
        )
        got = np.asarray(region_bytes(im, "s", r.name)).reshape(PAGES, PAGE)
        bad = np.flatnonzero((got != expected(name, version)).any(axis=1))
        assert bad.size == 0, f"{name}: exported pages {bad[:8].tolist()} differ"


def _restore(c: Cluster, gen: int) -> None:
    r = c.cli_json("restore", "--job", "j", "--generation", str(gen))
    assert r["state"] == "restored", r


def _stats(c: Cluster, gen: int) -> common_pb2.MemberStats:
    with grpc.insecure_channel(c.address, options=channel_options()) as ch:
        stub = coordinator_pb2_grpc.CoordinatorStub(ch)
        req = coordinator_pb2.GetGenerationRequest(job="j", generation=gen)
        (m,) = stub.GetGeneration(req, timeout=30).members
        return m.stats


def _scenario(c: Cluster, t: SharedTarget, tmp_path: Path, tracker: str) -> None:
    # The objects hold data that is in no page table of this process.
    assert all(t.present(n) == 0 for n in t.OBJECTS), {n: t.present(n) for n in t.OBJECTS}
    g1 = _checkpoint(c, "j")

    # Restore of the generation just taken, nothing changed: contents intact.
    _restore(c, g1)
    assert t.send("check 0") == "ok", "restore of an unchanged generation harmed it"
    _export_is(c, t, g1, tmp_path / "g1", 0)

    # Another process rewrites everything between two generations: the incremental one
    # must hold it (no tracker of this process sees those writes).
    g2 = _checkpoint(c, "j")  # full: the restore made the tracker's view stale
    assert t.send("write 7") == "ok"
    assert t.send("check 7") == "ok"
    g3 = _checkpoint(c, "j")
    if tracker != "none":
        st = _stats(c, g3)
        assert not st.full, st
    _export_is(c, t, g3, tmp_path / "g3", 7)

    # Changed, then rolled back: exactly the cut, holes included; then forward again.
    assert t.send("write 9") == "ok"
    _restore(c, g2)
    assert t.send("check 0") == "ok", f"rolled back to generation {g2} ({tracker})"
    _restore(c, g3)
    assert t.send("check 7") == "ok", f"rolled forward to generation {g3} ({tracker})"
    assert t.proc.poll() is None


@pytest.mark.parametrize("tracker", ["uffd-wp", "hash", "none"])
def test_whole_memory_member_keeps_its_shared_objects(
    cluster: Cluster, target: SharedTarget, tmp_path: Path, tracker: str
) -> None:
    cluster.cli(
        "attach", "--job", "j", "--member", "s", "--pid", str(target.pid), "--tracker", tracker
    )
    _scenario(cluster, target, tmp_path, tracker)


@pytest.mark.parametrize("target", [True], indirect=True, ids=["shm-file-kept"])
def test_explicit_ranges_over_shared_objects(
    cluster: Cluster, target: SharedTarget, tmp_path: Path
) -> None:
    assert target.path, "the /dev/shm file must still exist in this mode"
    ranges = [x for n in target.OBJECTS for x in ("--range", "{:#x}-{:#x}".format(*target.span(n)))]
    cluster.cli("attach", "--job", "j", "--member", "s", "--pid", str(target.pid), *ranges)
    _scenario(cluster, target, tmp_path, "auto")


TWIN = """
import mmap, os, sys
size = int(sys.argv[1])
m = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
m[:] = os.urandom(size)
import ctypes
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
child = os.fork()
if child == 0:
    sys.stdin.read()
    os._exit(0)
print(f"{addr:x} {child}", flush=True)
sys.stdin.read()
"""


def test_an_object_two_members_map_is_stored_once(cluster: Cluster, tmp_path: Path) -> None:
    """Parent and child of a fork map the same shared object (16 MiB of random bytes)
    and are two members of one job: the store keeps its chunks once (content-addressed,
    same offsets in both regions). On the wire each member that asks MissingChunks before
    the other's chunks are stored sends them too (members upload concurrently)."""
    size = 16 << 20
    p = subprocess.Popen(
        [sys.executable, "-c", TWIN, str(size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert p.stdout is not None
        addr_hex, child = p.stdout.readline().split()
        addr = int(addr_hex, 16)
        rng = f"{addr:#x}-{addr + size:#x}"
        for name, pid in (("parent", p.pid), ("child", int(child))):
            cluster.cli("attach", "--job", "j", "--member", name, "--pid", str(pid), "--range", rng)
        g = _checkpoint(cluster, "j")
        with grpc.insecure_channel(cluster.address, options=channel_options()) as ch:
            stub = coordinator_pb2_grpc.CoordinatorStub(ch)
            req = coordinator_pb2.GetGenerationRequest(job="j", generation=g)
            got = stub.GetGeneration(req, timeout=30)
        assert {m.member for m in got.members} == {"parent", "child"}
        assert all(m.stats.pages == size // PAGE for m in got.members)
        info = got.info
        assert info.bytes_logical == 2 * size
        # Random bytes do not compress: one copy is `size` bytes, a second would double it.
        assert size <= info.bytes_stored < size + size // 8, info
        assert size <= info.bytes_new < size + size // 8, info
    finally:
        p.kill()
        p.wait()


def _rss_kib(addr: int) -> int:
    """Resident KiB of this process's mapping that starts at `addr`."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.split("-", 1)[0] == f"{addr:x}":
            for more in lines[i + 1 :]:
                if more.startswith("Rss:"):
                    return int(more.split()[1])
    raise AssertionError(f"no mapping at {addr:#x}")


def test_holes_are_zero_pages_that_cost_no_memory(target_factory: Callable[..., Target]) -> None:
    """A 256 MiB memfd with 16 pages written: all 65536 pages are captured (the holes
    as zero pages), the object does not grow (holes are not read), and the staging
    buffer holds the data pages only (hole rows are never populated or are dropped)."""
    t = target_factory(maps=["big:65536:memfd:none"])
    for page in (0, 1000, 40000, 65532):
        t.cmd("write", name="big", page=page, count=4, counter=3)
    m = t.mapping("big")
    obj = f"/proc/{t.pid}/map_files/{m.addr:x}-{m.end:x}"
    blocks = os.stat(obj).st_blocks
    cap = capture(ProcessIdentity.of(t.pid), [AddressRange(m.addr, m.end)])
    (reg,) = cap.regions
    assert os.stat(obj).st_blocks == blocks, "the capture grew the object"
    # 64 KiB of data, the slack and a huge page of rounding; 256 MiB if holes were staged.
    assert _rss_kib(cap.staging.address) < 8 << 10, "staging holds the holes"
    assert reg.pages.size == 65536 and reg.zero_count == 65536 - 16
    for page in (0, 1000, 40000, 65532):
        got = reg.data[page : page + 4]  # every page is listed: row = page
        assert np.array_equal(got, t.expected("big", page, 4, counter=3)), page
