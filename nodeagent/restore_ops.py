"""Restore glue between the control stream and the ptrace thread (issue 5).

The agent thread downloads a member's generation (`DownloadPages`, off the stream's
reader thread) into `RegionContents`; the ptrace thread fits frozen members to their
regions (`fit`, at a restore Freeze) and writes them back (nodeagent/restore.py). Only
explicit regions are restored in place: the whole-memory set also needs every thread's
registers at the cut, which manifests do not hold, so `check_fit` refuses it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cpcoord.errors import CpcoordError, InvalidArgument, RegionMismatch, RestoreRefused
from cpcoord.gen.v1 import agent_pb2, common_pb2
from cpcoord.pagedata import read_members
from cpcoord.ranges import PAGE_SIZE
from nodeagent.freeze import FrozenProcess
from nodeagent.membership import HeldMember
from nodeagent.restore import Fitted, MemberLayout, RegionContents, RegionLayout, RestoreStats
from nodeagent.restore import check_fit as _check_fit


def layout_of(m: HeldMember) -> MemberLayout:
    """The member's regions as a restore layout; the default set (no explicit regions)
    has no registers saved, so the fit check refuses it with the reason."""
    if m.regions is None:
        return MemberLayout(m.name, (), explicit=False, threads=None)
    regions = tuple(RegionLayout(r.name, r.start, r.end) for r in m.regions)
    return MemberLayout(m.name, regions, explicit=True)


def fit(m: HeldMember, fp: FrozenProcess) -> Fitted:
    return _check_fit(fp, layout_of(m))


def download(
    stub: Any, job: str, generation: int, member: str, timeout_s: float
) -> tuple[RegionContents, ...]:
    """Every region of the member at `generation`, pages not listed (or ZERO) as zeros."""
    req = agent_pb2.DownloadRequest(job=job, generation=generation, member=member)
    got = list(read_members(stub.DownloadPages(req, timeout=timeout_s)))
    if len(got) != 1 or got[0].name != member:
        raise InvalidArgument(f"DownloadPages for {member!r} sent {len(got)} members")
    mp = got[0]
    if mp.header.page_size != PAGE_SIZE:
        raise InvalidArgument(f"page size {mp.header.page_size}, this node has {PAGE_SIZE}")
    return tuple(
        RegionContents(r.name, r.start, r.end, np.asarray(r.pages, dtype=np.uint64), r.data)
        for r in mp.regions
    )


def restored(
    job: str, generation: int, member: str, st: RestoreStats, frozen_s: float
) -> agent_pb2.AgentMessage:
    stats = common_pb2.MemberStats(
        pages=st.data_pages,
        bytes_logical=st.bytes_written,
        frozen_seconds=frozen_s,
        full=True,
    )
    r = agent_pb2.Restored(job=job, generation=generation, member=member, stats=stats)
    return agent_pb2.AgentMessage(restored=r)


def fit_error(e: CpcoordError) -> bool:
    """Whether the error is a misfit (Failed MISMATCH) rather than a failure."""
    return isinstance(e, RegionMismatch | RestoreRefused)
