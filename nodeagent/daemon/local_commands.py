"""Commands the agent gives its own ptrace thread on behalf of the local API (a
RestoreIntoOp for a local restore) and their results.

Such a command gets an id of its own range (never one the coordinator uses) and its
CommandResult is taken out of the agent's emit path here instead of going up the
control stream, whatever the stream's epoch.
"""

from __future__ import annotations

import itertools
import queue
import threading

from cpcoord.errors import LocalCommandTimeout
from cpcoord.gen.v1 import agent_pb2

# Command ids of local work; the coordinator's count up from 1 and never get this high.
LOCAL_COMMAND_BASE = 1 << 62


class LocalCommands:
    """Results of the agent's local commands: `new` an id, `deliver` every message the
    worker emits (True: it answered a local command), `wait` for the answer."""

    def __init__(self) -> None:
        self._ids = itertools.count(LOCAL_COMMAND_BASE)
        self._lock = threading.Lock()
        self._waiting: dict[int, queue.Queue[agent_pb2.CommandResult]] = {}

    def new(self) -> int:
        cid = next(self._ids)
        with self._lock:
            self._waiting[cid] = queue.Queue(maxsize=1)
        return cid

    def deliver(self, msg: agent_pb2.AgentMessage) -> bool:
        """True when `msg` answers a local command (then it is not sent anywhere)."""
        if msg.WhichOneof("body") != "result" or msg.result.command_id < LOCAL_COMMAND_BASE:
            return False
        with self._lock:
            q = self._waiting.get(msg.result.command_id)
        if q is not None:
            q.put_nowait(msg.result)
        return True

    def wait(self, cid: int, timeout: float) -> agent_pb2.CommandResult:
        with self._lock:
            q = self._waiting[cid]
        try:
            return q.get(timeout=timeout)
        except queue.Empty:
            raise LocalCommandTimeout(f"local command {cid}", f"{timeout:.0f}") from None
        finally:
            with self._lock:
                self._waiting.pop(cid, None)
