"""The agent's restore prefetch, pure parts (nodeagent/daemon/prefetch.py): what is kept
until the Restore and freed on Abort or a new session, and the scope a Prepare asks for."""

from __future__ import annotations

import numpy as np

from cpcoord.gen.v1 import agent_pb2, types_pb2
from nodeagent.daemon import prefetch

START = 0x7F0000000000


def _pf(gen: int, member: str, epoch: int = 1) -> prefetch.Prefetched:
    return prefetch.Prefetched("j", gen, member, epoch, (), None, 0, 0)


def test_kept_until_taken_and_freed_by_abort_or_a_new_session() -> None:
    ps = prefetch.Prefetches()
    ps.put(_pf(3, "a"))
    ps.put(_pf(3, "b"))
    ps.put(_pf(4, "a"))
    assert ps.take("j", 3, "a", epoch=1) is not None
    assert ps.take("j", 3, "a", epoch=1) is None  # taken once
    ps.drop("j", 3)  # the Abort of generation 3
    assert ps.take("j", 3, "b", epoch=1) is None and len(ps) == 1
    ps.drop_stale(2)  # a new session
    assert len(ps) == 0
    ps.put(_pf(5, "a", epoch=1))
    assert ps.take("j", 5, "a", epoch=2) is None  # an older session's: not used


def test_scope_is_the_differing_pages_and_those_written_since() -> None:
    pm = agent_pb2.PrepareMember(
        member="m",
        base_generation=7,
        differs=[
            types_pb2.Region(
                name="r",
                start=START,
                end=START + 16 * 4096,
                pages=[types_pb2.PageRun(offset=2, count=3)],
            ),
            types_pb2.Region(name="q", start=START + 32 * 4096, end=START + 40 * 4096),
        ],
    )
    base_page = START >> 12
    dirty = np.array(
        [base_page + 3, base_page + 9, base_page + 33, base_page + 50], dtype=np.uint64
    )
    scope = prefetch.scope_of(pm, dirty)
    assert scope is not None
    assert scope["r"].tolist() == [2, 3, 4, 9] and scope["q"].tolist() == [1]
    assert prefetch.scope_of(pm, None) is None  # no tracker answer: every page
    assert prefetch.scope_of(agent_pb2.PrepareMember(member="m"), dirty) is None  # no base
    runs = {r.name: [(p.offset, p.count) for p in r.pages] for r in prefetch.page_filter(scope)}
    assert runs == {"r": [(2, 3), (9, 1)], "q": [(1, 1)]}
