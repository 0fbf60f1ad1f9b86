"""Bad input to every RPC and client command is refused with a clear status (and exit
code) and changes nothing.

Against the real server in process with scripted agents. "Changes nothing" is checked by
comparing a snapshot of everything a client can see (jobs and members, every generation
including aborted ones, store stats, connected agents) before and after each refusal.
Bad data inside an upload is the one refusal that also ends a generation: it aborts
with BAD_DATA (docs/protocol.md), and nothing of it is ever visible or kept after gc.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, cast

import grpc
import numpy as np
import pytest

from cpcoord.cli import main
from cpcoord.gen.v1 import agent_pb2, agent_pb2_grpc, common_pb2, coordinator_pb2, types_pb2
from cpcoord.grpcutil import META_ERROR
from testbed.cluster import InProcessCoordinator
from testbed.daemons import wait_for
from tests.helpers.fake_agent import PAGE, FakeAgent

pytestmark = pytest.mark.integration
C = coordinator_pb2


@pytest.fixture
def world(inproc: InProcessCoordinator) -> Iterator[dict[str, Any]]:
    a, b = FakeAgent(inproc.address, "node-a"), FakeAgent(inproc.address, "node-b")
    for x in (a, b):
        x.wait_welcome()
    wait_for(lambda: all(s.ready for s in inproc.engine.agents.connected()), what="ready")
    rng = np.random.default_rng(3)
    a.hold(
        "j",
        "m1",
        {"r0": bytearray(rng.integers(0, 256, 16 * PAGE, np.uint8).tobytes())},
        start=0x10000000,
    )
    b.hold("j", "m2", {"r0": bytearray(8 * PAGE)}, start=0x20000000)
    a.hold("j", "spare", {"r0": bytearray(4 * PAGE)}, start=0x30000000)
    for m, node in (("m1", "node-a"), ("m2", "node-b")):
        inproc.stub.AttachMember(
            C.AttachMemberRequest(
                job="j", member=m, node=node, process=types_pb2.ProcessIdentity(pid=7)
            )
        )
    events = list(inproc.stub.Checkpoint(C.CheckpointRequest(job="j")))
    assert events[-1].kind == common_pb2.PROGRESS_KIND_COMMITTED
    yield {"c": inproc, "a": a, "b": b}
    a.close()
    b.close()


def snapshot(c: InProcessCoordinator) -> tuple[bytes, ...]:
    s = c.stub
    jobs = s.ListJobs(C.ListJobsRequest())
    gens = [
        s.ListGenerations(C.ListGenerationsRequest(job=j.name, include_aborted=True))
        for j in jobs.jobs
    ]
    stats = s.StoreStats(C.StoreStatsRequest())
    agents = s.ListAgents(C.ListAgentsRequest())
    return (
        jobs.SerializeToString(deterministic=True),
        *(g.SerializeToString(deterministic=True) for g in gens),
        stats.SerializeToString(deterministic=True),
        bytes(str([(x.node, x.connected, x.members) for x in agents.agents]), "ascii"),
    )


def refused(
    c: InProcessCoordinator,
    call: Callable[[], Any],
    code: grpc.StatusCode,
    error: str | None = None,
    text: str = "",
) -> str:
    before = snapshot(c)
    with pytest.raises(grpc.RpcError) as ei:
        r = call()
        if hasattr(r, "__next__"):
            list(r)
    e = ei.value
    assert e.code() == code, (e.code(), e.details())
    if error is not None:
        assert dict(cast(Any, e).trailing_metadata() or ()).get(META_ERROR) == error, e.details()
    assert text in (e.details() or ""), e.details()
    assert snapshot(c) == before, "a refused call changed something"
    return e.details() or ""


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def test_client_api_refusals(world: dict[str, Any]) -> None:
    c: InProcessCoordinator = world["c"]
    s = c.stub
    pid = types_pb2.ProcessIdentity(pid=7)
    region = types_pb2.Region

    def attach(**kw: Any) -> Callable[[], Any]:
        kw.setdefault("job", "j")
        kw.setdefault("member", "spare")
        kw.setdefault("node", "node-a")
        kw.setdefault("process", pid)
        return lambda: s.AttachMember(C.AttachMemberRequest(**kw))

    # unknown job, member, generation
    refused(c, lambda: s.ListJobs(C.ListJobsRequest(job="nope")), NOT_FOUND, "UnknownJob")
    refused(c, lambda: s.Checkpoint(C.CheckpointRequest(job="nope")), NOT_FOUND, "UnknownJob")
    refused(c, lambda: s.ListGenerations(C.ListGenerationsRequest(job="nope")), NOT_FOUND)
    refused(
        c,
        lambda: s.GetGeneration(C.GetGenerationRequest(job="j", generation=9)),
        NOT_FOUND,
        "NoSuchGeneration",
    )
    refused(
        c,
        lambda: s.ReadGeneration(C.ReadGenerationRequest(job="j", members=["zz"])),
        NOT_FOUND,
        "UnknownMember",
    )
    refused(c, lambda: s.DetachMember(C.DetachMemberRequest(job="j", member="zz")), NOT_FOUND)
    refused(
        c,
        lambda: s.PinGeneration(C.PinGenerationRequest(job="j", generation=5, pinned=True)),
        NOT_FOUND,
    )
    refused(
        c, lambda: s.DeleteGeneration(C.DeleteGenerationRequest(job="j", generation=0)), INVALID
    )
    refused(c, lambda: s.Verify(C.VerifyRequest(generation=1)), INVALID)
    # duplicate member, unknown node, bad names, bad ranges
    refused(c, attach(member="m1"), grpc.StatusCode.ALREADY_EXISTS, "DuplicateMember")
    refused(c, attach(node="node-z"), grpc.StatusCode.UNAVAILABLE, "AgentUnavailable")
    refused(c, attach(node=""), INVALID, text="give --node")
    refused(c, attach(job="../etc"), INVALID, "InvalidName")
    refused(c, attach(member="a" * 65), INVALID, "InvalidName")
    refused(c, attach(process=types_pb2.ProcessIdentity(pid=0)), INVALID)
    refused(c, attach(member="ghost"), NOT_FOUND, "NoSuchProcess")  # the agent refuses
    refused(
        c,
        attach(regions=[region(name="x", start=0x1001, end=0x3000)]),
        INVALID,
        text="not page-aligned",
    )
    refused(
        c, attach(regions=[region(name="x", start=0x3000, end=0x1000)]), INVALID, text="inverted"
    )
    refused(
        c,
        attach(regions=[region(start=0x1000, end=0x3000), region(start=0x2000, end=0x4000)]),
        INVALID,
        "RangesOverlap",
    )
    refused(
        c, attach(regions=[region(start=0x1000, end=1 << 60)]), INVALID, "RangeBeyondAddressSpace"
    )
    refused(
        c, attach(regions=[region(name="a/b", start=0x1000, end=0x2000)]), INVALID, "InvalidName"
    )
    # bad checkpoint options
    refused(c, lambda: s.Checkpoint(C.CheckpointRequest(job="j", lease_ms=50)), INVALID)
    refused(
        c,
        lambda: s.Checkpoint(C.CheckpointRequest(job="j", lease_ms=1000, freeze_timeout_ms=5000)),
        INVALID,
    )
    # bad restore and diff requests
    refused(c, lambda: s.Restore(C.RestoreRequest(job="nope")), NOT_FOUND, "UnknownJob")
    refused(
        c,
        lambda: s.Restore(C.RestoreRequest(job="j", generation=99)),
        NOT_FOUND,
        "NoSuchGeneration",
    )
    refused(
        c,
        lambda: s.Restore(C.RestoreRequest(job="j", members=["ghost"])),
        NOT_FOUND,
        "UnknownMember",
    )
    refused(c, lambda: s.Restore(C.RestoreRequest(job="j", lease_ms=50)), INVALID)
    refused(c, lambda: s.Diff(C.DiffRequest(job="j")), INVALID)
    refused(
        c,
        lambda: s.Diff(C.DiffRequest(job="j", from_generation=1, to_generation=99)),
        NOT_FOUND,
        "NoSuchGeneration",
    )
    refused(c, lambda: s.Watch(C.WatchRequest(jobs=["bad name"])), INVALID, "InvalidName")


def test_malformed_and_huge_messages(world: dict[str, Any]) -> None:
    c: InProcessCoordinator = world["c"]
    big = grpc.insecure_channel(c.address, options=[("grpc.max_send_message_length", 200 << 20)])
    raw = big.unary_unary(
        "/cpcoord.v1.Coordinator/ListJobs",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    d = refused(c, lambda: raw(b"\xff\xff\xff\xff\x0f", timeout=10), INVALID, "InvalidArgument")
    assert "malformed cpcoord.v1.ListJobsRequest" in d
    huge = C.AttachMemberRequest(
        job="j",
        member="spare",
        node="node-a",
        process=types_pb2.ProcessIdentity(pid=7),
        regions=[types_pb2.Region(name="x" * (1 << 20))] * 80,
    )
    stub = coordinator_stub(big)
    refused(c, lambda: stub.AttachMember(huge, timeout=30), grpc.StatusCode.RESOURCE_EXHAUSTED)
    up = big.stream_unary(
        "/cpcoord.v1.AgentControl/UploadPages",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    refused(c, lambda: up(iter([b"\x0a\x03\xff\xff\xff"]), timeout=10), INVALID)
    big.close()


def coordinator_stub(ch: grpc.Channel) -> Any:
    from cpcoord.gen.v1 import coordinator_pb2_grpc

    return coordinator_pb2_grpc.CoordinatorStub(ch)


def test_agent_api_refusals(world: dict[str, Any]) -> None:
    c: InProcessCoordinator = world["c"]
    stub = agent_pb2_grpc.AgentControlStub(c.channel)
    hello = agent_pb2.Hello(node="node-a", protocol_version=1, page_size=PAGE)

    def attach(*msgs: agent_pb2.AgentMessage) -> Callable[[], Any]:
        return lambda: stub.Attach(iter(msgs), timeout=10)

    AM = agent_pb2.AgentMessage
    refused(c, attach(AM(heartbeat=agent_pb2.Heartbeat(sequence=1))), INVALID, text="Hello")
    refused(c, attach(AM(hello=hello)), grpc.StatusCode.ALREADY_EXISTS, "DuplicateAgent")
    bad = agent_pb2.Hello(node="../x", protocol_version=1, page_size=PAGE)
    refused(c, attach(AM(hello=bad)), INVALID, "InvalidName")
    odd = agent_pb2.Hello(node="node-q", protocol_version=1, page_size=8192)
    refused(c, attach(AM(hello=odd)), PRECONDITION, "IncompatibleAgent")
    old = agent_pb2.Hello(node="node-q", protocol_version=0, page_size=PAGE)
    refused(c, attach(AM(hello=old)), PRECONDITION, "IncompatibleAgent")
    # page streams for generations not in flight, bad ids, bad headers
    mc = agent_pb2.MissingChunksRequest
    refused(
        c,
        lambda: stub.MissingChunks(mc(job="j", generation=1, member="m1", ids=b"x" * 32)),
        PRECONDITION,
        "GenerationStateError",
    )
    refused(
        c,
        lambda: stub.MissingChunks(mc(job="j", generation=1, member="m1", ids=b"x" * 33)),
        INVALID,
    )
    refused(
        c,
        lambda: stub.MissingChunks(mc(job="j", generation=1, member="m1", ids=bytes(32 * 65537))),
        INVALID,
        text="at most",
    )
    UR = agent_pb2.UploadRequest
    header = common_pb2.PagesHeader(
        job="j", generation=1, member="m1", node="node-a", page_size=PAGE
    )
    refused(c, lambda: stub.UploadPages(iter([])), INVALID, text="header")
    refused(c, lambda: stub.UploadPages(iter([UR(batch=common_pb2.PageBatch())])), INVALID)
    refused(c, lambda: stub.UploadPages(iter([UR(header=header)])), PRECONDITION)
    refused(
        c,
        lambda: stub.DownloadPages(agent_pb2.DownloadRequest(job="j", generation=7, member="m1")),
        NOT_FOUND,
    )


def test_a_stream_cut_short_is_not_bad_data(world: dict[str, Any]) -> None:
    """gRPC shows the stream of an agent killed mid-upload as ended, like a half-close
    (CI once aborted such a generation with bad_data, not agent_lost). A stream without
    its end message is refused as cut short, and the generation ends the way the
    agent's own report (or its loss) says, not with BAD_DATA."""
    c: InProcessCoordinator = world["c"]
    a: FakeAgent = world["a"]
    a.memory("m1")["r0"][0:PAGE] = bytes(range(256)) * 16
    a.faults.add("cut_upload")
    events = list(c.stub.Checkpoint(C.CheckpointRequest(job="j")))
    a.faults.discard("cut_upload")
    assert events[-1].kind == common_pb2.PROGRESS_KIND_ABORTED
    assert events[-1].reason == common_pb2.ABORT_REASON_UPLOAD_FAILED, events[-1]
    (err,) = a.seen("upload_error")
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "cut short" in err.details()
    events = list(c.stub.Checkpoint(C.CheckpointRequest(job="j")))
    assert events[-1].kind == common_pb2.PROGRESS_KIND_COMMITTED, events[-1]


@pytest.mark.parametrize("fault", ["bad_chunk", "skip_chunk", "uploaded_early"])
def test_bad_upload_aborts_and_keeps_nothing(world: dict[str, Any], fault: str) -> None:
    """A chunk whose bytes do not match its id (or entries naming chunks never sent, or
    an Uploaded without an upload): the stream is refused, the generation aborts with
    BAD_DATA, no partial generation is visible, and gc leaves only generation 1."""
    c: InProcessCoordinator = world["c"]
    a: FakeAgent = world["a"]
    a.memory("m1")["r0"][0:PAGE] = bytes(range(256)) * 16
    stats0 = c.stub.StoreStats(C.StoreStatsRequest())
    a.faults.add(fault)
    events = list(c.stub.Checkpoint(C.CheckpointRequest(job="j")))
    a.faults.discard(fault)
    assert events[-1].kind == common_pb2.PROGRESS_KIND_ABORTED
    assert events[-1].reason == common_pb2.ABORT_REASON_BAD_DATA, events[-1]
    if fault == "bad_chunk":
        # The generation aborts before the agent's UploadPages call returns: wait for it.
        wait_for(lambda: a.seen("upload_error"), what="the agent's upload error")
        (err,) = a.seen("upload_error")
        assert err.code() == INVALID and "does not match its content" in err.details()
        assert dict(cast(Any, err).trailing_metadata() or ()).get(META_ERROR) == "ChunkMismatch"
    gens = c.stub.ListGenerations(C.ListGenerationsRequest(job="j")).generations
    assert [g.number for g in gens] == [1]
    list(c.stub.GarbageCollect(C.GarbageCollectRequest()))
    stats = c.stub.StoreStats(C.StoreStatsRequest())
    assert (stats.chunks, stats.generations) == (stats0.chunks, stats0.generations)
    events = list(c.stub.Checkpoint(C.CheckpointRequest(job="j")))  # and the next one works
    assert events[-1].kind == common_pb2.PROGRESS_KIND_COMMITTED


def test_checkpoint_while_busy_and_detach_while_busy(inproc: InProcessCoordinator) -> None:
    a = FakeAgent(inproc.address, "node-a", faults={"no_freeze"})
    try:
        a.wait_welcome()
        a.hold("j", "m", {"r0": bytearray(PAGE)}, start=0x10000000)
        wait_for(lambda: all(s.ready for s in inproc.engine.agents.connected()))
        inproc.stub.AttachMember(
            C.AttachMemberRequest(job="j", member="m", process=types_pb2.ProcessIdentity(pid=3))
        )
        call = inproc.stub.Checkpoint(C.CheckpointRequest(job="j", lease_ms=20000))
        next(call)
        s = inproc.stub
        refused(inproc, lambda: s.Checkpoint(C.CheckpointRequest(job="j")), PRECONDITION, "JobBusy")
        refused(
            inproc,
            lambda: s.DetachMember(C.DetachMemberRequest(job="j", member="m")),
            PRECONDITION,
            "JobBusy",
        )
        refused(
            inproc,
            lambda: s.DeleteGeneration(C.DeleteGenerationRequest(job="j", generation=1)),
            PRECONDITION,
        )
        call.cancel()
    finally:
        a.close()


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.err


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["jobs", "--job", "nope"], 54, "no such job"),
        (["checkpoint", "--job", "nope"], 54, "no such job"),
        (["checkpoint", "--job", "bad/name"], 26, "invalid name"),
        (["checkpoint", "--job", "j", "--lease-ms", "10"], 20, "lease_ms"),
        (["generations", "--job", "nope"], 54, "no such job"),
        (["generations", "--job", "j", "--delete", "9"], 66, "not found"),
        (["generations", "--job", "j", "--pin", "9"], 66, "not found"),
        (["export", "--job", "j", "--generation", "9", "--out", "OUT"], 66, "not found"),
        (["export", "--job", "nope", "--out", "OUT"], 54, "no such job"),
        (["verify", "--job", "nope"], 54, "no such job"),
        (["verify", "--generation", "3"], 20, "needs its job"),
        (["gc", "--keep", "-1"], 20, "keep"),
        (
            ["attach", "--job", "j", "--member", "m1", "--pid", "7", "--node", "node-a"],
            58,
            "already has a member",
        ),
        (
            [
                "attach",
                "--job",
                "j",
                "--member",
                "x",
                "--pid",
                "7",
                "--node",
                "node-a",
                "--range",
                "0x3000-0x1000",
            ],
            23,
            "inverted",
        ),
        (
            [
                "attach",
                "--job",
                "j",
                "--member",
                "x",
                "--pid",
                "7",
                "--node",
                "node-a",
                "--range",
                "zz",
            ],
            21,
            "bad range",
        ),
        (
            [
                "attach",
                "--job",
                "j",
                "--member",
                "x",
                "--pid",
                "7",
                "--node",
                "node-a",
                "--range",
                "0x1000-0x1800",
            ],
            22,
            "empty",
        ),
        (
            ["attach", "--job", "j", "--member", "x", "--pid", "7", "--node", "node-z"],
            57,
            "no connected agent",
        ),
        (["detach", "--job", "j", "--member", "zz"], 51, "has no member"),
    ],
)
def test_cli_refusals(
    world: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Any,
    args: list[str],
    code: int,
    text: str,
) -> None:
    c: InProcessCoordinator = world["c"]
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    before = snapshot(c)
    got, err = run_cli(capsys, *args, "--coordinator", c.address)
    assert got == code, err
    assert text in err, err
    assert err.startswith("cpcoord: error: ")
    assert snapshot(c) == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_without_or_with_a_dead_coordinator(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CPCOORD_COORDINATOR", raising=False)
    code, err = run_cli(capsys, "jobs")
    assert code == 76 and "no coordinator address" in err
    monkeypatch.setenv("CPCOORD_COORDINATOR", "127.0.0.1:1")
    code, err = run_cli(capsys, "jobs", "--timeout", "2")
    assert code == 70 and "cannot reach the coordinator at 127.0.0.1:1" in err
    json.dumps(err)
