"""The agent daemon (nodeagent/daemon/agent.py, in process) against a scripted coordinator: a
real gRPC server speaking AgentControl whose every command the test chooses. Covers what
a real coordinator cannot be made to do on cue: never send Capture (the agent's own
lease), fall silent, refuse an upload, restart mid-freeze; and checks the upload's
contents chunk by chunk (ids, zero markers, only missing chunks sent)."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import blake3
import grpc
import numpy as np
import pytest
import zstandard

from cpcoord.errors import ChunkMismatch
from cpcoord.gen.v1 import agent_pb2, agent_pb2_grpc, common_pb2, types_pb2
from cpcoord.grpcopts import server_options
from cpcoord.grpcutil import abort_with
from nodeagent.daemon.agent import Agent, AgentConfig
from nodeagent.pages import pages_from_runs
from nodeagent.trackers import registry
from testbed.driver import PAGE, Target, task_states

pytestmark = pytest.mark.integration
JOB = "job"
ZERO = bytes(32)
R = common_pb2.AbortReason


@dataclass
class Upload:
    header: common_pb2.PagesHeader
    entries: dict[int, list[tuple[int, int, bytes]]] = field(default_factory=dict)
    chunks_received: int = 0


class Scripted(agent_pb2_grpc.AgentControlServicer):
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.hellos: list[agent_pb2.Hello] = []
        self.got: list[agent_pb2.AgentMessage] = []
        self.outs: list[queue.Queue[agent_pb2.CoordinatorMessage | None]] = []
        self.ids = itertools.count(1)
        self.store: dict[bytes, bytes] = {}
        self.uploads: list[Upload] = []
        self.heartbeats = True
        self.refuse_uploads = False
        self.heartbeat_s = 0.2

    # -- the script ------------------------------------------------------------------

    def send(self, **body: Any) -> int:
        cid = next(self.ids)
        self.outs[-1].put(agent_pb2.CoordinatorMessage(command_id=cid, **body))
        return cid

    def wait(
        self, kind: str, pred: Callable[[Any], bool] = lambda b: True, timeout: float = 15
    ) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for m in self.got:
                    if m.WhichOneof("body") == kind and pred(getattr(m, kind)):
                        return getattr(m, kind)
                left = deadline - time.monotonic()
                assert left > 0, f"no {kind}: {[m.WhichOneof('body') for m in self.got][-20:]}"
                self.cond.wait(left)

    def wait_hellos(self, n: int, timeout: float = 15) -> agent_pb2.Hello:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.hellos) < n:
                left = deadline - time.monotonic()
                assert left > 0, f"{len(self.hellos)} Hellos, wanted {n}"
                self.cond.wait(left)
            return self.hellos[n - 1]

    def of(self, kind: str) -> list[Any]:
        with self.cond:
            return [getattr(m, kind) for m in self.got if m.WhichOneof("body") == kind]

    # -- AgentControl ----------------------------------------------------------------

    def Attach(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
        first = next(request_iterator)
        out: queue.Queue[agent_pb2.CoordinatorMessage | None] = queue.Queue()
        with self.cond:
            self.hellos.append(first.hello)
            self.outs.append(out)
            self.cond.notify_all()

        def read() -> None:
            try:
                for m in request_iterator:
                    with self.cond:
                        self.got.append(m)
                        self.cond.notify_all()
            except grpc.RpcError:
                pass
            out.put(None)

        threading.Thread(target=read, daemon=True).start()
        yield agent_pb2.CoordinatorMessage(
            command_id=next(self.ids),
            welcome=agent_pb2.Welcome(
                version="test", protocol_version=1, max_batch_entries=64,
                heartbeat_interval_ms=int(self.heartbeat_s * 1000), max_message_bytes=1 << 20,
            ),
        )  # fmt: skip
        seq = 0
        while context.is_active():
            try:
                msg = out.get(timeout=self.heartbeat_s)
            except queue.Empty:
                if self.heartbeats:
                    seq += 1
                    yield agent_pb2.CoordinatorMessage(
                        command_id=next(self.ids), heartbeat=agent_pb2.Heartbeat(sequence=seq)
                    )
                continue
            if msg is None:
                return
            yield msg

    def MissingChunks(self, request: Any, context: Any) -> Any:
        ids = [request.ids[i : i + 32] for i in range(0, len(request.ids), 32)]
        bits = np.array([i != ZERO and i not in self.store for i in ids], dtype=np.uint8)
        return agent_pb2.MissingChunksResponse(
            missing=np.packbits(bits, bitorder="little").tobytes()
        )

    def UploadPages(self, request_iterator: Iterator[Any], context: Any) -> Any:
        if self.refuse_uploads:
            abort_with(context, ChunkMismatch("ab" * 32, "cd" * 32))
        up: Upload | None = None
        pages = entries = 0
        for req in request_iterator:
            if req.WhichOneof("body") == "header":
                up = Upload(req.header)
                continue
            assert up is not None
            b = req.batch
            cd = b.chunks
            raw = np.frombuffer(cd.raw_sizes, "<u4")
            stored = np.frombuffer(cd.stored_sizes, "<u4")
            pos = 0
            for i in range(raw.size):
                blob = cd.data[pos : pos + int(stored[i])]
                pos += int(stored[i])
                if cd.methods[i] == 1:
                    blob = zstandard.ZstdDecompressor().decompress(blob)
                cid = cd.ids[32 * i : 32 * i + 32]
                assert blake3.blake3(blob).digest() == cid and len(blob) == int(raw[i])
                self.store[cid] = blob
                up.chunks_received += 1
            offs = np.frombuffer(b.entries.page_offsets, "<u8").tolist()
            counts = np.frombuffer(b.entries.page_counts, "<u4").tolist()
            cids = [b.entries.chunk_ids[32 * i : 32 * i + 32] for i in range(len(offs))]
            up.entries.setdefault(b.region, []).extend(zip(offs, counts, cids, strict=True))
            entries += len(offs)
            pages += sum(counts)
        assert up is not None
        with self.cond:
            self.uploads.append(up)
            self.cond.notify_all()
        return agent_pb2.UploadResponse(pages=pages, entries=entries, bytes_stored_new=7)


class Server:
    def __init__(self, servicer: Scripted, port: int = 0) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(16), options=server_options())
        agent_pb2_grpc.add_AgentControlServicer_to_server(servicer, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0).wait()


@pytest.fixture
def scripted() -> Iterator[tuple[Scripted, Server, Agent]]:
    s = Scripted()
    srv = Server(s)
    agent = Agent(
        AgentConfig(
            coordinator=f"127.0.0.1:{srv.port}", node="n1", lease_s=10,
            backoff_initial_s=0.1, backoff_max_s=0.8, compress="zstd",
        )
    )  # fmt: skip
    agent.start()
    yield s, srv, agent
    agent.stop()
    srv.stop()


def attach(s: Scripted, t: Target, maps: tuple[str, ...], name: str = "m0") -> Any:
    regions = [
        types_pb2.Region(name=n, start=t.mapping(n).addr, end=t.mapping(n).end) for n in maps
    ]
    cid = s.send(
        attach_member=agent_pb2.AttachMember(
            job=JOB, member=name, process=types_pb2.ProcessIdentity(pid=t.pid), regions=regions
        )
    )
    res = s.wait("result", lambda r: r.command_id == cid)
    assert not res.HasField("error"), res.error
    return res


def freeze(
    s: Scripted, gen: int, lease_ms: int, kind: int = common_pb2.OPERATION_KIND_CHECKPOINT
) -> None:
    f = agent_pb2.Freeze(job=JOB, generation=gen, kind=kind, lease_ms=lease_ms, members=["m0"])
    s.send(freeze=f)


def checkpoint(s: Scripted, gen: int, full: bool = False) -> Upload:
    n = len(s.uploads)
    freeze(s, gen, 10_000)
    s.wait("frozen", lambda f: f.generation == gen)
    s.send(capture=agent_pb2.Capture(job=JOB, generation=gen, full=full, members=["m0"]))
    s.wait("uploaded", lambda u: u.generation == gen)
    assert len(s.uploads) == n + 1
    return s.uploads[-1]


def delivered(up: Upload, region: int) -> list[int]:
    runs = np.array([[r.offset, r.count] for r in up.header.regions[region].pages], dtype=np.uint64)
    return pages_from_runs(runs.reshape(-1, 2)).tolist()


def _sample(agent: Agent, name: str, **labels: str) -> float | None:
    """A metric of the agent (its own registry), summed over unnamed labels."""
    total: float | None = None
    for metric in agent.metrics.registry.collect():
        for smp in metric.samples:
            if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()):
                total = (total or 0.0) + smp.value
    return total


def stopped(t: Target) -> bool:
    states = task_states(t.pid)
    return bool(states) and all(s in "tT" for s in states.values())


def test_hello_and_unimplemented_commands(scripted: tuple[Scripted, Server, Agent]) -> None:
    s, _, _ = scripted
    h = s.wait_hellos(1)
    assert h.node == "n1" and h.protocol_version == 1 and h.page_size == PAGE
    assert [b.name for b in h.trackers] == [*registry.AUTO_ORDER, "none"]
    assert all(b.reason for b in h.trackers) and not h.members
    assert {"restore-in-place", "restore-into"} <= set(h.capabilities)
    # RestoreInto downloads first: this coordinator has no DownloadPages
    cid = s.send(restore_into=agent_pb2.RestoreInto(job=JOB, generation=1, member="m0"))
    r = s.wait("result", lambda x: x.command_id == cid)
    assert r.error.status == "UNIMPLEMENTED"
    cid = next(s.ids)
    s.outs[-1].put(agent_pb2.CoordinatorMessage(command_id=cid))  # a command from the future
    r = s.wait("result", lambda x: x.command_id == cid)
    assert r.error.status == "UNIMPLEMENTED"
    freeze(s, 3, 1000, kind=common_pb2.OPERATION_KIND_RESTORE)
    f = s.wait("failed", lambda x: x.generation == 3)  # a restore of a member not held
    assert f.reason == R.ABORT_REASON_FREEZE_FAILED and f.error.status == "NOT_FOUND"
    time.sleep(0.5)
    assert len(s.of("heartbeat")) >= 1


def test_the_agent_enforces_the_lease_without_a_capture(
    scripted: tuple[Scripted, Server, Agent], target_factory: Any
) -> None:
    s, _, _ = scripted
    t = target_factory()
    attach(s, t, ("data",))
    t0 = time.monotonic()
    freeze(s, 1, 600)
    s.wait("frozen")
    assert stopped(t)
    f = s.wait("failed", lambda x: x.reason == R.ABORT_REASON_LEASE_EXPIRED)
    assert 0.6 <= time.monotonic() - t0 < 0.6 + 0.5
    assert f.member == "m0" and f.error.error == "LeaseExpired"
    t.assert_running()


def test_uploads_ids_zero_markers_pending_and_dedup(
    scripted: tuple[Scripted, Server, Agent], target_factory: Any
) -> None:
    s, _, agent = scripted
    t = target_factory(maps=["data:100:anon:random:3", "zeros:40:anon:zero"])
    attach(s, t, ("data", "zeros"))
    assert _sample(agent, "cpcoord_agent_members") == 1
    assert _sample(agent, "cpcoord_agent_connected") == 1
    up = checkpoint(s, 1)
    assert _sample(agent, "cpcoord_agent_captures_total", mode="full") == 1
    assert _sample(agent, "cpcoord_agent_upload_chunks_total", outcome="sent") == 7
    h = up.header
    assert h.full and h.node == "n1" and h.page_size == PAGE and h.cut_unix_ns > 0
    names = [r.name for r in h.regions]
    d, z = names.index("data"), names.index("zeros")
    assert delivered(up, d) == list(range(100)) and delivered(up, z) == list(range(40))
    # data: 16-page chunks (6 full + one of 4), every one sent and verified by the server
    assert [(o, c) for o, c, _ in up.entries[d]] == [
        (i, min(16, 100 - i)) for i in range(0, 100, 16)
    ]
    assert up.chunks_received == 7
    mem = t.read("data")
    for o, c, cid in up.entries[d]:
        assert s.store[cid] == mem[o : o + c].tobytes()
    assert up.entries[z] == [(0, 40, ZERO)]  # one marker, no data
    u = s.wait("uploaded", lambda x: x.generation == 1)
    assert u.stats.pages == 140 and u.stats.zero_pages == 40 and u.stats.full
    assert u.stats.bytes_stored_new == 7 and u.stats.bytes_logical == 140 * PAGE
    s.send(committed=agent_pb2.Committed(job=JOB, generation=1))

    t.cmd("write", name="data", page=10, count=1, counter=1)
    up = checkpoint(s, 2)
    assert delivered(up, d) == [10] and delivered(up, z) == [] and not up.header.full
    s.send(abort=agent_pb2.Abort(job=JOB, generation=2, reason=R.ABORT_REASON_STORE_ERROR))

    t.cmd("write", name="data", page=20, count=1, counter=2)
    up = checkpoint(s, 3)
    assert delivered(up, d) == [10, 20] and up.header.base_generation == 1  # pending kept
    assert up.chunks_received == 1  # page 10's chunk is in the store since gen 2
    all_pages = {r.name: [(p.offset, p.count) for p in r.all_pages] for r in up.header.regions}
    assert all_pages == {"data": [(0, 100)], "zeros": [(0, 40)]}  # what the cut holds
    s.send(committed=agent_pb2.Committed(job=JOB, generation=3))

    up = checkpoint(s, 4, full=True)  # nothing written since gen 3
    assert up.header.full and delivered(up, d) == list(range(100))
    # Only the 16-page groups holding pages 10 and 20 are new as whole-group chunks;
    # the other five groups dedup against generation 1.
    assert up.chunks_received == 2
    up = checkpoint(s, 5, full=True)
    assert up.chunks_received == 0  # now every chunk is in the store
    deadline = time.monotonic() + 5  # staging is released once each upload has ended
    while _sample(agent, "cpcoord_agent_staging_bytes") != 0:
        assert time.monotonic() < deadline, _sample(agent, "cpcoord_agent_staging_bytes")
        time.sleep(0.01)


def test_refused_upload_is_reported(
    scripted: tuple[Scripted, Server, Agent], target_factory: Any
) -> None:
    s, _, _ = scripted
    t = target_factory()
    attach(s, t, ("data",))
    s.refuse_uploads = True
    freeze(s, 1, 10_000)
    s.wait("frozen")
    s.send(capture=agent_pb2.Capture(job=JOB, generation=1, members=["m0"]))
    f = s.wait("failed")
    assert f.reason == R.ABORT_REASON_BAD_DATA and f.error.error == "ChunkMismatch"
    assert not s.of("uploaded")
    t.assert_running()


def test_broken_stream_thaws_and_reconnect_reannounces(
    scripted: tuple[Scripted, Server, Agent], target_factory: Any
) -> None:
    s, srv, agent = scripted
    t = target_factory()
    attach(s, t, ("data",))
    checkpoint(s, 1)
    freeze(s, 2, 10_000)
    s.wait("frozen", lambda f: f.generation == 2)
    assert stopped(t)
    t0 = time.monotonic()
    srv.stop()  # the coordinator goes away mid-checkpoint
    while any(st in "tT" for st in task_states(t.pid).values()) and time.monotonic() - t0 < 5:
        time.sleep(0.01)
    assert time.monotonic() - t0 < 1.0  # thawed at once, not at the lease
    t.assert_running()
    time.sleep(1.0)  # backing off meanwhile
    srv2 = Server(s, srv.port)
    try:
        h = s.wait_hellos(2)
        assert [m.member.name for m in h.members] == ["m0"] and h.members[0].alive
        assert h.members[0].tracker == registry.choose(registry.AUTO)
        assert h.members[0].member.process.pid == t.pid
        assert agent.connected.wait(5) and agent.sessions == 2
        t.cmd("write", name="data", page=1, count=1, counter=4)
        up = checkpoint(s, 3)
        # generation 1 was never committed: the member's capture is full again
        assert up.header.full and delivered(up, 0) == list(range(64))
    finally:
        srv2.stop()


def test_silent_coordinator_is_dropped(scripted: tuple[Scripted, Server, Agent]) -> None:
    s, _, agent = scripted
    s.wait_hellos(1)
    time.sleep(0.5)  # the coordinator shows it sends heartbeats
    s.heartbeats = False
    t0 = time.monotonic()
    s.wait_hellos(2, timeout=10)  # dropped after 3 silent intervals, then redialled
    assert time.monotonic() - t0 < 3 * s.heartbeat_s + 2.0
    deadline = time.monotonic() + 5
    while agent.sessions < 2 and time.monotonic() < deadline:  # the Welcome is on its way
        time.sleep(0.01)
    assert agent.sessions == 2
