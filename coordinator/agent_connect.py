"""An agent's control stream coming and going, as the engine sees it (engine.py keeps
`connect`, `disconnect` and `welcome` as its entry points and calls these).

Owns: the checks of a Hello (node name, protocol version, page size, one stream per
node, none while stopping), what happens before the Welcome (the node's cache lost if
it changed: nodeloss.py; its partner and senders: partners.py), the Welcome itself
(limits, the store announcement of the direct data path, what the node owes the store
and its partner), and a disconnect: the ring of partners redrawn, watchers told, and
AgentLost fed to every flight.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from coordinator import levels, nodeloss, partners
from coordinator.agents import AgentSession
from coordinator.dataplane import announcement
from coordinator.protocol.messages import AgentLost
from cpcoord import __version__
from cpcoord.errors import AgentUnavailable, DuplicateAgent, IncompatibleAgent
from cpcoord.gen.v1 import agent_pb2
from cpcoord.log import log_event
from cpcoord.ranges import check_name

if TYPE_CHECKING:
    from coordinator.engine_view import EngineView

log = logging.getLogger("cpcoord.coordinator")

PROTOCOL_VERSION = 1


def welcome(
    engine: EngineView, node: str = "", partner: tuple[str, str] = ("", ""),
    takes: tuple[str, ...] = (),
) -> agent_pb2.Welcome:  # fmt: skip
    opt = engine.opt
    store: dict[str, object] = {}
    if opt.direct_data_path:
        store = announcement(engine.repo, opt.send_store_key)
        store["drain"] = levels.drain_items(engine, node) if node else []
        store["partner"] = partners.changed_for(engine, node, partner, takes)
    return agent_pb2.Welcome(
        version=__version__,
        protocol_version=PROTOCOL_VERSION,
        heartbeat_interval_ms=int(opt.heartbeat_s * 1000),
        max_message_bytes=min(opt.agent_message_bytes, opt.max_message_bytes),
        max_batch_entries=opt.max_batch_entries,
        **store,  # type: ignore[arg-type]
    )


def connect(engine: EngineView, hello: agent_pb2.Hello, peer: str) -> AgentSession:
    """Register a new control stream (its Welcome is queued first)."""
    check_name(hello.node)
    if hello.protocol_version < 1:
        raise IncompatibleAgent(hello.node, f"protocol version {hello.protocol_version}")
    if hello.page_size and hello.page_size != engine.opt.page_size:
        why = f"page size {hello.page_size}, the coordinator uses {engine.opt.page_size}"
        raise IncompatibleAgent(hello.node, why)
    with engine.lock:
        if engine.stopping:
            raise AgentUnavailable(hello.node)
        old = engine.agents.current(hello.node)
        if old is not None:
            raise DuplicateAgent(hello.node, f"connected from {old.peer}")
        s = AgentSession(hello, peer, engine.clock)
        nodeloss.connected(engine, hello)  # before the Welcome lists what it owes
        s.partner, s.senders = partners.for_welcome(engine, hello)
        s.send(welcome=welcome(engine, hello.node, s.partner, s.senders))
        engine.agents.add(s)
        partners.rering(engine)
    log_event(log, logging.INFO, "agent connected", node=hello.node, peer=peer)
    emit_watch(engine, "agent_connected", node=hello.node)
    return s


def disconnect(engine: EngineView, s: AgentSession, detail: str) -> None:
    """The stream is over (broken, ended, or silent): every generation in flight hears
    AgentLost; the node's pending work is forgotten."""
    with engine.lock:
        s.close(detail)
        if not engine.agents.drop(s):
            return
        partners.rering(engine)
        # Watchers hear the cause before its effects (the aborts it brings).
        emit_watch(engine, "agent_disconnected", node=s.node, detail=detail)
        for f in list(engine.flights.values()):
            engine.feed(f, AgentLost(s.node, detail or "stream ended"))
    log_event(log, logging.WARNING, "agent disconnected", node=s.node, detail=detail)


def emit_watch(engine: EngineView, kind: str, **fields: object) -> None:
    log_event(log, logging.DEBUG, "watch", kind=kind, **fields)
    engine.events.publish(kind, **fields)
