"""A scripted agent for coordinator tests: speaks the real AgentControl protocol over a
real gRPC channel, but its members' "memory" is bytes the test owns.

    agent = FakeAgent(address, "node-a")
    agent.hold("job", "m1", {"r0": bytearray(64 * 4096)}, start=0x10000000)
    ...                                     # cpcoord attach / checkpoint against it
    agent.memory("m1")["r0"][0:4096] = ...  # change memory between generations
    agent.close()

It answers AttachMember (members must be `hold`-ed first, else NoSuchProcess), Freeze
(Frozen), Capture (Staged, MissingChunks, UploadPages, Uploaded; incremental = the pages
that differ from the last *committed* copy, which is what a tracker with pending sets
amounts to), Abort and Committed, and sends heartbeats. `faults` bends it for bad-input
tests: "bad_chunk" (a chunk's bytes do not match its id), "skip_chunk" (an entry names
a chunk never sent), "no_freeze" (never answers Freeze), "uploaded_early" (Uploaded
without an upload), "hold_upload" (after the first batch of an upload, the stream
stays open, nothing more sent, until `release_upload` is set; `upload_held` tells when),
"slow_upload" (`batch_gap_s` between an upload's messages: a slow link), "cut_upload"
(the stream ends without its end message, as a dead agent's does on the server). Heartbeats stop
while `mute` is set. Page size 4096, one chunk per page.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np

from cpcoord.gen.v1 import agent_pb2, agent_pb2_grpc, common_pb2, types_pb2
from cpcoord.grpcopts import channel_options
from testbed.agent_pages import (
    PAGE,
    changed_pages,
    chunk_data,
    chunk_ids,
    page_entries,
    pages_header,
    region,
    upload_failed,
)
from testbed.cluster import InProcessCoordinator
from testbed.daemons import wait_for


@dataclass
class Held:
    job: str
    name: str
    start: int
    regions: dict[str, bytearray]
    committed: dict[str, bytes] = field(default_factory=dict)  # copy at the last Committed
    staged: dict[int, dict[str, bytes]] = field(default_factory=dict)  # generation -> copy


class FakeAgent:
    def __init__(
        self, address: str, node: str, faults: set[str] | None = None, connect: bool = True
    ) -> None:
        self.node = node
        self.faults = set(faults or ())
        self.members: dict[str, Held] = {}
        self.attached: set[str] = set()
        self.events: list[tuple[str, Any]] = []  # commands received, in order
        self.welcome: agent_pb2.Welcome | None = None
        self.error: BaseException | None = None
        self._out: queue.SimpleQueue[agent_pb2.AgentMessage | None] = queue.SimpleQueue()
        self._channel = grpc.insecure_channel(address, options=channel_options())
        self.stub = agent_pb2_grpc.AgentControlStub(self._channel)
        self._stop = threading.Event()
        self.upload_held = threading.Event()
        self.release_upload = threading.Event()
        self.mute = threading.Event()  # set: no heartbeats
        self.batch_gap_s = 0.3  # "slow_upload"
        self._call: Any = None
        if connect:
            self.connect()

    def connect(self) -> None:
        """Open the control stream (hold() members first to have them on reconnect)."""
        self._out.put(self._hello())
        self._call = self.stub.Attach(self._outgoing())
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._beat, daemon=True).start()

    # -- test side -------------------------------------------------------------------

    def hold(self, job: str, name: str, regions: dict[str, bytearray], start: int) -> Held:
        h = Held(job, name, start, regions)
        self.members[name] = h
        return h

    def memory(self, name: str) -> dict[str, bytearray]:
        return self.members[name].regions

    def region_list(self, name: str) -> list[types_pb2.Region]:
        h, out, at = self.members[name], [], self.members[name].start
        for rname, buf in h.regions.items():
            out.append(types_pb2.Region(name=rname, start=at, end=at + len(buf)))
            at += len(buf) + PAGE  # a guard gap between regions
        return out

    def wait_welcome(self, timeout: float = 10) -> agent_pb2.Welcome:
        deadline = time.monotonic() + timeout
        while self.welcome is None:
            if self.error is not None or time.monotonic() > deadline:
                raise AssertionError(f"no Welcome: {self.error}")
            time.sleep(0.01)
        return self.welcome

    def seen(self, kind: str) -> list[Any]:
        return [m for k, m in self.events if k == kind]

    def close(self) -> None:
        self._stop.set()
        self._out.put(None)
        if self._call is not None:
            self._call.cancel()
        self._channel.close()

    # -- protocol side ---------------------------------------------------------------

    def _hello(self) -> agent_pb2.AgentMessage:
        return agent_pb2.AgentMessage(
            hello=agent_pb2.Hello(
                node=self.node,
                version="test",
                protocol_version=1,
                page_size=PAGE,
                trackers=[agent_pb2.TrackerBackend(name="none", available=True)],
            )
        )

    def _outgoing(self) -> Iterator[agent_pb2.AgentMessage]:
        while True:
            m = self._out.get()
            if m is None:
                return
            yield m

    def send(self, **body: object) -> None:
        self._out.put(agent_pb2.AgentMessage(**body))  # type: ignore[arg-type]

    def _beat(self) -> None:
        seq = 0
        while not self._stop.wait(0.3):
            if self.mute.is_set():
                continue
            seq += 1
            self.send(heartbeat=agent_pb2.Heartbeat(sequence=seq))

    def _read(self) -> None:
        try:
            for msg in self._call:
                kind = msg.WhichOneof("body")
                body = getattr(msg, kind)
                self.events.append((kind, body))
                if kind == "welcome":
                    self.welcome = body
                elif kind == "attach_member":
                    self._attach(msg.command_id, body)
                elif kind == "detach_member":
                    self.attached.discard(body.member)
                    self.send(result=agent_pb2.CommandResult(command_id=msg.command_id))
                elif kind == "freeze" and "no_freeze" not in self.faults:
                    self.send(frozen=agent_pb2.Frozen(job=body.job, generation=body.generation))
                elif kind == "capture":
                    threading.Thread(target=self._capture, args=(body,), daemon=True).start()
                elif kind == "committed":
                    for h in self.members.values():
                        if body.generation in h.staged:
                            h.committed = h.staged.pop(body.generation)
                elif kind == "abort":
                    for h in self.members.values():
                        h.staged.pop(body.generation, None)
        except grpc.RpcError as e:
            if not self._stop.is_set():
                self.error = e

    def _attach(self, cid: int, a: agent_pb2.AttachMember) -> None:
        if a.member not in self.members:
            err = common_pb2.ErrorDetail(
                status="NOT_FOUND",
                exit_code=10,
                error="NoSuchProcess",
                message=f"no such process: pid {a.process.pid}",
            )
            self.send(result=agent_pb2.CommandResult(command_id=cid, error=err))
            return
        self.attached.add(a.member)
        m = types_pb2.Member(
            name=a.member,
            regions=self.region_list(a.member),
            process=types_pb2.ProcessIdentity(pid=a.process.pid, start_time=1),
        )
        self.send(result=agent_pb2.CommandResult(command_id=cid, member=m))

    def _capture(self, c: agent_pb2.Capture) -> None:
        for name in c.members:
            h = self.members[name]
            copy = {r: bytes(b) for r, b in h.regions.items()}
            h.staged[c.generation] = copy
            full = c.full or not h.committed
            pages = sum(len(b) // PAGE for b in copy.values())
            stats = common_pb2.MemberStats(pages=pages, frozen_seconds=0.001, full=full)
            self.send(
                staged=agent_pb2.Staged(
                    job=c.job, generation=c.generation, member=name, stats=stats
                )
            )
            if "uploaded_early" in self.faults:
                self.send(
                    uploaded=agent_pb2.Uploaded(job=c.job, generation=c.generation, member=name)
                )
                continue
            try:
                self.upload(c.job, c.generation, h, copy, full)
            except grpc.RpcError as e:
                self.events.append(("upload_error", e))
                self.send(failed=upload_failed(c.job, c.generation, name, str(e.details())))
                continue
            self.send(
                uploaded=agent_pb2.Uploaded(
                    job=c.job, generation=c.generation, member=name, stats=stats
                )
            )

    def upload(
        self, job: str, gen: int, h: Held, copy: dict[str, bytes], full: bool
    ) -> agent_pb2.UploadResponse:
        regions, batches = [], []
        for ri, (rname, r) in enumerate(zip(copy, self.region_list(h.name), strict=True)):
            data = np.frombuffer(copy[rname], dtype=np.uint8).reshape(-1, PAGE)
            committed = None if full else h.committed.get(rname)
            changed = changed_pages(data, committed)
            regions.append(region(rname, r.start, data.shape[0], changed))
            if not changed.size:
                continue
            ids, zero = chunk_ids(data, changed)
            entries = page_entries(changed, ids)
            nz = [
                (i, p) for i, (p, z) in enumerate(zip(changed.tolist(), zero, strict=True)) if not z
            ]
            want = b"".join(ids[i] for i, _ in nz)
            miss = self.stub.MissingChunks(
                agent_pb2.MissingChunksRequest(job=job, generation=gen, member=h.name, ids=want)
            ).missing
            bits = np.unpackbits(np.frombuffer(miss, np.uint8), bitorder="little")[: len(nz)]
            send = [(i, p) for (i, p), b in zip(nz, bits, strict=True) if b]
            if "skip_chunk" in self.faults and send:
                send = send[1:]
            blobs = [data[p].tobytes() for _, p in send]
            if "bad_chunk" in self.faults and blobs:
                blobs[0] = bytes([blobs[0][0] ^ 1]) + blobs[0][1:]
            chunks = chunk_data([ids[i] for i, _ in send], blobs)
            batches.append(common_pb2.PageBatch(region=ri, entries=entries, chunks=chunks))
        header = pages_header(job, gen, h.name, self.node, regions, full)
        reqs = [agent_pb2.UploadRequest(header=header)]
        reqs += [agent_pb2.UploadRequest(batch=b) for b in batches]
        if "cut_upload" not in self.faults:
            reqs.append(agent_pb2.UploadRequest(end=agent_pb2.UploadEnd()))

        def stream() -> Iterator[agent_pb2.UploadRequest]:
            for i, req in enumerate(reqs):
                if i and "slow_upload" in self.faults:
                    time.sleep(self.batch_gap_s)
                yield req
                if i == 1 and "hold_upload" in self.faults:
                    self.upload_held.set()
                    self.release_upload.wait(60)

        return self.stub.UploadPages(stream())


A = TypeVar("A", bound=FakeAgent)


@contextmanager
def connected_agents(
    coordinator: InProcessCoordinator, cls: type[A], nodes: Sequence[str] = ("node-a", "node-b")
) -> Iterator[dict[str, A]]:
    """Scripted agents of class `cls` for `nodes`, welcomed and ready; closed on exit."""
    made = {n: cls(coordinator.address, n) for n in nodes}
    try:
        for a in made.values():
            a.wait_welcome()
        engine = coordinator.engine
        wait_for(lambda: all(s.ready for s in engine.agents.connected()), what="ready")
        yield made
    finally:
        for a in made.values():
            a.close()
