"""What a coordinator process serves right now: its engine, or "not the leader".

A single coordinator serves one engine for its whole life. A replica of a highly
available set (coordinator/ha/) serves an engine only while it leads: it sets one when it
takes over the store and clears it when it steps down. Every RPC asks `engine()` (or
`servicers()`) first, so a follower answers each call with `NotLeader` naming the
leader it knows, and a call never reaches an engine of an ended term.

No gRPC here: the servicers and the aio server (coordinator/aioserver.py) translate.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from cpcoord.errors import NotLeader

if TYPE_CHECKING:
    from coordinator.engine import Engine
    from coordinator.servicers import AgentControl, CoordinatorService


class Serving:
    def __init__(self, engine: Engine | None = None, leader: str = "") -> None:
        self._lock = threading.Lock()
        self._engine = engine
        self._leader = leader
        self._servicers: tuple[AgentControl, CoordinatorService] | None = None
        # Called with True when an engine is set, False when it is cleared (health).
        self.on_change: list[Callable[[bool], None]] = []

    def engine(self) -> Engine:
        """The engine to serve with; NotLeader (with the known leader) when none."""
        with self._lock:
            if self._engine is None:
                raise NotLeader(self._leader or "unknown")
            return self._engine

    def servicers(self) -> tuple[AgentControl, CoordinatorService]:
        """The thread-pool servicers of the current engine (made once per engine)."""
        from coordinator.servicers import AgentControl, CoordinatorService

        with self._lock:
            if self._engine is None:
                raise NotLeader(self._leader or "unknown")
            if self._servicers is None:
                e = self._engine
                self._servicers = (AgentControl(e), CoordinatorService(e))
            return self._servicers

    @property
    def leader(self) -> str:
        with self._lock:
            return self._leader

    @property
    def active(self) -> bool:
        with self._lock:
            return self._engine is not None

    def set_engine(self, engine: Engine | None, leader: str = "") -> None:
        """Serve `engine` from now on (None: refuse every call with NotLeader(leader))."""
        with self._lock:
            self._engine = engine
            self._servicers = None
            self._leader = leader
        for hook in list(self.on_change):
            hook(engine is not None)

    def set_leader(self, leader: str) -> None:
        """The leader a follower names in NotLeader ("" while an election runs)."""
        with self._lock:
            self._leader = leader
