"""A node's cache lost, as one step (docs/multilevel.md, "Node loss"): its agent came
back with another cache (Hello.cache_id at connect), or an operator gave the node up
(`cpcoord forget NODE`). Either way: the ledger marks its packs (coordinator/store/
cached.py `lose`: owner-lost where a partner copy lives on, else gone with the
generations that needed them), the holders that now drain its copies are told
(levels.take_over, only when a pack was handed over), each lost generation is logged and
published, and partner copies it held are dropped, so generations they covered may fall
back to `local` (partners.copies_lost).

Its own module because it needs both levels.py and partners.py (partners.py imports
levels.py for the drain-check thread).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from coordinator import levels, partners
from coordinator.flight import Summary
from cpcoord.errors import NodeConnected
from cpcoord.log import log_event

if TYPE_CHECKING:
    from coordinator.engine_view import EngineView
    from coordinator.store.cached import Lost
    from cpcoord.gen.v1 import agent_pb2

log = logging.getLogger("cpcoord.levels")


def _lost(engine: EngineView, node: str, lost: Lost) -> list[Summary]:
    """What follows the ledger's `lose`, the same after a connect or a forget."""
    if lost.handed:
        levels.take_over(engine)
    out = levels.published(engine, node, lost.keys)
    if lost.copies or lost.handed or lost.keys:  # else no generation's level can move
        partners.copies_lost(engine)
    return out


def connected(engine: EngineView, hello: agent_pb2.Hello) -> None:
    """An agent said hello (under the engine's lock): if its node cache is not the one
    that holds its undrained packs, those are lost, and so is every generation that
    needed them (never `store`; restore takes an older one). Before its Welcome and
    before any of its uploads, so no new generation counts a lost chunk as present."""
    _lost(engine, hello.node, engine.repo.cache_seen(hello.node, hello.cache_id))


def forget(engine: EngineView, node: str) -> tuple[list[Summary], int]:
    """An operator's `cpcoord forget NODE`: the node is gone for good, with its cache.
    Its undrained packs are lost and so is every generation that needed them, as when
    it comes back with another cache, but packs with a partner copy stay and their
    holders drain them; refused while its agent is connected (it would drain them).
    Returns the lost generations and the number of packs."""
    if engine.agents.current(node) is not None:
        raise NodeConnected(node)
    lost = engine.repo.forget_node(node)
    log_event(
        log, logging.WARNING, "node forgotten", node=node, packs=lost.packs,
        lost=len(lost.keys), handed=lost.handed,
    )  # fmt: skip
    return _lost(engine, node, lost), lost.packs
