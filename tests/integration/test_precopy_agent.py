"""Pre-copy on the agent's ptrace thread (nodeagent/daemon/worker_freeze.py, tracking.py),
real targets, no gRPC: a Freeze that asks for it copies a member that will be full while
it runs, the Capture reads frozen only what changed since, and the staged bytes equal
the memory at the cut. A Freeze that pre-copied an already tracked member and is then
aborted must not make the next incremental capture miss what was written before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from nodeagent.daemon.worker_ops import AbortOp, CaptureOp, CommittedOp, FreezeOp
from nodeagent.trackers import registry
from tests.conftest import require
from tests.integration.test_agent_worker import JOB, Rig, region_bytes

pytestmark = pytest.mark.integration


@pytest.fixture
def rig() -> Iterator[Rig]:
    avail = registry.availability("uffd-wp")
    require(avail.available, f"uffd-wp: {avail.reason}")
    r = Rig()
    try:
        yield r
    finally:
        r.close()


def _precopied(rig: Rig, gen: int, full: bool = False) -> Any:
    rig.worker.submit(FreezeOp(JOB, gen, 10_000, ("m0",), 0, precopy_s=2.0, full=full))
    rig.wait("frozen", lambda f: f.generation == gen)
    rig.worker.submit(CaptureOp(JOB, gen, full, ("m0",), 0))
    return rig.wait("staged", lambda s: s.generation == gen)


def test_a_precopied_capture_stages_the_memory_at_the_cut(rig: Rig, target_factory: Any) -> None:
    t = target_factory(maps=["data:2048", "cold:32:anon:random:5"])
    rig.attach(t, maps=("data", "cold"), tracker="uffd-wp")
    st = _precopied(rig, 1)
    t.assert_running()
    assert st.stats.full and st.stats.precopy_rounds >= 1
    assert st.stats.precopy_bytes[0] >= (2048 + 32) * 4096
    assert st.stats.precopy_frozen_pages == 0  # nothing written since the live pass
    sm = rig.staged_member(1)
    for name in ("data", "cold"):
        pages, data = region_bytes(sm, name)
        assert (data == t.read(name)).all() and len(pages) == t.mapping(name).pages
    sm.release()
    rig.worker.submit(CommittedOp(JOB, 1))
    t.cmd("write", name="data", page=100, count=3, counter=4)
    rig.checkpoint(2)
    sm = rig.staged[(2, "m0")]
    assert not sm.full
    pages, data = region_bytes(sm, "data")
    assert pages == [100, 101, 102] and (data == t.expected("data", 100, 3, counter=4)).all()


def test_an_aborted_precopy_leaves_the_writes_before_it_pending(
    rig: Rig, target_factory: Any
) -> None:
    t = target_factory(maps=["data:512"])
    rig.attach(t, maps=("data",), tracker="uffd-wp")
    rig.checkpoint(1)
    rig.staged[(1, "m0")].release()
    rig.worker.submit(CommittedOp(JOB, 1))
    t.cmd("write", name="data", page=7, count=2, counter=5)  # owed to the next generation
    # Generation 2, --full: pre-copied (the armed tracker re-arms), then aborted.
    rig.worker.submit(FreezeOp(JOB, 2, 10_000, ("m0",), 0, precopy_s=2.0, full=True))
    rig.wait("frozen", lambda f: f.generation == 2)
    rig.worker.submit(AbortOp(JOB, 2, 0))
    t.cmd("write", name="data", page=300, count=1, counter=6)
    rig.checkpoint(3)
    sm = rig.staged[(3, "m0")]
    assert not sm.full and sm.base_generation == 1
    pages, data = region_bytes(sm, "data")
    assert {7, 8, 300} <= set(pages), pages
    got = dict(zip(pages, data, strict=True))
    want = t.read("data")
    for p in (7, 8, 300):
        assert np.array_equal(got[p], want[p]), p
