"""The engine's side of partner copies (docs/multilevel.md, "Partner copies"): who is
whose partner, what a node owes its partner, and the holders' Partnered reports (the
ledger and the level rule are coordinator/store/cached.py and coordinator/store/
partners.py).

Pairing is by node name: among connected agents that have a cache (Hello.cache_id) and
a partner listener (Hello.partner_address), sorted by node, each node's partner is the
next one round the ring, never itself (a ring of one has none). A new agent learns its
partner in its Welcome; whenever the ring changes (an agent connects or goes) every
agent whose partner changed gets a PartnerChanged, with the packs it owes the new one.
Reports run on the drain-check thread (levels.py), one at a time with drain reports, so
the two never race over a generation's level.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from coordinator import levels
from coordinator.generations import summarize
from coordinator.store import partners as store_partners
from coordinator.store.catalog import GenerationInfo
from cpcoord.gen.v1 import agent_pb2
from cpcoord.log import log_event

if TYPE_CHECKING:
    from coordinator.agents import AgentSession
    from coordinator.engine_view import EngineView

log = logging.getLogger("cpcoord.partners")
NoPartner = ("", "")


def ring(hellos: Iterable[agent_pb2.Hello]) -> dict[str, tuple[str, str]]:
    """node -> (partner node, its address) for every agent that may take part."""
    able = sorted({h.node: h for h in hellos if h.cache_id and h.partner_address}.items())
    if len(able) < 2:
        return {}
    out = {}
    for i, (node, _) in enumerate(able):
        nxt = able[(i + 1) % len(able)][1]
        out[node] = (nxt.node, nxt.partner_address)
    return out


def senders(now: dict[str, tuple[str, str]], node: str) -> tuple[str, ...]:
    """The nodes whose partner `node` is (its predecessor round the ring)."""
    return tuple(sorted(n for n, (p, _) in now.items() if p == node))


def changed_for(
    engine: EngineView, node: str, partner: tuple[str, str], takes: tuple[str, ...] = ()
) -> agent_pb2.PartnerChanged:
    """The PartnerChanged for `node`: its partner and what it owes it (none without),
    and whose copies it takes."""
    pc = agent_pb2.PartnerChanged(node=partner[0], address=partner[1], senders=takes)
    if partner[0]:
        with engine.repo.lock:
            owed = store_partners.owed_to_partner(engine.repo.cached, node)
        pc.owed.extend(agent_pb2.DrainItem(job=j, generation=g, packs=n) for j, g, n in owed)
    return pc


def for_welcome(
    engine: EngineView, hello: agent_pb2.Hello
) -> tuple[tuple[str, str], tuple[str, ...]]:
    """The new agent's partner and senders, in the ring with it (under the engine's
    lock)."""
    hellos = [s.hello for s in engine.agents.connected() if s.node != hello.node]
    now = ring([*hellos, hello])
    return now.get(hello.node, NoPartner), senders(now, hello.node)


def rering(engine: EngineView) -> None:
    """After an agent came or went (under the engine's lock): tell every agent whose
    partner changed."""
    sessions = engine.agents.connected()
    now = ring(s.hello for s in sessions)
    for s in sessions:
        want, takes = now.get(s.node, NoPartner), senders(now, s.node)
        if (s.partner, s.senders) == (want, takes) or not s.hello.cache_id:
            continue
        s.partner, s.senders = want, takes
        s.send(partner_changed=changed_for(engine, s.node, want, takes))
        log_event(log, logging.INFO, "partner changed", node=s.node, partner=want[0] or "none")


def partnered(engine: EngineView, s: AgentSession, msg: agent_pb2.Partnered) -> None:
    """A holder's report: taken on the drain-check thread."""
    levels.submit(_take, engine, s, msg)


def _take(engine: EngineView, s: AgentSession, msg: agent_pb2.Partnered) -> None:
    try:
        changed, took = store_partners.take_partnered(
            engine.repo, s.node, s.hello.cache_id, msg.sender, msg.packs
        )
    except Exception:  # a bug must not kill the thread; the sender sends again later
        log.exception("partner report failed")
        return
    needless = sorted(set(msg.packs) - set(took))  # drained (or forgotten) meanwhile
    if needless:
        s.send(partner_release=agent_pb2.PartnerRelease(packs=needless))
    publish(engine, changed)


def publish(engine: EngineView, changed: list[GenerationInfo]) -> None:
    for info in changed:
        engine.events.publish(
            "generation_level", job=info.job, generation=info.number,
            payload=summarize(engine, info.job, info.number, info=info),
        )  # fmt: skip


def copies_lost(engine: EngineView) -> None:
    """After a node's cache was found lost (nodeloss.py): partner copies it held are
    gone; generations no longer covered fall back to `local`."""
    publish(engine, store_partners.relevel_all(engine.repo))
