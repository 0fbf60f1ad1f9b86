"""The coordinator's driver: it runs one protocol core (`protocol.Generation`) per
checkpoint, carries out its commands, and feeds it what it hears.

Owns: the agent sessions (by control stream: a broken stream is AgentLost for every
generation in flight), the generations in flight (one per job, numbers allocated by the
store), their timers (`next_deadline()`; one timer thread, which also sends heartbeats
and counts silent agents lost), and the dispatch of the core's commands. Helpers, each
a module taking an `EngineView` (engine_view.py): an agent's connect, Welcome and
disconnect (agent_connect.py), membership and reconciliation
(members_ops.py, membership.py), the agents' messages (agent_events.py), the page path
into the store (ingest.py, uploads.py), the commit, aborts, a checkpoint's end and
retention (commit.py), restore (restore.py), reading generations (generations.py,
pagestream.py); the commands' wire messages (outbound.py), a flight and its progress
(flight.py). Servicers only translate.

Concurrency: one re-entrant lock guards all state. Events are queued and drained one at
a time under it (a command may produce follow-up events, e.g. Freeze to a node that just
vanished), so the core sees one event at a time. Nothing slow runs under the lock except
short catalog transactions: commits run on their own thread, agents' answers are
awaited outside it, uploads hash and compress outside it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable

from coordinator import agent_connect, commit, members_ops, restore
from coordinator.agent_connect import PROTOCOL_VERSION as PROTOCOL_VERSION
from coordinator.agents import AgentSession, Registry
from coordinator.cacheread import CacheReads
from coordinator.dataplane import DataPlaneStats
from coordinator.engine_view import Options
from coordinator.events import EventBus
from coordinator.flight import (  # CheckpointOptions: re-exported for the servicers
    CheckpointOptions,
    Flight,
    Progress,
    RunStats,
    Subscription,
    Summary,
)
from coordinator.membership import Membership
from coordinator.outbound import SEND_COMMANDS, outbound
from coordinator.protocol import Generation
from coordinator.protocol.messages import (
    AgentLost,
    Begin,
    Cancel,
    Command,
    Commit,
    DropGeneration,
    EmitProgress,
    Event,
    StoreFailed,
    Tick,
)
from coordinator.protocol.values import (
    AbortReason,
    ProgressKind,
    Spec,
)
from coordinator.store import Repository
from cpcoord.errors import (
    CancelTooLate,
    CpcoordError,
    InvalidArgument,
    UnknownJob,
)
from cpcoord.faults import fault_point
from cpcoord.gen.v1 import agent_pb2
from cpcoord.log import log_event
from cpcoord.ranges import check_name

log = logging.getLogger("cpcoord.coordinator")

_STORE_FAULTS = {"packs": "coordinator.commit.packs", "manifest": "coordinator.commit.manifest"}


class Engine:
    def __init__(
        self,
        repo: Repository,
        options: Options | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.repo = repo
        self.opt = options or Options()
        self.clock = clock
        self.lock = threading.RLock()
        self._wake = threading.Condition(self.lock)
        self.agents = Registry()
        self.members = Membership(repo.catalog)
        self.flights: dict[str, Flight] = {}  # job -> its generation in flight
        self.attaching: set[tuple[str, str]] = set()  # (job, member) being attached
        self.recent: collections.OrderedDict[tuple[str, int], RunStats] = collections.OrderedDict()
        self.dataplane = DataPlaneStats()
        self.cache_reads = CacheReads()  # reads of chunks in node caches (cacheread.py)
        self._queue: collections.deque[tuple[Flight, Event]] = collections.deque()
        self._draining = False
        self._stopping = False
        self._timer: threading.Thread | None = None
        self.on_progress: list[Callable[[Flight, Progress], None]] = []  # metrics, watch
        self.events = EventBus()  # Watch streams (coordinator/events.py)
        repo.fault = lambda step: (
            fault_point(_STORE_FAULTS[step]) if step in _STORE_FAULTS else None
        )

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._timer = threading.Thread(target=self._timer_loop, name="engine-timer", daemon=True)
        self._timer.start()

    def close(self) -> None:
        """Abort what is in flight (agents thaw and keep their pending sets), end every
        agent stream, stop the timer."""
        with self.lock:
            self._stopping = True
            for f in list(self.flights.values()):
                self.feed(f, StoreFailed("the coordinator is shutting down"))
            for s in self.agents.connected():
                s.close("the coordinator is shutting down")
            self.wake()
        self.events.close()
        if self._timer is not None:
            self._timer.join(timeout=5)

    # -- agents ----------------------------------------------------------------------

    def welcome(
        self, node: str = "", partner: tuple[str, str] = ("", ""), takes: tuple[str, ...] = ()
    ) -> agent_pb2.Welcome:
        return agent_connect.welcome(self, node, partner, takes)

    def connect(self, hello: agent_pb2.Hello, peer: str) -> AgentSession:
        """Register a new control stream (agent_connect.py; its Welcome is queued first)."""
        return agent_connect.connect(self, hello, peer)

    def heard_from(self, node: str) -> None:
        """A message of `node`'s arrived off its control stream (a batch of one of its
        uploads): it is alive, as if a heartbeat had come. Without the lock (a dict
        lookup and a float), as the loop calls it for every message it reads."""
        s = self.agents.current(node)
        if s is not None:
            s.heard()

    def disconnect(self, s: AgentSession, detail: str) -> None:
        """The stream is over: every generation in flight hears AgentLost (agent_connect.py)."""
        agent_connect.disconnect(self, s, detail)

    @property
    def stopping(self) -> bool:
        """close() was called: no agent may connect any more."""
        return self._stopping

    # -- checkpoint ------------------------------------------------------------------

    def checkpoint(self, opts: CheckpointOptions) -> Subscription:
        """Begin a generation of `opts.job`; progress comes on the subscription. Errors
        before it begins: UnknownJob, JobBusy, MemberNotRunning, AgentUnavailable."""
        check_name(opts.job)
        timing = opts.timing()
        with self.lock:
            if not self.members.has_job(opts.job):
                raise UnknownJob(opts.job)
            members = self.members.of_job(opts.job)
            if not members:
                raise InvalidArgument(f"job {opts.job} has no members: attach some first")
            members_ops.check_ready(self, opts.job, members, "; detach it or attach it anew")
            n = self.repo.begin(opts.job)
            parent = self.repo.catalog.get(opts.job, n).parent
            full_nodes = frozenset(
                m.node for m in members if opts.full or parent is None or m.committed != parent
            )
            spec = Spec(
                opts.job,
                n,
                tuple((m.name, m.node) for m in members),
                full=opts.full,
                timing=timing,
            )
            f = Flight(
                Generation(spec),
                parent,
                full_nodes,
                pin=opts.pin,
                started=self.clock(),
                precopy_ms=opts.precopy_ms(),
            )
            return self.launch(f)

    def launch(self, f: Flight) -> Subscription:
        """Under the lock: `f` becomes its job's flight and begins; progress comes on the
        subscription."""
        sub = f.subscribe()
        self.flights[f.job] = f
        self.feed(f, Begin(self.clock()))
        self.wake()
        return sub

    def cancel(self, f: Flight, detail: str) -> bool:
        """The client went away: abort unless the store is already committing."""
        with self.lock:
            if not f.in_flight:
                return False
            try:
                cmds = f.gen.handle(Cancel(detail))
            except CancelTooLate:
                return False
            self._run(f, cmds)
            self._drain()
            return True

    def restore_in_place(self, opts: restore.RestoreOptions) -> Subscription:
        """Restore in place (coordinator/restore.py); progress on the subscription."""
        return restore.begin(self, opts)

    # -- the core's events and commands ------------------------------------------------

    def feed(self, f: Flight, event: Event) -> None:
        """Queue an event for a flight and drain the queue (under the lock)."""
        with self.lock:
            self._queue.append((f, event))
            self._drain()

    def _drain(self) -> None:
        if self._draining:
            return  # an outer frame is draining: it will get to it
        self._draining = True
        try:
            while self._queue:
                f, ev = self._queue.popleft()
                try:
                    cmds = f.gen.handle(ev)
                except CpcoordError as e:
                    log_event(
                        log,
                        logging.WARNING,
                        "event refused",
                        job=f.job,
                        generation=f.number,
                        event=type(ev).__name__,
                        why=str(e),
                    )
                    continue
                self._run(f, cmds)
        finally:
            self._draining = False

    def _run(self, f: Flight, cmds: Iterable[Command]) -> None:
        for c in cmds:
            try:
                self._do(f, c)
            except Exception:
                log.exception("command failed", extra={"fields": {"command": type(c).__name__}})

    def _do(self, f: Flight, c: Command) -> None:
        if isinstance(c, SEND_COMMANDS):
            o = outbound(c, f.full_nodes, f.precopy_ms)
            if isinstance(o.message, agent_pb2.Freeze) and restore.is_restore(f):
                # whole-memory members: regions and registers at the cut
                o.message.layouts.extend(
                    restore.freeze_layouts(self, c.job, c.generation, o.message.members)
                )
                o.message.force = f.force
            elif isinstance(o.message, agent_pb2.Prepare) and restore.is_restore(f):
                # each member's tracker base and the pages that differ from it
                restore.prepare_members(self, c.job, c.generation, o.message)
            s = self.agents.current(o.node)
            if s is not None:
                s.send(**{o.field: o.message})
            elif o.required:
                self._queue.append((f, AgentLost(o.node, "not connected")))
        elif isinstance(c, Commit):
            f.committing = True
            threading.Thread(
                target=self._commit, args=(f,), name=f"commit-{f.job}-{f.number}", daemon=True
            ).start()
        elif isinstance(c, DropGeneration):
            self._drop(f, c.reason)
        elif isinstance(c, EmitProgress):
            self._progress(f, c)

    def _drop(self, f: Flight, reason: AbortReason) -> None:
        commit.drop(self, f, reason)

    def _progress(self, f: Flight, c: EmitProgress) -> None:
        ev = c.event
        if ev.kind is ProgressKind.BARRIER:
            f.barrier_ns = time.time_ns()
        summary = None
        if ev.kind in (ProgressKind.COMMITTED, ProgressKind.ABORTED):
            summary = self._finish(f)
        p = Progress(ev, self.clock() - f.started, summary)
        f.publish(p)
        self.events.progress(p, restore=restore.is_restore(f))
        if restore.is_restore(f):
            return  # the hooks (metrics) count checkpoints
        for hook in self.on_progress:
            try:
                hook(f, p)
            except Exception:
                log.exception("progress hook failed")

    def _finish(self, f: Flight) -> Summary:
        """The flight is over (under the lock): the job is free, the timer hears it."""
        if self.flights.get(f.job) is f:
            del self.flights[f.job]
        end = restore.finish if restore.is_restore(f) else commit.finish
        summary = end(self, f)
        self.wake()
        return summary

    # -- commit (coordinator/commit.py) ---------------------------------------------------

    def _commit(self, f: Flight) -> None:
        commit.run(self, f)

    def retain(self, job: str) -> list[int]:
        """Delete committed generations beyond the newest `keep` (pinned ones stay)."""
        return commit.retain(self, job)

    # -- timers ----------------------------------------------------------------------

    def wake(self) -> None:
        """Wake the timer thread (deadlines changed). Under the lock."""
        self._wake.notify_all()

    def _timer_loop(self) -> None:
        hb = self.opt.heartbeat_s
        next_hb = self.clock()
        # Silence is counted from when this loop could listen: after a stall of its own
        # (the process starved of CPU, the lock held long), nobody is silent for the
        # time it could not hear them, and messages that waited are read first.
        listening_since = last_pass = self.clock()
        with self.lock:
            while not self._stopping:
                now = self.clock()
                if now - last_pass > 2 * hb:  # a stall: credit one interval of listening
                    listening_since = now - hb
                last_pass = now
                for f in list(self.flights.values()):
                    d = f.gen.next_deadline()
                    if d is not None and d <= now:
                        self.feed(f, Tick(now))
                if now >= next_hb:
                    next_hb = now + hb
                    for s in self.agents.connected():
                        silent = now - max(s.last_heard, listening_since)
                        if silent > 3 * hb:
                            self.disconnect(s, f"silent for {silent:.1f} s")
                        else:
                            s.heartbeat()
                deadlines = [d for f in self.flights.values() if (d := f.gen.next_deadline())]
                until = min([next_hb, *deadlines])
                self._wake.wait(timeout=max(0.0, until - self.clock()) + 0.001)
