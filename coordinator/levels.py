"""The engine's side of durability levels (docs/multilevel.md): what a node must still
drain (told at every Welcome), the agents' Drained reports (checked off the stream's
handler thread, answered with DrainResult), what a rise to `store` publishes
(Watch `generation_level`, metrics), and its share of a node cache lost (holders told
to take over its drain, lost generations published: the whole step, at connect or at
`forget NODE`, is coordinator/nodeloss.py).

A Drained report reads packs back from the store (nodepacks.check), so it runs on a
thread of its own, one at a time: the agent's other messages (Frozen, Uploaded) never
wait behind a drain check, and the drain is a background activity anyway.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coordinator.flight import Summary
from coordinator.generations import summarize
from coordinator.store import nodepacks
from coordinator.store import partners as store_partners
from cpcoord.errors import CpcoordError
from cpcoord.faults import fault_point
from cpcoord.gen.v1 import agent_pb2
from cpcoord.log import log_event

if TYPE_CHECKING:
    from coordinator.agents import AgentSession
    from coordinator.engine_view import EngineView

log = logging.getLogger("cpcoord.levels")
_POOL = ThreadPoolExecutor(1, thread_name_prefix="drain-check")


@dataclass
class DrainStats:
    """Counters since the coordinator started (thread-safe): stored bytes of drained
    packs taken, and drain reports refused, per node."""

    bytes: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, node: str, nbytes: int, failed: bool) -> None:
        with self._lock:
            self.bytes[node] = self.bytes.get(node, 0) + nbytes
            if failed:
                self.failures[node] = self.failures.get(node, 0) + 1

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        with self._lock:
            return dict(self.bytes), dict(self.failures)


STATS = DrainStats()


def drain_items(engine: EngineView, node: str) -> list[agent_pb2.DrainItem]:
    """The node's cached packs the store still lacks, oldest generation first."""
    with engine.repo.lock:
        items = engine.repo.cached.drain_items(node, taken_over=True)
    return [agent_pb2.DrainItem(job=j, generation=g, packs=names) for j, g, names in items]


def take_over(engine: EngineView) -> None:
    """After an owner's cache was found lost with packs a holder now drains in its
    place (Lost.handed; under the engine's lock): the connected holders that drain
    them are told at once."""
    for s in engine.agents.connected():
        with engine.repo.lock:
            cached = engine.repo.cached
            items = [
                (j, g, todo) for j, g, names in cached.drain_items(s.node, taken_over=True)
                if (todo := [n for n in names if cached.drains_for(cached.packs[n], s.node)])
            ]  # fmt: skip
        if items:
            s.send(take_over_drain=agent_pb2.TakeOverDrain(items=[
                agent_pb2.DrainItem(job=j, generation=g, packs=n) for j, g, n in items
            ]))  # fmt: skip
            packs = sum(len(n) for _, _, n in items)
            log_event(log, logging.INFO, "drain taken over", node=s.node, packs=packs)


def published(engine: EngineView, node: str, keys: list[tuple[str, int]]) -> list[Summary]:
    """Log and publish (Watch `generation_lost`) each generation lost with `node`'s cache."""
    out = []
    for job, gen in keys:
        log_event(
            log, logging.WARNING, "generation lost with a node cache", node=node,
            job=job, generation=gen,
        )  # fmt: skip
        s = summarize(engine, job, gen)
        engine.events.publish(
            "generation_lost", job=job, generation=gen, node=node, detail=s.lost, payload=s
        )  # fmt: skip
        out.append(s)
    return out


def _release(engine: EngineView, held: dict[str, list[str]]) -> None:
    """Tell the holders of partner copies of drained packs that they may delete them."""
    by_holder: dict[str, list[str]] = {}
    for name, holders in held.items():
        for h in holders:
            by_holder.setdefault(h, []).append(name)
    for node, names in sorted(by_holder.items()):
        with engine.lock:
            holder = engine.agents.current(node)
        if holder is not None:
            holder.send(partner_release=agent_pb2.PartnerRelease(packs=names))


def submit(fn: Callable[..., None], *args: object) -> None:
    """Run on the drain-check thread (partner reports share it: partners.py)."""
    _POOL.submit(fn, *args)


def drained(engine: EngineView, s: AgentSession, msg: agent_pb2.Drained) -> None:
    """An agent's Drained report: checked and answered on the drain thread."""
    _POOL.submit(_take, engine, s, msg)


def _take(engine: EngineView, s: AgentSession, msg: agent_pb2.Drained) -> None:
    fault_point("coordinator.drain")  # tests: killed with drained packs not yet taken
    reports = [nodepacks.Report(p.name, p.size, p.ids) for p in msg.packs]
    nbytes = sum(r.size for r in reports)
    with engine.repo.lock:  # partner copies of these packs may go once they are taken
        copies = engine.repo.cached.copies
        held = {r.name: list(copies.get(r.name, {})) for r in reports}
    try:
        if msg.missing:
            log_event(
                log, logging.WARNING, "a node lost cached packs", node=s.node, job=msg.job,
                generation=msg.generation, packs=len(msg.missing),
            )  # fmt: skip
        raised = engine.repo.take_drained(s.node, reports)
    except CpcoordError as e:
        STATS.add(s.node, 0, True)
        log_event(
            log, logging.WARNING, "drained packs refused", node=s.node, job=msg.job,
            generation=msg.generation, why=str(e),
        )  # fmt: skip
        s.send(drain_result=agent_pb2.DrainResult(
            job=msg.job, generation=msg.generation, ok=False, detail=str(e)
        ))  # fmt: skip
        return
    except Exception as e:  # a bug must not kill the drain thread; the agent retries later
        log.exception("drain check failed")
        s.send(drain_result=agent_pb2.DrainResult(
            job=msg.job, generation=msg.generation, ok=False, detail=f"internal: {e}"
        ))  # fmt: skip
        return
    STATS.add(s.node, nbytes, False)
    s.send(drain_result=agent_pb2.DrainResult(job=msg.job, generation=msg.generation, ok=True))
    _release(engine, held)
    # A pack drained needs no copy: a generation may be covered now (level `partner`).
    raised = raised + store_partners.relevel_all(engine.repo)
    for info in raised:
        engine.events.publish(
            "generation_level", job=info.job, generation=info.number,
            payload=summarize(engine, info.job, info.number, info=info),
        )  # fmt: skip
