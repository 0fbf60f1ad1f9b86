"""The coordinator's side of an UploadPages stream on grpc.aio (coordinator/servicers/
streams.py): the event loop only reads the stream; what arrives is parsed, checked and
stored on the pool, soon after it arrives, whether or not anything follows.

Against the real server in process with a scripted agent whose upload stops after its
first batch with the stream still open (an agent paused or about to die there).
"""

from __future__ import annotations

import threading
from typing import Any

import blake3
import numpy as np
import pytest

from cpcoord.gen.v1 import agent_pb2, agent_pb2_grpc, common_pb2, coordinator_pb2, types_pb2
from testbed.cluster import InProcessCoordinator
from testbed.daemons import wait_for
from tests.helpers.fake_agent import PAGE, FakeAgent

pytestmark = pytest.mark.integration
C = coordinator_pb2


def test_a_batch_is_stored_when_it_arrives_not_when_the_next_comes(
    inproc: InProcessCoordinator,
) -> None:
    """On the first grpc.aio server a batch waited on the loop for the next message (to
    hand two over at once): an agent killed after its first batch left nothing stored,
    and the fault test that counts what gc reclaims failed now and then."""
    a = FakeAgent(inproc.address, "node-a", faults={"hold_upload"})
    try:
        a.wait_welcome()
        wait_for(lambda: all(s.ready for s in inproc.engine.agents.connected()), what="ready")
        memory = np.random.default_rng(5).integers(0, 256, 4 * PAGE, np.uint8).tobytes()
        a.hold("j", "m", {"r0": bytearray(memory)}, start=0x10000000)
        inproc.stub.AttachMember(
            C.AttachMemberRequest(
                job="j", member="m", node="node-a", process=types_pb2.ProcessIdentity(pid=7)
            )
        )
        events: list[Any] = []
        run = threading.Thread(
            target=lambda: events.extend(inproc.stub.Checkpoint(C.CheckpointRequest(job="j")))
        )
        run.start()
        assert a.upload_held.wait(30), "the upload never sent its first batch"
        first = blake3.blake3(memory[:PAGE]).digest()
        stub = agent_pb2_grpc.AgentControlStub(inproc.channel)

        def stored() -> bool:
            req = agent_pb2.MissingChunksRequest(job="j", generation=1, member="m", ids=first)
            return stub.MissingChunks(req, timeout=10).missing[0] & 1 == 0

        wait_for(stored, 10, "the first batch stored while its stream stays open")
        a.release_upload.set()
        run.join(60)
        assert events and events[-1].kind == common_pb2.PROGRESS_KIND_COMMITTED, events[-1:]
    finally:
        a.release_upload.set()
        a.close()


def test_an_agent_heard_only_through_its_upload_is_alive_until_it_stops(
    inproc: InProcessCoordinator,
) -> None:
    """Pages arriving prove an agent alive as its heartbeats do: with its heartbeats
    muted (as when they wait behind page data on a slow link), an upload whose batches
    keep coming for 3x the silence limit commits; once nothing at all arrives, the
    agent is still declared lost in bounded time."""
    hb = inproc.options.heartbeat_s
    a = FakeAgent(inproc.address, "node-a", faults={"slow_upload"})
    try:
        a.wait_welcome()
        wait_for(lambda: all(s.ready for s in inproc.engine.agents.connected()), what="ready")
        rng = np.random.default_rng(6)
        regions = {f"r{i}": bytearray(rng.integers(0, 256, PAGE, np.uint8).tobytes())
                   for i in range(15)}  # fmt: skip
        a.batch_gap_s = 3 * 3 * hb / len(regions)  # one batch a region: 3 silence limits
        a.hold("j", "m", regions, start=0x10000000)
        inproc.stub.AttachMember(
            C.AttachMemberRequest(
                job="j", member="m", node="node-a", process=types_pb2.ProcessIdentity(pid=7)
            )
        )
        a.mute.set()
        events = list(inproc.stub.Checkpoint(C.CheckpointRequest(job="j"), timeout=60))
        assert events[-1].kind == common_pb2.PROGRESS_KIND_COMMITTED, events[-1]
        assert inproc.engine.agents.current("node-a") is not None
        # Bounded: the limit is 3 intervals; 20 of them is generous under load.
        gone = lambda: inproc.engine.agents.current("node-a") is None  # noqa: E731
        wait_for(gone, 20 * hb, "the silent agent declared lost")
    finally:
        a.close()
