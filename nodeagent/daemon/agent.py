"""The node agent daemon: dials the coordinator, holds one `Attach` control stream, and
turns commands into work for the ptrace thread (nodeagent/daemon/worker.py) and the uploader
(nodeagent/upload/stream.py).

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

The session's parts (configuration, Hello, backoff, heartbeats) are
nodeagent/daemon/agent_session.py; what an upload's end reports is
nodeagent/daemon/agent_reports.py; commands down the stream become work in
nodeagent/daemon/agent_commands.py. The local API backend sees the agent as a
`LocalAgent` (nodeagent/localapi/backend.py), the metrics as an `AgentState`
(nodeagent/daemon/metrics.py).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import grpc

from cpcoord import grpcopts, grpcutil
from cpcoord.endpoints import Endpoints
from cpcoord.errors import (
    AgentUnavailable,
    CoordinatorUnavailable,
    CpcoordError,
    DataPathUnavailable,
    NotLeader,
)
from cpcoord.gen.v1 import agent_pb2, agent_pb2_grpc
from nodeagent.cache.drain import Drainer
from nodeagent.cache.store import NodeCache
from nodeagent.daemon import cache_commands
from nodeagent.daemon.agent_commands import Commands
from nodeagent.daemon.agent_reports import upload_report
from nodeagent.daemon.agent_session import AgentConfig, Session, backoff, hello
from nodeagent.daemon.local_commands import LocalCommands
from nodeagent.daemon.membership import Members
from nodeagent.daemon.metrics import AgentMetrics, unserved
from nodeagent.daemon.partner_link import PartnerLink
from nodeagent.daemon.worker import Worker
from nodeagent.daemon.worker_ops import DisconnectOp, Op, WorkerConfig
from nodeagent.upload.direct import DirectStore, choose
from nodeagent.upload.pool import Uploader
from nodeagent.upload.stream import Limits, StagedMember, UploadResult, enable_frames
from storecore.crypt import Sealer

__all__ = ["Agent", "AgentConfig", "backoff"]
log = logging.getLogger(__name__)


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
            lambda addr, insecure: grpcopts.make_channel(addr, insecure)
        )
        self._lock = threading.Lock()
        self._endpoints = Endpoints(config.coordinator)
        self._redial_now = False  # a follower named the leader: dial it without waiting
        self._quick = 0  # such immediate redials since the last Welcome (bounded)
        self._session: Session | None = None
        self._epoch = 0
        self._stop = threading.Event()
        self.fatal: CpcoordError | None = None  # why the agent stopped by itself
        self._direct: DirectStore | None = None  # the store it puts packs into
        self.cache: NodeCache | None = None
        self.drainer: Drainer | None = None
        if config.cache_dir is not None:  # level local (docs/multilevel.md)
            self.cache = NodeCache(config.cache_dir, config.cache_size, config.cache_keep)
            self.drainer = Drainer(self.cache, config.drain_rate, self._send_now)
        self.partners = PartnerLink(config, self.cache, self._send_now, self._sealer)
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
            on_prepared=self._prepared,
        )
        self.metrics.observe(self)
        self.commands = Commands(
            self.worker,
            self.uploader,
            self.members,
            self._emit,
            config.coordinator,
            lambda path, n: self.metrics.restore_read_bytes.labels(path).inc(n),
        )
        self._thread = threading.Thread(target=self.run, name="cpcoord-agent", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Run in a background thread (`run` blocks)."""
        self._thread.start()

    def run(self) -> None:
        """Connect, serve, reconnect with backoff, until `stop`."""
        self.worker.start()
        if self.drainer is not None:
            self.drainer.start()
        self.partners.start()
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
        if self.drainer is not None:
            self.drainer.stop()
        self.partners.stop()
        with self._lock:
            s = self._session
        if s is not None and s.call is not None:
            s.call.cancel()
        self.uploader.cancel_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self.worker.stop(timeout)
        self.uploader.wait(timeout)

    # -- AgentState (nodeagent/daemon/metrics.py reads these at scrape time) ---------------------

    def is_connected(self) -> bool:
        return self.connected.is_set()

    def members_held(self) -> int:
        return len(self.members.all())

    def members_frozen(self) -> int:
        return self.worker.members_frozen()

    def cache_stats(self) -> tuple[int, int, int, int] | None:
        """(cache bytes, packs to drain, bytes drained, packs the full cache refused)."""
        if self.cache is None or self.drainer is None:
            return None
        d = self.drainer
        return self.cache.bytes, d.pending, d.drained_bytes, self.cache.full

    def partner_stats(self) -> tuple[int, int, int] | None:
        """(bytes held as partner copies, bytes sent to the partner, refused full)."""
        return self.partners.stats()

    def _send_now(self, msg: agent_pb2.AgentMessage) -> bool:
        """Queue a message on the current stream, if one is up (the drain's reports)."""
        with self._lock:
            s = self._session
            if s is None or s.closed.is_set():
                return False
            s.out.put(msg)
            return True

    def _sealer(self) -> Sealer | None:
        """The store key the direct data path has now (a partner checks sealed packs)."""
        d = self._direct
        return d.sealer if d is not None else None

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
        """The welcomed session's stub for pages (its bulk connection) and call timeout
        (the local API downloads with it); AgentUnavailable while not connected."""
        with self._lock:
            s = self._session
        if s is None or s.closed.is_set() or not self.connected.is_set():
            raise AgentUnavailable(self.config.node)
        return s.bulk, s.limits.timeout_s

    # -- one session -----------------------------------------------------------------------

    def _serve_once(self) -> bool:
        """One control stream, from dial to break. True if it got as far as a Welcome."""
        addr = self._endpoints.current
        channel = self._channel_factory(addr, self.config.insecure)
        stub = agent_pb2_grpc.AgentControlStub(channel)
        # Pages go over a connection of their own (every channel is one: grpcutil), so
        # the control stream's heartbeats never queue behind them (Session).
        bulk_channel = self._channel_factory(addr, self.config.insecure)
        bulk = enable_frames(agent_pb2_grpc.AgentControlStub(bulk_channel), bulk_channel)
        with self._lock:
            self._epoch += 1
            s = Session(self._epoch, stub, bulk)
            self._session = s
        welcomed = False
        beat = threading.Thread(target=s.heartbeats, args=(self._emit,), daemon=True)
        try:
            cache_id = self.cache.id if self.cache is not None else ""
            first = hello(self.config.node, self.members, cache_id, self.partners.address)
            call = stub.Attach(s.requests(first))
            s.call = call
            for msg in call:
                s.last_heard = time.monotonic()
                if not welcomed:
                    if msg.WhichOneof("body") != "welcome":
                        log.error("first message is not a Welcome: closing")
                        break
                    welcomed = True
                    if not self._welcome(s, msg.welcome):
                        break
                    beat.start()
                    continue
                if not cache_commands.handle(msg, self.cache, self.drainer, self.partners):
                    self.commands.handle(s, msg)
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
            bulk_channel.close()
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

    def _prepared(self, nbytes: int) -> None:
        d = self._direct
        if d is not None:  # its packs' arenas faulted in before the first checkpoint
            d.prepare(nbytes)

    def _data_path(self, w: agent_pb2.Welcome) -> DirectStore | None:
        """The store to put packs into for this Welcome (kept while it announces the
        same one); DataPathUnavailable when --data-path direct cannot be had."""
        old = self._direct
        if old is not None and old.same(w) and self.config.data_path != "coordinator":
            return old
        cfg = self.config
        self._direct = choose(w, cfg.node, cfg.data_path, cfg.store_key_file)
        if self._direct is not None and self.cache is not None:
            self._direct = dataclasses.replace(self._direct, cache=self.cache)
        if old is not None:
            old.close()
        return self._direct

    def _welcome(self, s: Session, w: agent_pb2.Welcome) -> bool:
        """Take the Welcome; False when the agent must stop (direct path refused)."""
        try:
            direct = self._data_path(w)
        except DataPathUnavailable as e:
            log.error("stopping: %s", e, extra={"fields": {"node": self.config.node}})
            self.fatal = e
            self._stop.set()
            return False
        s.limits = Limits(
            max_message_bytes=w.max_message_bytes or grpcopts.MAX_MESSAGE_BYTES,
            max_batch_entries=min(w.max_batch_entries or 65536, 65536),
            compress=self.config.compress_uploads(),
            direct=direct,
        )
        s.interval = (w.heartbeat_interval_ms or 1000) / 1000
        if self.drainer is not None and self.cache is not None:
            self.cache.sweep({name for item in w.drain for name in item.packs})
            self.drainer.set_store(direct.backend if direct is not None else None)
            self.drainer.welcome(w.drain)
        self.partners.changed(w.partner)
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
                    "data_path": "direct" if direct is not None else "coordinator",
                }
            },
        )
        return True

    def _broken(self, s: Session) -> None:
        """The stream is over: nothing of it is reported any more; thaw, cancel, keep
        the pending sets."""
        with self._lock:
            if self._session is s:
                self._session = None
            self._epoch += 1
        s.closed.set()
        self.connected.clear()
        if self.drainer is not None:
            self.drainer.set_store(None)
        self.uploader.cancel_all()
        self.commands.prefetches.drop_stale(self._epoch)  # the restores it served are over
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
            self.uploader.submit(s.bulk, sm, s.limits, epoch)

    def _uploaded(
        self, sm: StagedMember, res: UploadResult | CpcoordError | None, epoch: int
    ) -> None:
        msg = upload_report(sm, res, self.metrics)
        if msg is not None:
            self._emit(msg, epoch)
