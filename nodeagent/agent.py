"""The node agent daemon: dials the coordinator, holds one `Attach` control stream, and
turns commands into work for the ptrace thread (nodeagent/worker.py) and the uploader
(nodeagent/upload.py).

One *session* per control stream: Hello (node name, version, capabilities, every tracker
backend with its verdict, the members still held, so a restarted coordinator learns
them again), Welcome (heartbeat interval, message limits), then events up and commands
down. Each session has an *epoch*; everything the session started reports with it, and
a report of an older epoch is dropped: a new stream never carries news of an old one.

A broken stream (the coordinator died, the network broke, 3 heartbeat intervals of
silence after the coordinator showed it sends heartbeats, or gRPC keepalive) is a fact
the agent acts on at once: it thaws every member it holds frozen, cancels uploads, drops
staging, and keeps the pending changed sets (the coordinator aborts what the agent owed;
the next capture covers those pages). Then it reconnects with exponential backoff and
full jitter (`backoff_initial_s` doubling to `backoff_max_s`, each wait uniform in
[d/2, d]; reset after a Welcome). With coordinator replicas (`--coordinator A,B,C`) it
dials the leader a follower named in its NotLeader answer at once, else the next address
(cpcoord/endpoints.py).

Restore (issue 5): a Freeze of kind RESTORE freezes and fits the members (Failed MISMATCH
for one that cannot take the generation back, then no Frozen); a Restore downloads each
member's pages on a thread of its own (`DownloadPages`) and the ptrace thread writes them
while the member stays frozen (Restored); the Thaw thaws. RestoreInto downloads and
writes into another process. Only members with explicit regions are restored.
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

import grpc

from cpcoord import __version__, grpcutil
from cpcoord.endpoints import Endpoints
from cpcoord.errors import (
    AgentUnavailable,
    ChunkMismatch,
    CoordinatorUnavailable,
    CpcoordError,
    NotImplementedYet,
    NotLeader,
)
from cpcoord.gen.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from cpcoord.ranges import PAGE_SIZE
from nodeagent import restore_ops
from nodeagent.local_commands import LocalCommands
from nodeagent.membership import Members
from nodeagent.metrics import AgentMetrics, unserved
from nodeagent.procfs import ProcessIdentity
from nodeagent.trackers import registry
from nodeagent.upload import Limits, StagedMember, UploadResult, enable_frames
from nodeagent.upload_pool import Uploader
from nodeagent.worker import Worker
from nodeagent.worker_ops import (
    AbortOp,
    AttachOp,
    CaptureOp,
    CommittedOp,
    DetachOp,
    DisconnectOp,
    FreezeOp,
    Op,
    R,
    RestoreIntoOp,
    RestoreOp,
    WorkerConfig,
    failed,
    result,
)

log = logging.getLogger(__name__)
PROTOCOL_VERSION = 1
CAPABILITIES = ("zstd", "restore-in-place", "restore-into")
SILENT_INTERVALS = 3
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


class _Session:
    """One control stream: its epoch, outbound queue, stub and liveness."""

    def __init__(self, epoch: int, stub: agent_pb2_grpc.AgentControlStub) -> None:
        self.epoch = epoch
        self.stub = stub
        self.out: queue.Queue[agent_pb2.AgentMessage] = queue.Queue()
        self.closed = threading.Event()
        self.last_heard = time.monotonic()
        self.heard_heartbeat = False
        self.interval = 1.0  # seconds between heartbeats (Welcome)
        self.limits = Limits()
        self.call: grpc.Call | None = None


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        channel_factory: Callable[[str, bool], grpc.Channel] | None = None,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or unserved()
        self._channel_factory = channel_factory or (
            lambda addr, insecure: grpcutil.make_channel(addr, insecure)
        )
        self._lock = threading.Lock()
        self._endpoints = Endpoints(config.coordinator)
        self._redial_now = False  # a follower named the leader: dial it without waiting
        self._quick = 0  # such immediate redials since the last Welcome (bounded)
        self._session: _Session | None = None
        self._epoch = 0
        self._stop = threading.Event()
        self.connected = threading.Event()
        self.sessions = 0  # Welcomes received, for tests and metrics
        self.members = Members()
        self.local_commands = LocalCommands()  # the local API's own worker commands
        self.uploader = Uploader(self._uploaded, config.upload_threads)
        self.worker = Worker(
            self.members,
            self._emit,
            self._staged,
            WorkerConfig(config.node, config.lease_s, config.freeze_timeout_s, config.tracker),
            epoch=self._current_epoch,
            metrics=self.metrics,
        )
        self.metrics.observe(self)
        self._thread = threading.Thread(target=self.run, name="cpcoord-agent", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Run in a background thread (`run` blocks)."""
        self._thread.start()

    def run(self) -> None:
        """Connect, serve, reconnect with backoff, until `stop`."""
        self.worker.start()
        delays = backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        while not self._stop.is_set():
            welcomed = self._serve_once()
            if self._stop.is_set():
                break
            if welcomed:  # a stream that worked: start again from the shortest wait
                delays = backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
            if self._redial_now:
                self._redial_now = False
                continue
            wait = next(delays)
            log.info("reconnecting", extra={"fields": {"in_s": round(wait, 3)}})
            self._stop.wait(wait)

    def stop(self, timeout: float = 30.0) -> None:
        """Thaw everything, disarm trackers, close the stream."""
        self._stop.set()
        with self._lock:
            s = self._session
        if s is not None and s.call is not None:
            s.call.cancel()
        self.uploader.cancel_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self.worker.stop(timeout)
        self.uploader.wait(timeout)

    # -- AgentState (nodeagent/metrics.py reads these at scrape time) ---------------------

    def is_connected(self) -> bool:
        return self.connected.is_set()

    def members_held(self) -> int:
        return len(self.members.all())

    def members_frozen(self) -> int:
        return self.worker.members_frozen()

    def _current_epoch(self) -> int:
        with self._lock:
            return self._epoch

    @property
    def node(self) -> str:
        return self.config.node

    def run_local(self, make: Callable[[int], Op], timeout: float) -> agent_pb2.CommandResult:
        """Give the ptrace thread a command of the local API's, `make(command_id)`, and
        wait for its result (which never goes up the control stream)."""
        cid = self.local_commands.new()
        self.worker.submit(make(cid))
        return self.local_commands.wait(cid, timeout)

    def control_stub(self) -> tuple[agent_pb2_grpc.AgentControlStub, float]:
        """The welcomed control stream's stub and call timeout (the local API downloads
        with it); AgentUnavailable while the agent is not connected."""
        with self._lock:
            s = self._session
        if s is None or s.closed.is_set() or not self.connected.is_set():
            raise AgentUnavailable(self.config.node)
        return s.stub, s.limits.timeout_s

    # -- one session -----------------------------------------------------------------------

    def _hello(self) -> agent_pb2.Hello:
        trackers = [
            agent_pb2.TrackerBackend(name=a.name, available=a.available, reason=a.reason)
            for a in registry.report()
        ]
        return agent_pb2.Hello(
            node=self.config.node,
            version=__version__,
            protocol_version=PROTOCOL_VERSION,
            capabilities=list(CAPABILITIES),
            trackers=trackers,
            page_size=PAGE_SIZE,
            members=self.members.held(),
            hostname=os.uname().nodename,
        )

    def _requests(self, s: _Session, hello: agent_pb2.Hello) -> Iterator[agent_pb2.AgentMessage]:
        yield agent_pb2.AgentMessage(hello=hello)
        while not s.closed.is_set():
            try:
                yield s.out.get(timeout=0.25)
            except queue.Empty:
                continue

    def _serve_once(self) -> bool:
        """One control stream, from dial to break. True if it got as far as a Welcome."""
        addr = self._endpoints.current
        channel = self._channel_factory(addr, self.config.insecure)
        stub = enable_frames(agent_pb2_grpc.AgentControlStub(channel), channel)
        with self._lock:
            self._epoch += 1
            s = _Session(self._epoch, stub)
            self._session = s
        welcomed = False
        beat = threading.Thread(target=self._heartbeats, args=(s,), daemon=True)
        try:
            call = stub.Attach(self._requests(s, self._hello()))
            s.call = call
            for msg in call:
                s.last_heard = time.monotonic()
                if not welcomed:
                    if msg.WhichOneof("body") != "welcome":
                        log.error("first message is not a Welcome: closing")
                        break
                    welcomed = True
                    self._welcome(s, msg.welcome)
                    beat.start()
                    continue
                self._command(s, msg)
        except grpc.RpcError as e:
            err = grpcutil.rpc_to_error(e, "Attach", addr)
            (log.info if self._stop.is_set() else log.warning)(
                "control stream broke",
                extra={"fields": {"coordinator": addr, "error": str(err)}},
            )
            self._next_address(err)
        finally:
            self._broken(s)
            channel.close()
        return welcomed

    def _next_address(self, err: CpcoordError) -> None:
        """Replicas: go to the leader a follower named, else to the next address."""
        if isinstance(err, NotLeader) and err.leader and self._endpoints.follow(err.leader):
            # At once, but not forever: replicas that disagree during an election must
            # not make the agent bounce between them without a pause.
            self._redial_now = self._quick < 2
            self._quick += 1
        elif isinstance(err, NotLeader | CoordinatorUnavailable):
            self._endpoints.advance()

    def _welcome(self, s: _Session, w: agent_pb2.Welcome) -> None:
        s.limits = Limits(
            max_message_bytes=w.max_message_bytes or grpcutil.MAX_MESSAGE_BYTES,
            max_batch_entries=min(w.max_batch_entries or 65536, 65536),
            compress=self.config.compress_uploads(),
        )
        s.interval = (w.heartbeat_interval_ms or 1000) / 1000
        self._quick = 0
        if self.sessions:
            self.metrics.reconnects.inc()
        self.sessions += 1
        self.connected.set()
        log.info(
            "attached",
            extra={
                "fields": {
                    "coordinator": self._endpoints.current,
                    "node": self.config.node,
                    "members": len(self.members.all()),
                    "epoch": s.epoch,
                }
            },
        )

    def _heartbeats(self, s: _Session) -> None:
        seq = 0
        interval = s.interval
        # Silence counts from when this thread could listen: after a stall of the agent
        # itself (starved of CPU), the coordinator is not blamed for that time.
        listening_since = last = time.monotonic()
        while not s.closed.wait(interval):
            now = time.monotonic()
            if now - last > 2 * interval:
                listening_since = now - interval
            last = now
            seq += 1
            hb = agent_pb2.Heartbeat(sequence=seq, sent_unix_ms=int(time.time() * 1000))
            self._emit(agent_pb2.AgentMessage(heartbeat=hb), s.epoch)
            silent = time.monotonic() - max(s.last_heard, listening_since)
            if s.heard_heartbeat and silent > SILENT_INTERVALS * interval and s.call is not None:
                log.warning(
                    "coordinator silent: dropping the stream",
                    extra={"fields": {"silent_s": round(silent, 2)}},
                )
                s.call.cancel()
                return

    def _broken(self, s: _Session) -> None:
        """The stream is over: nothing of it is reported any more; thaw, cancel, keep
        the pending sets."""
        with self._lock:
            if self._session is s:
                self._session = None
            self._epoch += 1
        s.closed.set()
        self.connected.clear()
        self.uploader.cancel_all()
        self.worker.submit(DisconnectOp())

    # -- events up -------------------------------------------------------------------------

    def _emit(self, msg: agent_pb2.AgentMessage, epoch: int) -> None:
        if self.local_commands.deliver(msg):
            return
        with self._lock:
            s = self._session
            if s is None or s.epoch != epoch or s.closed.is_set():
                log.debug(
                    "report of an ended stream dropped",
                    extra={"fields": {"body": msg.WhichOneof("body")}},
                )
                return
            s.out.put(msg)

    def _staged(self, staged: list[StagedMember], epoch: int) -> None:
        with self._lock:
            s = self._session
        for sm in staged:
            if s is None or s.epoch != epoch:
                sm.release()
                continue
            self.uploader.submit(s.stub, sm, s.limits, epoch)

    def _uploaded(
        self, sm: StagedMember, res: UploadResult | CpcoordError | None, epoch: int
    ) -> None:
        if res is None:  # cancelled: an Abort or a broken stream; nothing to say
            return
        if isinstance(res, CpcoordError):
            reason = (
                R.ABORT_REASON_BAD_DATA
                if isinstance(res, ChunkMismatch)
                else R.ABORT_REASON_UPLOAD_FAILED
            )
            log.warning("upload failed", extra={"fields": {"member": sm.member, "error": str(res)}})
            self._emit(failed(sm.job, sm.generation, sm.member, reason, res), epoch)
            return
        m = self.metrics
        m.upload_seconds.observe(res.seconds)
        m.upload_bytes.inc(res.bytes_sent)
        m.upload_chunks.labels("sent").inc(res.chunks_sent)
        m.upload_chunks.labels("present").inc(res.chunks - res.chunks_sent)
        m.zero_pages.inc(res.zero_pages)
        stats = common_pb2.MemberStats(
            pages=res.pages,
            zero_pages=res.zero_pages,
            bytes_logical=res.pages * PAGE_SIZE,
            bytes_stored_new=res.bytes_stored_new,
            frozen_seconds=sm.frozen_seconds,
            tracker=sm.tracker,
            full=sm.full,
        )
        up = agent_pb2.Uploaded(job=sm.job, generation=sm.generation, member=sm.member, stats=stats)
        self._emit(agent_pb2.AgentMessage(uploaded=up), epoch)

    # -- commands down -----------------------------------------------------------------------

    def _command(self, s: _Session, msg: agent_pb2.CoordinatorMessage) -> None:
        body = msg.WhichOneof("body")
        e = s.epoch
        if body == "heartbeat":
            s.heard_heartbeat = True
        elif body == "freeze":
            f = msg.freeze
            restoring = f.kind == common_pb2.OPERATION_KIND_RESTORE
            layouts = restore_ops.layouts_of(f) if restoring else ()
            op = FreezeOp(f.job, f.generation, f.lease_ms, tuple(f.members), e, restoring, layouts)
            self.worker.submit(op)
        elif body == "capture":
            c = msg.capture
            self.worker.submit(CaptureOp(c.job, c.generation, c.full, tuple(c.members), e))
        elif body == "abort":
            a = msg.abort
            log.info(
                "abort",
                extra={"fields": {"job": a.job, "generation": a.generation, "detail": a.detail}},
            )
            self.uploader.cancel(a.job, a.generation)
            self.worker.submit(AbortOp(a.job, a.generation, e))
        elif body == "committed":
            self.worker.submit(CommittedOp(msg.committed.job, msg.committed.generation))
            self.uploader.forget(msg.committed.job, msg.committed.generation)
        elif body == "thaw":
            self.worker.submit(AbortOp(msg.thaw.job, msg.thaw.generation, e))
        elif body == "restore":
            r = msg.restore
            members = tuple(r.members) or tuple(m.name for m in self.members.of_job(r.job))
            self._download(s, "restore", (r.job, r.generation, members))
        elif body == "attach_member":
            self.worker.submit(AttachOp(msg.command_id, msg.attach_member, e))
        elif body == "detach_member":
            d = msg.detach_member
            self.worker.submit(DetachOp(msg.command_id, d.job, d.member, e))
        elif body == "restore_into":
            self._download(s, "restore-into", (msg.command_id, msg.restore_into))
        elif body == "welcome":
            log.warning("a second Welcome ignored")
        else:  # a command newer than this agent
            err = NotImplementedYet(f"command {body or 'unknown'}", f"agent {__version__}")
            self._emit(result(msg.command_id, err=err), e)

    # -- restore -----------------------------------------------------------------------------

    def _download(self, s: _Session, what: str, args: tuple[object, ...]) -> None:
        """Download off the stream's reader thread; the ptrace thread writes."""
        target = self._restore_download if what == "restore" else self._restore_into_download
        threading.Thread(
            target=target, args=(s, *args), name=f"cpcoord-{what}", daemon=True
        ).start()

    def _restore_download(self, s: _Session, job: str, gen: int, members: tuple[str, ...]) -> None:
        for member in members:
            if s.closed.is_set():
                return
            err: CpcoordError | None = None
            contents: tuple[restore_ops.RegionContents, ...] = ()
            try:
                contents = restore_ops.download(s.stub, job, gen, member, s.limits.timeout_s)
            except grpc.RpcError as ex:
                err = grpcutil.rpc_to_error(ex, "DownloadPages", self.config.coordinator)
            except CpcoordError as ex:
                err = ex
            if err is not None:
                log.warning(
                    "restore download failed",
                    extra={"fields": {"member": member, "error": str(err)}},
                )
            self.worker.submit(RestoreOp(job, gen, member, contents, err, s.epoch))

    def _restore_into_download(
        self, s: _Session, command_id: int, ri: agent_pb2.RestoreInto
    ) -> None:
        err: CpcoordError | None = None
        contents: tuple[restore_ops.RegionContents, ...] = ()
        try:
            contents = restore_ops.download(
                s.stub, ri.job, ri.generation, ri.member, s.limits.timeout_s
            )
        except grpc.RpcError as ex:
            err = grpcutil.rpc_to_error(ex, "DownloadPages", self.config.coordinator)
        except CpcoordError as ex:
            err = ex
        target: ProcessIdentity | int = ri.target.pid
        if ri.target.start_time:
            target = ProcessIdentity(ri.target.pid, ri.target.start_time)
        now = tuple((r.name, r.start, r.end - r.start) for r in ri.regions)
        self.worker.submit(
            RestoreIntoOp(command_id, ri.member, target, now, contents, err, s.epoch)
        )
