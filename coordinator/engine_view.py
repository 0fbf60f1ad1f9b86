"""What the engine's helper modules may use of the engine: a narrow, structural view.

The engine (engine.py) drives the protocol cores; its helpers (commit.py,
generations.py, restore.py, members_ops.py, agent_events.py, ingest.py) act on its
state under its lock. They take an `EngineView`, never the Engine class, so the import
graph runs one way: engine -> helpers -> engine_view. `Options` lives here because the
helpers read it and the engine is built with it (engine.py re-exports it).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from coordinator.agents import Registry
from coordinator.events import EventBus
from coordinator.flight import Flight, RunStats, Subscription
from coordinator.membership import Membership
from coordinator.protocol.messages import Event
from coordinator.store import Repository
from cpcoord.grpcopts import MAX_MESSAGE_BYTES
from cpcoord.ranges import PAGE_SIZE

if TYPE_CHECKING:
    from coordinator.dataplane import DataPlaneStats


@dataclass(frozen=True)
class Options:
    keep: int = 5  # committed generations kept per job, plus pinned ones
    heartbeat_s: float = 1.0  # agents are lost after 3 silent intervals
    command_timeout_s: float = 15.0  # AttachMember/DetachMember answers
    page_size: int = PAGE_SIZE
    max_message_bytes: int = MAX_MESSAGE_BYTES  # the transport's limit, both ways
    # Told to agents as Welcome.max_message_bytes, so page batches stay small: messages
    # over 32 MiB come from a fresh mmap each time (glibc), and their page faults cost
    # 3-4x per byte here; 4-16 MiB messages pipeline and reuse memory (8 MiB measured best).
    agent_message_bytes: int = 8 << 20
    max_batch_entries: int = 65536
    # The data plane (coordinator/dataplane.py): announce the store to agents so they
    # may put packs themselves; send its data key only over mTLS (serve sets it).
    direct_data_path: bool = True
    send_store_key: bool = False


class EngineView(Protocol):
    """The engine's state (guarded by `lock`) and what helpers ask of it: begin a
    flight, feed a flight an event, wake the timer thread."""

    @property
    def repo(self) -> Repository: ...
    @property
    def opt(self) -> Options: ...
    @property
    def clock(self) -> Callable[[], float]: ...
    @property
    def lock(self) -> threading.RLock: ...
    @property
    def agents(self) -> Registry: ...
    @property
    def members(self) -> Membership: ...
    @property
    def flights(self) -> dict[str, Flight]: ...  # job -> its generation in flight
    @property
    def attaching(self) -> set[tuple[str, str]]: ...  # (job, member) being attached
    @property
    def recent(self) -> collections.OrderedDict[tuple[str, int], RunStats]: ...
    @property
    def events(self) -> EventBus: ...
    @property
    def dataplane(self) -> DataPlaneStats: ...
    @property
    def stopping(self) -> bool: ...  # close() was called: no agent may connect

    def feed(self, f: Flight, event: Event) -> None:
        """Queue an event for a flight and drain the queue (under the lock)."""

    def launch(self, f: Flight) -> Subscription:
        """Under the lock: `f` becomes its job's flight and begins."""

    def wake(self) -> None:
        """Wake the timer thread (a flight began or ended: its deadlines changed).
        Called under the lock."""
