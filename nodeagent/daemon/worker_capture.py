"""The ptrace thread's Capture step (run by nodeagent/daemon/worker.py on its thread, on its
`WorkerState`).

The cut is taken (every member is frozen); members are copied one after the other, each
thawed as soon as its copy is staged and its tracker re-armed (nodeagent/daemon/tracking.py).
A whole-memory member's registers are saved first, while frozen, and go out with its
Staged (restore_ops.py). Leases and held threads are looked after between members, so a
thaw is late by at most one member's copy. Uploads start only after the last member of
the Capture is thawed (`on_staged`), so they never slow a copy. Members of a tree group
(nodeagent/daemon/tree.py) are thawed together after the last of them is copied, each
storing only the shared objects it owns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cpcoord import faults
from cpcoord.errors import AgentStepFailed, CpcoordError, NotFrozen, UnknownMember
from cpcoord.gen.v1 import agent_pb2, common_pb2
from cpcoord.ranges import PAGE_SIZE
from nodeagent.daemon import restore_ops, tracking, tree
from nodeagent.daemon.membership import HeldMember
from nodeagent.daemon.worker_kstate import cut_kernel
from nodeagent.daemon.worker_ops import CaptureOp, FrozenEntry, R, member_gone
from nodeagent.daemon.worker_state import STAGE_FAILED, WorkerState
from nodeagent.proc import tracees
from nodeagent.proc.reader import ReadvFn
from nodeagent.upload.stream import StagedMember

log = logging.getLogger(__name__)
OnStaged = Callable[[list[StagedMember], int], None]


def capture(st: WorkerState, op: CaptureOp, readv: ReadvFn, on_staged: OnStaged) -> None:
    cut_ns = time.time_ns()
    staged: list[StagedMember] = []
    wanted = st.lookup(op.job, op.members)
    # Tree groups: one member stores each shared object, and no member of a group runs
    # again before all of them are copied (nodeagent/daemon/tree.py).
    grouped = [m for m in wanted if not isinstance(m, str) and m.group and m.key in st.frozen]
    tree.own(grouped)
    try:
        _capture_all(st, op, wanted, cut_ns, readv, staged)
    finally:
        tree.release(grouped)
        for m in grouped:
            fe = st.frozen.get(m.key)
            if fe is not None and (fe.job, fe.generation) == (op.job, op.generation):
                st.thaw(m.key)
        for key, fe in list(st.frozen.items()):  # descendants frozen with their group
            if fe.passenger and (fe.job, fe.generation) == (op.job, op.generation):
                st.thaw(key)
    if staged:
        on_staged(staged, op.epoch)


def _capture_all(
    st: WorkerState,
    op: CaptureOp,
    wanted: list[HeldMember | str],
    cut_ns: int,
    readv: ReadvFn,
    staged: list[StagedMember],
) -> None:
    for m in wanted:
        if st.aborted(op.job, op.generation):
            break  # the queued AbortOp thaws the rest
        st.enforce_leases()
        tracees.poll()
        if isinstance(m, str):
            err: CpcoordError = UnknownMember(op.job, m, f"on node {st.config.node}")
            st.fail(op.job, op.generation, m, R.ABORT_REASON_CAPTURE_FAILED, err, op.epoch)
            continue
        fe = st.frozen.get(m.key)
        if fe is None or (fe.job, fe.generation) != (op.job, op.generation):
            if not m.alive:
                st.emit(member_gone(m), op.epoch)
                continue
            err = NotFrozen(m.name, op.job, op.generation, "no Freeze, or its lease expired")
            st.fail(op.job, op.generation, m.name, R.ABORT_REASON_CAPTURE_FAILED, err, op.epoch)
            continue
        sm = _capture_member(st, op, m, fe, cut_ns, readv)
        if sm is not None:
            staged.append(sm)


def _capture_member(
    st: WorkerState,
    op: CaptureOp,
    m: HeldMember,
    fe: FrozenEntry,
    cut_ns: int,
    readv: ReadvFn,
) -> StagedMember | None:
    t_copy = time.monotonic()  # the member's own copy and thaw, barrier wait excluded
    staging = st.staging(m)
    try:
        try:
            # Registers first, before a tracker injects anything: the cut's.
            threads = restore_ops.cut_threads(m, fe.fp)
            kernel = cut_kernel(m, fe.fp.pid)
            c = tracking.capture_frozen(m, fe.fp, op.generation, op.full, staging, readv)
            faults.fault_point("agent.capture")
        finally:
            if not m.group:  # a group thaws together after its last copy (capture)
                st.thaw(m.key)
        c.settle()  # pre-copied rows into the cut's order: local memory, after the thaw
    except STAGE_FAILED:
        st.mark_gone(m, op.epoch)
        return None
    except CpcoordError as e:
        st.fail(op.job, op.generation, m.name, R.ABORT_REASON_CAPTURE_FAILED, e, op.epoch)
        return None
    except Exception as e:  # a bug: this member fails, the others are still captured
        log.exception("capture step failed", extra={"fields": {"member": m.name}})
        err = AgentStepFailed.of(f"capture {m.name}", e)
        st.fail(op.job, op.generation, m.name, R.ABORT_REASON_CAPTURE_FAILED, err, op.epoch)
        return None
    frozen_s = time.monotonic() - fe.started
    copy_s = time.monotonic() - t_copy
    stats = common_pb2.MemberStats(
        pages=c.result.pages,
        bytes_logical=c.result.pages * PAGE_SIZE,
        frozen_seconds=frozen_s,
        tracker=c.tracker,
        full=c.full,
    )
    if c.precopy is not None:
        stats.precopy_rounds = c.precopy.rounds
        stats.precopy_bytes.extend(p.nbytes for p in c.precopy.passes)
        stats.precopy_frozen_pages = c.precopy.frozen_pages
        st.metrics.observe_precopy(c.precopy)
    regs, starts = restore_ops.staged_threads(m.name, threads)
    staged = agent_pb2.Staged(
        job=op.job,
        generation=op.generation,
        member=m.name,
        stats=stats,
        threads=regs,
        thread_start_times=starts,
    )
    if kernel is not None:
        staged.kernel.CopyFrom(kernel)
    st.emit(agent_pb2.AgentMessage(staged=staged), op.epoch)
    log.info(
        "staged",
        extra={
            "fields": {
                "job": op.job,
                "generation": op.generation,
                "member": m.name,
                "pages": c.result.pages,
                "full": c.full,
                "tracker": c.tracker,
                "frozen_ms": round(frozen_s * 1e3, 3),
                "copy_ms": round(copy_s * 1e3, 3),
                "precopy_rounds": c.precopy.rounds if c.precopy is not None else 0,
            }
        },
    )
    node = st.config.node
    return tracking.handoff(
        m, staging, c, op.job, op.generation, node, cut_ns, frozen_s, st.metrics
    )
