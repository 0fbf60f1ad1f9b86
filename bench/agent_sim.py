"""An agent simulator for scale runs: one process holding N real control streams.

    python -m bench.agent_sim --coordinator HOST:PORT --agents 2000 [--pages 2]
        [--prefix sim] [--ready-file F]

Each simulated agent `PREFIX-NNNNN` has a gRPC channel and TCP connection of its own
(a local subchannel pool, as N agent processes would), one `Attach` control stream, and
speaks the real protocol: Hello, heartbeats, AttachMember and DetachMember answered with
CommandResults, Freeze -> Frozen, Capture -> Staged, MissingChunks, UploadPages,
Uploaded (the same page and chunk formats as a real agent: BLAKE3-256 ids, packed
PageEntries and ChunkData, one chunk per page), Committed and Abort. What it does not do
is ptrace: its members are tiny regions of real memory in this process (`--pages` pages
each, an anonymous mapping per agent), so the coordinator's side of every step is real
and the agents' own work is close to nothing.

Memory: at each Freeze of generation G, a member's first page is rewritten with
`page_bytes(member, G)` (as if the application wrote it just before the freeze), the
other pages stay as they were (zeros, then what the first full capture stored), so every
generation uploads one new page per member and a reader can check the stored bytes.
A capture is incremental against the member's last committed copy unless the
coordinator asks for a full one (or none was committed yet).

Writes "ready N" to --ready-file once every agent has its Welcome; runs until SIGTERM,
SIGINT or EOF on stdin. Used by bench/scale.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import mmap
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import blake3
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


def page_bytes(member: str, generation: int) -> bytes:
    """The first page of `member` as captured for `generation` (deterministic)."""
    return blake3.blake3(f"{member}/{generation}".encode()).digest(length=PAGE)


@dataclass
class Member:
    job: str
    name: str
    mem: memoryview  # `pages` pages of this agent's mapping
    addr: int
    committed: bytes | None = None  # copy at the last Committed
    staged: dict[int, bytes] = field(default_factory=dict)  # generation -> copy

    @property
    def pages(self) -> int:
        return len(self.mem) // PAGE


class SimAgent:
    def __init__(self, address: str, node: str, pages: int) -> None:
        self.node = node
        self.pages = pages
        opts = [*channel_options(), ("grpc.use_local_subchannel_pool", 1)]
        self.channel = grpc.aio.insecure_channel(address, options=opts)
        self.stub = agent_pb2_grpc.AgentControlStub(self.channel)
        self.out: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
        self.welcomed = asyncio.Event()
        self.members: dict[str, Member] = {}
        self.interval = 1.0
        # One mapping per agent holds its (one) member's pages: real, private memory.
        self._map = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._view = memoryview(self._map)
        self._addr = int(np.frombuffer(self._map, np.uint8).ctypes.data)
        self.errors = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, **body: object) -> None:
        self.out.put_nowait(agent_pb2.AgentMessage(**body))  # type: ignore[arg-type]

    async def _outgoing(self) -> AsyncIterator[agent_pb2.AgentMessage]:
        yield agent_pb2.AgentMessage(
            hello=agent_pb2.Hello(
                node=self.node,
                version="sim",
                protocol_version=1,
                page_size=PAGE,
                trackers=[agent_pb2.TrackerBackend(name="none", available=True)],
                hostname="agent-sim",
            )
        )
        while True:
            m = await self.out.get()
            if m is None:
                return
            yield m

    async def run(self) -> None:
        """Hold the control stream; redial (after a short wait) when it breaks."""
        while True:
            call = self.stub.Attach(self._outgoing())
            beat = asyncio.create_task(self._beat())
            try:
                async for msg in call:
                    self._handle(msg)
            except grpc.aio.AioRpcError:
                self.errors += 1
            finally:
                beat.cancel()
                self.welcomed.clear()
                self.out = asyncio.Queue()
            await asyncio.sleep(0.5)

    async def _beat(self) -> None:
        seq = 0
        await self.welcomed.wait()
        while True:
            await asyncio.sleep(self.interval)
            seq += 1
            self.send(heartbeat=agent_pb2.Heartbeat(sequence=seq))

    def _handle(self, msg: agent_pb2.CoordinatorMessage) -> None:
        kind = msg.WhichOneof("body")
        body = getattr(msg, kind) if kind else None
        if kind == "welcome":
            self.interval = (body.heartbeat_interval_ms or 1000) / 1000
            self.welcomed.set()
        elif kind == "attach_member":
            self._attach(msg.command_id, body)
        elif kind == "detach_member":
            self.members.pop(body.member, None)
            self.send(result=agent_pb2.CommandResult(command_id=msg.command_id))
        elif kind == "freeze":
            for name in body.members:
                m = self.members.get(name)
                if m is not None:  # the application's last write before the freeze
                    m.mem[:PAGE] = page_bytes(name, body.generation)
            self.send(frozen=agent_pb2.Frozen(job=body.job, generation=body.generation))
        elif kind == "capture":
            # The loop keeps only weak references to tasks: hold it until it is done
            # (a collected task cancels its upload call: CANCELLED).
            t = asyncio.create_task(self._capture(body))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        elif kind == "committed":
            for m in self.members.values():
                if body.generation in m.staged:
                    m.committed = m.staged.pop(body.generation)
        elif kind == "abort":
            for m in self.members.values():
                m.staged.pop(body.generation, None)

    def _attach(self, cid: int, a: agent_pb2.AttachMember) -> None:
        if self.members and a.member not in self.members:
            err = common_pb2.ErrorDetail(
                status="FAILED_PRECONDITION",
                exit_code=20,
                error="InvalidArgument",
                message="invalid argument: a simulated agent holds one member",
            )
            self.send(result=agent_pb2.CommandResult(command_id=cid, error=err))
            return
        m = self.members.get(a.member) or Member(a.job, a.member, self._view, self._addr)
        self.members[a.member] = m
        region = types_pb2.Region(name="data", start=m.addr, end=m.addr + len(m.mem))
        info = types_pb2.Member(
            name=a.member,
            regions=[region],
            process=types_pb2.ProcessIdentity(pid=a.process.pid or os.getpid(), start_time=1),
        )
        self.send(result=agent_pb2.CommandResult(command_id=cid, member=info))

    async def _capture(self, c: agent_pb2.Capture) -> None:
        for name in c.members:
            m = self.members.get(name)
            if m is None:
                continue
            t0 = time.perf_counter()
            copy = bytes(m.mem)  # the copy a real agent takes while the member is frozen
            m.staged[c.generation] = copy
            full = c.full or m.committed is None
            data = np.frombuffer(copy, np.uint8).reshape(-1, PAGE)
            changed = changed_pages(data, None if full else m.committed)
            stats = common_pb2.MemberStats(
                pages=int(changed.size), frozen_seconds=time.perf_counter() - t0, full=full
            )
            staged = agent_pb2.Staged(job=c.job, generation=c.generation, member=name, stats=stats)
            self.send(staged=staged)
            try:
                await self._upload(c.job, c.generation, m, copy, changed, full)
            except grpc.aio.AioRpcError as e:
                why = f"{e.code()} {e.details()}"
                print(f"{time.time():.3f} {self.node} upload failed: {why}", file=sys.stderr)
                self.send(failed=upload_failed(c.job, c.generation, name, str(e.details())))
                continue
            self.send(
                uploaded=agent_pb2.Uploaded(
                    job=c.job, generation=c.generation, member=name, stats=stats
                )
            )

    async def _upload(
        self, job: str, gen: int, m: Member, copy: bytes, changed: np.ndarray, full: bool
    ) -> None:
        data = np.frombuffer(copy, np.uint8).reshape(-1, PAGE)
        regions = [region("data", m.addr, data.shape[0], changed)]
        header = pages_header(job, gen, m.name, self.node, regions, full)
        reqs = [agent_pb2.UploadRequest(header=header)]
        if changed.size:
            ids, zero = chunk_ids(data, changed)
            nz = [i for i, z in enumerate(zero) if not z]
            send: list[int] = []
            if nz:
                want = b"".join(ids[i] for i in nz)
                mc = self.stub.MissingChunks(
                    agent_pb2.MissingChunksRequest(job=job, generation=gen, member=m.name, ids=want)
                )
                r = await mc  # (held in `mc` until done: a collected call is cancelled)
                bits = np.unpackbits(np.frombuffer(r.missing, np.uint8), bitorder="little")
                send = [i for i, b in zip(nz, bits[: len(nz)].tolist(), strict=True) if b]
            blobs = [data[int(changed[i])].tobytes() for i in send]
            batch = common_pb2.PageBatch(
                region=0,
                entries=page_entries(changed, ids),
                chunks=chunk_data([ids[i] for i in send], blobs),
            )
            reqs.append(agent_pb2.UploadRequest(batch=batch))
        reqs.append(agent_pb2.UploadRequest(end=agent_pb2.UploadEnd()))
        call = self.stub.UploadPages(iter(reqs))
        await call


async def main_async(a: argparse.Namespace) -> int:
    agents = [SimAgent(a.coordinator, f"{a.prefix}-{i:05d}", a.pages) for i in range(a.agents)]
    tasks = []
    # Dial in waves: a real fleet does not connect in one instant either, and a burst of
    # thousands of TLS-less handshakes at once only measures the kernel's accept queue.
    for i in range(0, len(agents), a.wave):
        wave = agents[i : i + a.wave]
        tasks += [asyncio.create_task(ag.run()) for ag in wave]
        await asyncio.gather(*(ag.welcomed.wait() for ag in wave))
    if a.ready_file is not None:
        tmp = a.ready_file.with_name(a.ready_file.name + ".tmp")
        tmp.write_text(f"ready {len(agents)}\n")
        os.replace(tmp, a.ready_file)
    print(f"ready {len(agents)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.read(1) else None)
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ag in agents:
        with contextlib.suppress(Exception):
            await ag.channel.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--pages", type=int, default=2, help="pages per member (default 2)")
    ap.add_argument("--prefix", default="sim", help="node names PREFIX-NNNNN")
    ap.add_argument("--wave", type=int, default=100, help="agents dialling at once")
    ap.add_argument("--ready-file", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.agents < 1 or a.pages < 1 or a.wave < 1:
        raise SystemExit("--agents, --pages and --wave must be >= 1")
    return asyncio.run(main_async(a))


if __name__ == "__main__":
    sys.exit(main())
