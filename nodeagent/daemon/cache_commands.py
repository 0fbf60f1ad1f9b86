"""The node cache's share of the coordinator's commands (docs/multilevel.md): a
generation committed or aborted (its cached packs go to the drain and to the partner,
or away), the drain's answers, the partner's changes, copies released and drains taken
over. The agent's control stream (nodeagent/daemon/agent.py) hands every command here
first; what is consumed here goes no further.
"""

from __future__ import annotations

from cpcoord.gen.v1 import agent_pb2
from nodeagent.cache.drain import Drainer
from nodeagent.cache.store import NodeCache
from nodeagent.daemon.partner_link import PartnerLink

CONSUMED = frozenset({"drain_result", "partner_changed", "partner_release", "take_over_drain"})


def handle(
    msg: agent_pb2.CoordinatorMessage,
    cache: NodeCache | None,
    drainer: Drainer | None,
    partners: PartnerLink,
) -> bool:
    """Act on `msg`; True when it is consumed here (committed and abort go on to the
    worker as well)."""
    body = msg.WhichOneof("body")
    if body == "drain_result" and drainer is not None:
        drainer.result(msg.drain_result)
    elif body == "partner_changed":
        partners.changed(msg.partner_changed)
    elif body == "partner_release":
        partners.release(msg.partner_release.packs)
    elif body == "take_over_drain" and drainer is not None:
        for i in msg.take_over_drain.items:
            drainer.want(i.job, i.generation, list(i.packs))
    elif cache is not None and drainer is not None:
        if body == "committed":
            c = msg.committed
            names = cache.committed(c.job, c.generation)
            drainer.want(c.job, c.generation, names)
            partners.committed(c.job, c.generation, names)
        elif body == "abort":
            cache.aborted(msg.abort.job, msg.abort.generation)
    return body in CONSUMED
