"""Whole-memory restore in place through the coordinator, with registers.

A real coordinator and two real agents (subprocesses). Members of the default
(whole-memory) region set are C programs that keep counters in registers and in memory
and check that both agree (tests/helpers/c/whole_target.c: it exits 3 when they do not,
0 when asked to stop); an explicit-range member is restore_target's `cmd` mode, which
checks its region's checksum on command. The agents save every thread's registers at
each cut, the manifests keep them, and `cpcoord restore --job J --generation N` puts
memory and registers back: every byte of every region equals generation N and the
programs go on and end well (exit 0, not 3).

To compare bytes exactly, the whole-memory members are stopped with SIGSTOP around the
cut of the generation compared and around the restore (a ptrace freeze of a stopped
process works and leaves it stopped), so nothing moves between the cut and the check.
Other restores happen while they run.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import signal
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from ptrace.binding.func import ptrace

from coordinator.store import manifest_io
from cpcoord.gen.v1 import coordinator_pb2, coordinator_pb2_grpc
from cpcoord.grpcopts import channel_options
from cpcoord.image import load_image, region_bytes, stored_offsets
from nodeagent.proc.freeze import frozen
from nodeagent.proc.procfs import ProcessIdentity
from testbed.cluster import Cluster, attach_args
from testbed.driver import Target
from tests.helpers.restore_c import RESTORE_TARGET, CmdTarget, CProcess, SpinTarget, build_c

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WHOLE_TARGET = Path(__file__).resolve().parents[1] / "helpers" / "c" / "whole_target.c"
PAGE = 4096
PM_PRESENT = np.uint64(1 << 63)
PM_SWAPPED = np.uint64(1 << 62)
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F


class WholeTarget(SpinTarget):
    """whole_target: SpinTarget's counters, a secret in r15, and an end on request."""

    def __init__(self, exe: Path, stopfile: Path, secret: int) -> None:
        CProcess.__init__(self, [str(exe), str(stopfile), f"{secret:x}"])
        self.state = int(self.first[1], 16)
        self.stopfile = stopfile

    def __enter__(self) -> WholeTarget:
        return self

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        _wait_state(self.pid, "T")

    def cont(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def running(self) -> None:
        assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.stderr()}"

    def finish(self, timeout: float = 30) -> int:
        """Ask it to stop; its exit code (0: every invariant held to the end)."""
        self.stopfile.touch()
        try:
            return self.proc.wait(timeout)
        except Exception:
            return -999


def _wait_state(pid: int, want: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {
            Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0]
            for t in os.listdir(f"/proc/{pid}/task")
        }
        if states == {want}:
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} did not reach state {want}")


@pytest.fixture(scope="module")
def exes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("c")
    return {"whole": build_c(WHOLE_TARGET, d), "cmd": build_c(RESTORE_TARGET, d)}


@pytest.fixture
def spawn(exes: dict[str, Path], tmp_path: Path) -> Iterator[Callable[..., Any]]:
    made: list[CProcess] = []

    def make(kind: str, secret: int = 0x1234) -> Any:
        if kind == "whole":
            t: CProcess = WholeTarget(exes["whole"], tmp_path / f"stop-{len(made)}", secret)
        else:
            t = CmdTarget(exes["cmd"], pages=32)
        made.append(t)
        return t

    yield make
    for t in made:
        with contextlib.suppress(Exception):
            os.kill(t.pid, signal.SIGCONT)
        t.close()


def _get_generation(c: Cluster, job: str, n: int) -> coordinator_pb2.GetGenerationResponse:
    with grpc.insecure_channel(c.address, options=channel_options()) as ch:
        stub = coordinator_pb2_grpc.CoordinatorStub(ch)
        req = coordinator_pb2.GetGenerationRequest(job=job, generation=n)
        return stub.GetGeneration(req, timeout=30)


def _checkpoint(c: Cluster, job: str) -> int:
    r = c.cli_json("checkpoint", "--job", job)
    assert r["state"] == "committed", r
    return int(r["generation"])


def _mem(pid: int, start: int, n: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(start)
        return f.read(n)


def _pagemap(pid: int, start: int, end: int) -> np.ndarray:
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        f.seek(start // PAGE * 8)
        return np.frombuffer(f.read((end - start) // PAGE * 8), dtype=np.uint64)


def _rseq_kernel_fields(pid: int) -> list[tuple[int, int]]:
    """(address, length) of the fields of every thread's rseq area that the kernel writes
    (cpu_id_start, cpu_id; node_id, mm_cid): they say where the thread runs *now*, so
    they differ from the cut's after any restore, by design (the kernel refreshes them).
    Read with PTRACE_GET_RSEQ_CONFIGURATION while the test freezes the process."""
    out = []
    with frozen(ProcessIdentity.of(pid)) as fp:
        for tid in fp.tids:
            conf = ctypes.create_string_buffer(24)
            ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, 24, ctypes.addressof(conf))
            addr, size = struct.unpack_from("<QI", conf.raw)
            if addr and size >= 32:
                out += [(addr, 8), (addr + 20, 8)]
    return out


def _assert_memory_is(pid: int, image: Path, member: str) -> int:
    """Every region of the member in the exported generation, byte for byte (but the
    kernel's rseq fields): the pages it lists hold its bytes, every other page is absent
    or zero. Returns the pages checked."""
    im = load_image(image)
    checked = 0
    masked = _rseq_kernel_fields(pid)
    for reg in im.member(member).regions:
        want = np.array(region_bytes(im, member, reg.name))
        listed = stored_offsets(reg.pages).astype(np.int64)
        got = np.frombuffer(_mem(pid, reg.start, reg.end - reg.start), np.uint8).copy()
        for addr, n in masked:
            if reg.start <= addr < reg.end:
                got[addr - reg.start : addr - reg.start + n] = 0
                want.reshape(-1)[addr - reg.start : addr - reg.start + n] = 0
        got = got.reshape(-1, PAGE)
        bad = np.flatnonzero(np.any(got[listed] != want[listed], axis=1))
        assert bad.size == 0, (
            f"{member} {reg.name}: {bad.size} pages differ, first {listed[bad[0]]}"
        )
        rest = np.ones(got.shape[0], bool)
        rest[listed] = False
        pm = _pagemap(pid, reg.start, reg.end)
        here = (pm & (PM_PRESENT | PM_SWAPPED)) != 0
        nonzero = np.any(got != 0, axis=1)
        assert not np.any(rest & here & nonzero), f"{member} {reg.name}: a page written since"
        checked += int(listed.size)
    return checked


def _counters_in(image: Path, member: str, w: WholeTarget) -> dict[str, float]:
    """The target's counters as the exported generation holds them (at its cut)."""
    im = load_image(image)
    for reg in im.member(member).regions:
        if reg.start <= w.state < reg.end:
            off = w.state - reg.start
            raw = np.array(region_bytes(im, member, reg.name)).reshape(-1)[off : off + 64]
            return w.counters(raw.tobytes())
    raise AssertionError(f"{member}: no region holds its state")


def _export(c: Cluster, job: str, n: int, out: Path) -> Path:
    c.cli("export", "--job", job, "--generation", str(n), "--out", str(out))
    return out


def _store_has(c: Cluster, needle: bytes, under: str = "") -> list[str]:
    """Files (or S3 objects) of the cluster's store under `under` that hold `needle`."""
    return [name for name, data in c.store_objects() if name.startswith(under) and needle in data]


def test_two_agents_whole_memory_and_explicit_restored_with_registers(
    cluster_factory: Callable[..., Cluster], spawn: Callable[..., Any], tmp_path: Path
) -> None:
    c = cluster_factory(nodes=("node-a", "node-b"))
    secret = 0x5EC12E7C0FFEE123
    w1: WholeTarget = spawn("whole", secret)
    w2: WholeTarget = spawn("whole", secret + 1)
    x: CmdTarget = spawn("cmd")
    c.cli(*attach_args("j", "w1", w1.pid, "node-a"))
    c.cli(*attach_args("j", "w2", w2.pid, "node-b"))
    c.cli(*attach_args("j", "x", x.pid, "node-b", [(x.addr, x.end)]))
    assert x.step(5)["status"] == "ok"

    # Generation 1 while the whole-memory members run; registers saved for them only.
    g1 = _checkpoint(c, "j")
    threads = {m.member: m.threads for m in _get_generation(c, "j", g1).members}
    assert threads == {"w1": 5, "w2": 5, "x": 0}, threads
    time.sleep(0.3)
    assert x.step(7)["status"] == "ok"

    # Generation 2 (incremental) with the whole-memory members stopped: exact reference.
    w1.stop()
    w2.stop()
    g2 = _checkpoint(c, "j")
    at_cut = {"w1": w1.counters(), "w2": w2.counters()}
    x_at_cut = x.region().copy()
    img2 = _export(c, "j", g2, tmp_path / "g2")
    # Without encryption the manifests hold the registers as they are (w1's r15).
    assert _store_has(c, secret.to_bytes(8, "little"), "manifests"), "no registers stored"
    # Every thread of the process, by tid and start time, in each generation's manifest.
    manifests = [
        manifest_io.decode(data, name.rpartition("/")[2])
        for name, data in c.store_objects()
        if name.startswith("manifests/")
    ]
    assert len(manifests) == 2
    tids = {int(t) for t in os.listdir(f"/proc/{w1.pid}/task")}
    for m in manifests:
        got = m.member("w1").threads
        assert {t.tid for t in got} == tids and all(t.start_time > 0 for t in got)
        assert m.member("x").threads == ()

    # Mutate everything.
    w1.cont()
    w2.cont()
    time.sleep(0.5)
    assert x.step(9)["status"] == "ok"
    w1.stop()
    w2.stop()
    for name, w in (("w1", w1), ("w2", w2)):
        assert w.counters()["naps"] > at_cut[name]["naps"], f"{name} did not move on"
    assert not np.array_equal(x.region(), x_at_cut)

    c.cli("restore", "--job", "j", "--generation", str(g2))
    pages = sum(_assert_memory_is(w.pid, img2, n) for n, w in (("w1", w1), ("w2", w2)))
    assert pages > 20, pages
    assert {"w1": w1.counters(), "w2": w2.counters()} == at_cut
    assert np.array_equal(x.region(), x_at_cut), "explicit region not back at generation 2"
    chk = x.check()
    assert chk["status"] == "ok" and chk["steps"] == "12", chk

    # They go on from the cut, invariants intact (else they exit 3).
    w1.cont()
    w2.cont()
    time.sleep(0.5)
    for name, w in (("w1", w1), ("w2", w2)):
        w.running()
        assert w.counters()["naps"] > at_cut[name]["naps"], f"{name} stuck after restore"

    # Generation 1, restored while they run (its cut was taken while they ran, threads
    # anywhere in user code): the counters go back to the cut's, and they go on.
    img1 = _export(c, "j", g1, tmp_path / "g1")
    cut1 = {n: _counters_in(img1, n, w) for n, w in (("w1", w1), ("w2", w2))}
    time.sleep(1.0)
    before = {"w1": w1.counters()["naps"], "w2": w2.counters()["naps"]}
    c.cli("restore", "--job", "j", "--generation", str(g1))
    for name, w in (("w1", w1), ("w2", w2)):
        now = w.counters()["naps"]
        assert cut1[name]["naps"] <= now < before[name], f"{name} not rolled back"
    assert x.check()["steps"] == "5"
    time.sleep(0.5)
    for w in (w1, w2):
        w.running()
    # A checkpoint after a restore is full and still has the registers.
    g3 = _checkpoint(c, "j")
    assert {m.member: m.threads for m in _get_generation(c, "j", g3).members}["w1"] == 5

    assert x.step(3)["steps"] == "8"
    assert x.stats()["bad"] == "0", "the checker saw an inconsistent region"
    for name, w in (("w1", w1), ("w2", w2)):
        code = w.finish()
        assert code == 0, f"{name} exited {code}: {w.stderr()}"
    assert x.proc.stdin is not None
    x.proc.stdin.write(b"quit\n")
    x.proc.stdin.flush()
    assert x.proc.wait(30) == 0


def _hash_memory(pid: int) -> str:
    """BLAKE2 of every readable private writable mapping of the process now."""
    h = hashlib.blake2b()
    with open(f"/proc/{pid}/maps") as f:
        maps = [ln.split() for ln in f]
    for m in maps:
        lo, hi = (int(v, 16) for v in m[0].split("-"))
        if m[1].startswith("rw") and m[1][3] == "p" and hi < 1 << 47:
            h.update(m[0].encode())
            with contextlib.suppress(OSError):
                h.update(_mem(pid, lo, hi - lo))
    return h.hexdigest()


def test_thread_count_changed_refuses_with_nothing_written(
    cluster_factory: Callable[..., Cluster],
    spawn: Callable[..., Any],
    target_factory: Callable[..., Target],
) -> None:
    c = cluster_factory(nodes=("node-a", "node-b"))
    w: WholeTarget = spawn("whole")
    p = target_factory(maps=["data:32"])
    c.cli(*attach_args("j", "w", w.pid, "node-a"))
    c.cli(*attach_args("j", "p", p.pid, "node-b"))
    g1 = _checkpoint(c, "j")
    p.cmd("write", name="data", page=0, count=32, counter=7)
    p.cmd("threads", count=1)  # one thread more than at the cut
    time.sleep(0.2)
    w.stop()
    os.kill(p.pid, signal.SIGSTOP)
    _wait_state(p.pid, "T")
    before = (_hash_memory(w.pid), _hash_memory(p.pid))

    r = c.cli("restore", "--job", "j", "--generation", str(g1), check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 59, (r.returncode, out)
    assert "member p" in out and "threads changed" in out, out
    assert (_hash_memory(w.pid), _hash_memory(p.pid)) == before, "a refused restore wrote"

    os.kill(p.pid, signal.SIGCONT)
    w.cont()
    p.assert_running()
    assert np.array_equal(p.read("data"), p.expected("data", 0, 32, 7))
    assert w.finish() == 0, w.stderr()


def test_registers_encrypted_at_rest_and_restored(
    cluster_factory: Callable[..., Cluster], spawn: Callable[..., Any]
) -> None:
    key = hashlib.sha256(b"test key").hexdigest()
    c = cluster_factory(nodes=("node-a",), extra_env={"CPCOORD_STORE_KEY": key})
    secret = 0x7A11E5C0DE5EC12E
    w: WholeTarget = spawn("whole", secret)
    c.cli(*attach_args("j", "w", w.pid, "node-a"))
    w.stop()
    g1 = _checkpoint(c, "j")
    at_cut = w.counters()
    assert _get_generation(c, "j", g1).members[0].threads == 5
    needle = secret.to_bytes(8, "little")
    assert _store_has(c, needle) == [], "register bytes stored in plaintext"
    w.cont()
    time.sleep(0.3)
    w.stop()
    assert w.counters()["naps"] > at_cut["naps"]
    c.cli("restore", "--job", "j", "--generation", str(g1))
    assert w.counters() == at_cut
    w.cont()
    time.sleep(0.3)
    w.running()
    assert w.finish() == 0, w.stderr()
