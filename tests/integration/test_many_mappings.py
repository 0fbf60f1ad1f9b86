"""A process with 20 000 mappings through the real coordinator and agent: both generations
commit (full, then uffd-wp incremental), the agent is never declared lost, every region's
exported bytes equal the process's memory, and the program's own check of its 20 000
mappings holds after the checkpoints.

On main the frozen window grew with the square of the mappings (13-20 s here): the
member outlived its lease frozen and the generation aborted. Then, on grpc.aio, the
coordinator checked the upload's 20 000-region header on its event loop (3 s, one NumPy
call per region): no agent message was read meanwhile, and the agent was declared lost
("silent for 3.2 s") in the middle of its upload. The frozen time and how it
grows with the number of mappings is measured by bench/capture.py, not asserted here.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from cpcoord.image import load_image, region_bytes, stored_offsets
from testbed.cluster import Cluster
from tests.helpers.restore_c import C_DIR, build_c, read_mem

# Its subject is the process, not the store: the S3 pass does not rerun it (stores.py).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.not_about_store]

N = 20_000
PAGE = 4096


class ManyMaps:
    """tests/helpers/c/manymaps_target.c: N one-page mappings with guard pages between."""

    def __init__(self, exe: Path, n: int) -> None:
        self.proc = subprocess.Popen(
            [str(exe), str(n), "1", "guards"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        words = self.line().split()
        assert words[0] == "ready", words
        self.base, self.stride = int(words[1], 16), int(words[2], 16)
        self.pid = self.proc.pid

    def line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def cmd(self, text: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        out = self.line()
        assert out.startswith("ok"), (text, out, self.proc.poll())
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def many(tmp_path: Path) -> Iterator[ManyMaps]:
    t = ManyMaps(build_c(C_DIR / "manymaps_target.c", tmp_path), N)
    yield t
    t.kill()


def _maps_count(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for _ in f)


def test_twenty_thousand_mappings_checkpoint_exactly(
    cluster_factory: Callable[..., Cluster], many: ManyMaps, tmp_path: Path
) -> None:
    assert _maps_count(many.pid) > 2 * N  # the mappings and their guards
    c = cluster_factory(nodes=("node-a",))
    # No --range: one region per writable mapping, 20 000 regions.
    c.cli("attach", "--job", "many", "--member", "m", "--pid", str(many.pid), "--node", "node-a")
    r1 = c.cli_json("checkpoint", "--job", "many", check=False)
    assert r1["state"] == "committed", r1
    assert r1["full"] and r1["pages_captured"] >= N
    assert many.cmd(f"W 7 {2}") == f"ok {len(range(0, N, 7))}"
    r2 = c.cli_json("checkpoint", "--job", "many", check=False)
    assert r2["state"] == "committed", r2
    assert not r2["full"], "uffd-wp keeps it incremental"
    assert len(range(0, N, 7)) <= r2["pages_captured"] < N // 2
    agent, coordinator = c.agents["node-a"], c.coordinator
    assert coordinator is not None
    assert "agent disconnected" not in coordinator.tail(500), c.logs()
    # The upload of 20 000 regions is read on the event loop and handled on the pool:
    # the loop that reads every agent's heartbeats never waited on it.
    assert "event loop stalled" not in coordinator.tail(500), c.logs()
    assert "control stream broke" not in agent.tail(500), c.logs()
    assert "uffd-wp armed" in agent.tail(500)

    # Generation 2 is what memory holds now (nothing written since): every region.
    out = tmp_path / "export-2"
    c.cli("export", "--job", "many", "--generation", "2", "--out", str(out), timeout=600)
    im = load_image(out)
    regions = im.member("m").regions
    assert len(regions) >= N
    mine = 0
    for reg in regions:
        got = np.asarray(region_bytes(im, "m", reg.name)).reshape(-1)
        listed = stored_offsets(reg.pages)
        want = np.frombuffer(read_mem(many.pid, reg.start, reg.end - reg.start), np.uint8)
        if many.base <= reg.start < many.base + N * many.stride:
            mine += 1
            assert listed.tolist() == [0], reg.name
            assert np.array_equal(got, want), f"{reg.name} differs from memory"
    assert mine == N
    assert many.cmd("c") == f"ok {N}"  # its own check of every page
