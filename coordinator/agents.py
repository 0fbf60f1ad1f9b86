"""Connected agents: one session per control stream, keyed by node name.

A session is the coordinator's end of one `Attach` stream: what the agent said in its
Hello, an outbound queue the stream's writer drains (a waker tells an event loop that
something was queued, so no thread waits on it), the command ids it hands out, and the
waiters of commands answered by a CommandResult. The registry maps a
node to its *current* session; a session that ends is compared by identity, so the end
of a stale stream never removes the session of a newer one.

No gRPC here beyond the generated message types: servicers move messages between the
stream and the session.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cpcoord.errors import AgentTimeout, AgentUnavailable
from cpcoord.gen.v1 import agent_pb2
from cpcoord.grpcutil import from_error_detail


@dataclass
class _Waiter:
    done: threading.Event = field(default_factory=threading.Event)
    result: agent_pb2.CommandResult | None = None


class AgentSession:
    """The coordinator's end of one agent control stream."""

    def __init__(self, hello: agent_pb2.Hello, peer: str, clock: Any = time.monotonic) -> None:
        self.node = hello.node
        self.hello = hello
        self.peer = peer
        self.connected_ms = int(time.time() * 1000)
        self._clock = clock
        self.last_heard = clock()
        self.alive = True
        self.ready = False  # its members are reconciled (re-attached after a restart)
        self.partner: tuple[str, str] = ("", "")  # (node, address) it was last told
        self.senders: tuple[str, ...] = ()  # the nodes it was last told to take copies of
        self.closed_detail = ""
        self._out: queue.SimpleQueue[agent_pb2.CoordinatorMessage | None] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._heartbeats = itertools.count(1)
        # Called (from any thread) after a message or the end is queued; the stream's
        # writer sets it (e.g. loop.call_soon_threadsafe(event.set)). Must not block.
        self.waker: Callable[[], None] | None = None

    # -- outbound --------------------------------------------------------------------

    def send(self, **body: Any) -> int:
        """Queue one command (`freeze=Freeze(...)` etc.); returns its command id. A
        closed session drops it: the stream is gone, the engine has been told."""
        with self._lock:
            cid = next(self._ids)
            if self.alive:
                self._out.put(agent_pb2.CoordinatorMessage(command_id=cid, **body))
        self._wake()
        return cid

    def _wake(self) -> None:
        w = self.waker
        if w is not None:
            w()

    def heartbeat(self) -> None:
        self.send(
            heartbeat=agent_pb2.Heartbeat(
                sequence=next(self._heartbeats), sent_unix_ms=int(time.time() * 1000)
            )
        )

    def request(self, what: str, timeout: float, **body: Any) -> agent_pb2.CommandResult:
        """Send a command answered by a CommandResult and wait for it (not under the
        engine lock). Raises AgentUnavailable if the stream ends, AgentTimeout."""
        w = _Waiter()
        with self._lock:
            if not self.alive:
                raise AgentUnavailable(self.node)
            cid = next(self._ids)
            self._waiters[cid] = w
            self._out.put(agent_pb2.CoordinatorMessage(command_id=cid, **body))
        self._wake()
        if not w.done.wait(timeout):
            with self._lock:
                self._waiters.pop(cid, None)
            raise AgentTimeout(self.node, what, timeout)
        if w.result is None:
            raise AgentUnavailable(self.node)
        return w.result

    def ask(self, what: str, timeout: float, **body: Any) -> agent_pb2.CommandResult:
        """`request`, with the agent's refusal (CommandResult.error) raised as the
        CpcoordError it names."""
        res = self.request(what, timeout, **body)
        if res.HasField("error"):
            e = res.error
            raise from_error_detail(e.error, e.message, e.status)
        return res

    def next_outbound(self) -> agent_pb2.CoordinatorMessage | None:
        """For the stream's response generator: the next message; None once closed
        (close() always queues the None, so this never blocks forever)."""
        return self._out.get()

    def drain(self) -> list[agent_pb2.CoordinatorMessage | None]:
        """Everything queued so far, without waiting (a None ends the list: closed)."""
        out: list[agent_pb2.CoordinatorMessage | None] = []
        while True:
            try:
                m = self._out.get_nowait()
            except queue.Empty:
                return out
            out.append(m)
            if m is None:
                return out

    # -- inbound ---------------------------------------------------------------------

    def heard(self) -> None:
        self.last_heard = self._clock()

    def silent_for(self) -> float:
        return float(self._clock() - self.last_heard)

    def deliver(self, result: agent_pb2.CommandResult) -> bool:
        """A CommandResult arrived; False if nobody waits for it (late or unknown)."""
        with self._lock:
            w = self._waiters.pop(result.command_id, None)
        if w is None:
            return False
        w.result = result
        w.done.set()
        return True

    def close(self, detail: str) -> None:
        """The stream is over: wake the response generator and every waiter."""
        with self._lock:
            if not self.alive:
                return
            self.alive = False
            self.closed_detail = detail
            waiters, self._waiters = self._waiters, {}
            self._out.put(None)
        for w in waiters.values():
            w.done.set()
        self._wake()


@dataclass
class AgentRecord:
    """What ListAgents shows of a node, connected or not."""

    session: AgentSession
    disconnected_ms: int = 0


class Registry:
    """Node -> current session (and the last one of nodes now disconnected)."""

    def __init__(self) -> None:
        self._nodes: dict[str, AgentRecord] = {}

    def current(self, node: str) -> AgentSession | None:
        rec = self._nodes.get(node)
        return rec.session if rec is not None and rec.session.alive else None

    def require(self, node: str) -> AgentSession:
        s = self.current(node)
        if s is None:
            raise AgentUnavailable(node)
        return s

    def add(self, session: AgentSession) -> None:
        self._nodes[session.node] = AgentRecord(session)

    def drop(self, session: AgentSession) -> bool:
        """Mark the node disconnected if `session` is its current one."""
        rec = self._nodes.get(session.node)
        if rec is None or rec.session is not session or rec.disconnected_ms:
            return False
        rec.disconnected_ms = int(time.time() * 1000)
        return True

    def connected(self) -> list[AgentSession]:
        return [r.session for _, r in sorted(self._nodes.items()) if r.session.alive]

    def records(self) -> list[AgentRecord]:
        return [r for _, r in sorted(self._nodes.items())]
