"""What one control stream of the node agent is made of: the agent's configuration, the
Hello it opens with, the session (epoch, outbound queue, stub, liveness, heartbeats) and
the waits between redials. The stream itself is driven by nodeagent/daemon/agent.py.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from cpcoord import __version__
from cpcoord.gen.v1 import agent_pb2, agent_pb2_grpc
from cpcoord.ranges import PAGE_SIZE
from cpcoord.tls import TlsFiles
from nodeagent.daemon.membership import Members
from nodeagent.trackers import registry
from nodeagent.upload.stream import Limits

PROTOCOL_VERSION = 1
SILENT_INTERVALS = 3  # heartbeat intervals of silence that break the stream
log = logging.getLogger("nodeagent.daemon.agent")  # the agent's records keep its name
CAPABILITIES = ("zstd", "restore-in-place", "restore-into")
LOOPBACK = ("localhost", "127.", "[::1]", "::1", "ip6-localhost")


@dataclass(frozen=True)
class AgentConfig:
    coordinator: str  # HOST:PORT, or HOST:PORT,HOST:PORT... (replicas)
    node: str
    insecure: bool = False
    lease_s: float = 10.0
    tracker: str = registry.AUTO
    compress: str = "auto"  # auto (zstd unless the coordinator is on loopback) | zstd | none
    upload_threads: int = 2
    freeze_timeout_s: float = 5.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    data_path: str = "auto"  # auto | direct | coordinator (nodeagent/upload/direct.py)
    store_key_file: Path | None = None  # a sealed store's key when not sent over mTLS
    cache_dir: Path | None = None  # --cache: the node cache (docs/multilevel.md)
    cache_size: int = 0  # bytes; 0 = the file system's free space
    cache_keep: int = 2  # drained generations kept per job
    drain_rate: float = 0.0  # bytes/s; 0 = unlimited
    partner_listen: str | None = None  # --partner-listen HOST:PORT: take partner copies
    tls: TlsFiles | None = None  # the agent's own certificate (mTLS), for partner copies

    def compress_uploads(self) -> bool:
        if self.compress == "auto":
            hosts = [a.rpartition(":")[0] or a for a in self.coordinator.split(",")]
            return not all(h.strip().startswith(LOOPBACK) for h in hosts)
        return self.compress == "zstd"


def backoff(
    initial: float, maximum: float, rand: Callable[[], float] = random.random
) -> Iterator[float]:
    """Waits before each redial: exponential (doubling from `initial` to `maximum`) with
    jitter, each uniform in [d/2, d], so agents that lost the same coordinator do not
    all redial at once and none waits less than half its step."""
    d = initial
    while True:
        yield d / 2 + rand() * d / 2
        d = min(maximum, d * 2)


def hello(
    node: str, members: Members, cache_id: str = "", partner_address: str = ""
) -> agent_pb2.Hello:
    """The first message of a stream: who this agent is, what it can do (every tracker
    backend with its verdict) and the members it still holds."""
    trackers = [
        agent_pb2.TrackerBackend(name=a.name, available=a.available, reason=a.reason)
        for a in registry.report()
    ]
    return agent_pb2.Hello(
        node=node,
        version=__version__,
        protocol_version=PROTOCOL_VERSION,
        capabilities=list(CAPABILITIES),
        trackers=trackers,
        page_size=PAGE_SIZE,
        members=members.held(),
        hostname=os.uname().nodename,
        cache_id=cache_id,
        partner_address=partner_address,
    )


class Session:
    """One control stream: its epoch, outbound queue, stubs and liveness.

    `stub` carries the control stream; `bulk` (a stub on a channel of its own, i.e. a
    TCP connection of its own) carries the pages: uploads, their MissingChunks and
    downloads. On one connection a heartbeat waits behind every byte of page data
    already handed to gRPC and the kernel (seconds on a slow link), so the coordinator
    would count a busy agent silent (docs/decisions.md, "Liveness is what arrives")."""

    def __init__(
        self,
        epoch: int,
        stub: agent_pb2_grpc.AgentControlStub,
        bulk: agent_pb2_grpc.AgentControlStub | None = None,
    ) -> None:
        self.epoch = epoch
        self.stub = stub
        self.bulk = stub if bulk is None else bulk
        self.out: queue.Queue[agent_pb2.AgentMessage] = queue.Queue()
        self.closed = threading.Event()
        self.last_heard = time.monotonic()
        self.heard_heartbeat = False
        self.interval = 1.0  # seconds between heartbeats (Welcome)
        self.limits = Limits()
        self.call: grpc.Call | None = None

    def requests(self, first: agent_pb2.Hello) -> Iterator[agent_pb2.AgentMessage]:
        """What goes up the stream: the Hello, then whatever is queued, until closed."""
        yield agent_pb2.AgentMessage(hello=first)
        while not self.closed.is_set():
            try:
                yield self.out.get(timeout=0.25)
            except queue.Empty:
                continue

    def heartbeats(self, emit: Callable[[agent_pb2.AgentMessage, int], None]) -> None:
        """Send a heartbeat every interval until closed; cancel the call when the
        coordinator, once it showed it sends heartbeats, is silent SILENT_INTERVALS
        intervals (runs in a thread of its own)."""
        seq = 0
        interval = self.interval
        # Silence counts from when this thread could listen: after a stall of the agent
        # itself (starved of CPU), the coordinator is not blamed for that time.
        listening_since = last = time.monotonic()
        while not self.closed.wait(interval):
            now = time.monotonic()
            if now - last > 2 * interval:
                listening_since = now - interval
            last = now
            seq += 1
            hb = agent_pb2.Heartbeat(sequence=seq, sent_unix_ms=int(time.time() * 1000))
            emit(agent_pb2.AgentMessage(heartbeat=hb), self.epoch)
            silent = time.monotonic() - max(self.last_heard, listening_since)
            quiet = self.heard_heartbeat and silent > SILENT_INTERVALS * interval
            if quiet and self.call is not None:
                log.warning(
                    "coordinator silent: dropping the stream",
                    extra={"fields": {"silent_s": round(silent, 2)}},
                )
                self.call.cancel()
                return
