"""Members of a process tree on the coordinator (docs/decisions.md, "Process trees").

`cpcoord attach --tree` attaches a root member whose agent also holds every descendant
of its process as member `<root>.<pid>` of the same group (the root's name). The agent
reports descendants it finds (at the attach, before answering it, and at each Freeze) in
a TreeMembers event: they are recorded here as members of the job, captured from the
next generation on. A descendant whose process exits is dropped (detached: the
generations that hold it keep it) instead of being marked gone, so that a tree whose
children come and go keeps checkpointing; a root that exits is gone like any member.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from coordinator.membership import MemberRec, check_regions
from cpcoord.errors import CpcoordError
from cpcoord.gen.v1 import agent_pb2
from cpcoord.log import log_event

if TYPE_CHECKING:
    from coordinator.agents import AgentSession
    from coordinator.engine_view import EngineView

log = logging.getLogger("cpcoord.coordinator.members")


def is_descendant(rec: MemberRec) -> bool:
    """A member of a tree group other than its root."""
    return bool(rec.group) and rec.group != rec.name


def joined(engine: EngineView, s: AgentSession, msg: agent_pb2.TreeMembers) -> None:
    """Record the descendants an agent found (TreeMembers); known ones are left alone."""
    added = []
    with engine.lock:
        root = engine.members.get(msg.job, msg.group)
        if root is not None and (root.node != s.node or root.group != msg.group):
            log_event(log, logging.WARNING, "tree members refused", node=s.node, job=msg.job)
            return
        for m in msg.joined:
            if engine.members.get(msg.job, m.name) is not None:
                continue
            try:
                regions = check_regions([(r.name, r.start, r.end) for r in m.regions])
                rec = MemberRec(
                    msg.job,
                    m.name,
                    s.node,
                    m.process.pid,
                    m.process.start_time,
                    regions,
                    msg.tracker,
                    group=msg.group,
                )
                engine.members.add(rec)
            except CpcoordError as e:
                log_event(log, logging.WARNING, "tree member refused", member=m.name, why=str(e))
                continue
            added.append(m.name)
    for name in added:
        log_event(
            log,
            logging.INFO,
            "member attached",
            job=msg.job,
            member=name,
            node=s.node,
            group=msg.group,
        )
        engine.events.publish("member_attached", job=msg.job, member=name, node=s.node)


def drop(engine: EngineView, rec: MemberRec, detail: str) -> None:
    """A descendant's process exited: forget it here and on its agent (under the lock
    of the caller or not: the agent is told without waiting for an answer)."""
    with engine.lock:
        if engine.members.get(rec.job, rec.name) is None:
            return
        engine.members.remove(rec.job, rec.name)
        s = engine.agents.current(rec.node)
    if s is not None:  # send() drops it on a closed stream: forgotten at the reconnect
        s.send(detach_member=agent_pb2.DetachMember(job=rec.job, member=rec.name))
    log_event(log, logging.INFO, "tree member dropped", job=rec.job, member=rec.name, why=detail)
    engine.events.publish("member_detached", job=rec.job, member=rec.name, node=rec.node)
