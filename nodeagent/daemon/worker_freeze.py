"""The ptrace thread's Freeze and restore steps (run by nodeagent/daemon/worker.py on its
thread, on its `WorkerState`).

Freeze: staging is sized and prefaulted while every member still runs, members that
will be captured in full are pre-copied when the Freeze asks (tracking.precopy_member,
all of them within its `precopy_ms`, so the coordinator's freeze deadline holds), then
the members are frozen one after the other; a Freeze whose generation is aborted
meanwhile stops.
A restore Freeze copies nothing out: a member with a large prefetched scope is first
backed up live (restore_live.py), then it checks each member fits the generation (Failed
MISMATCH for one that cannot take it back, then no Frozen) and keeps it frozen for the
Restore, which writes the downloaded pages (the member's idle capture staging takes the
backup of what is overwritten) and does not thaw. RestoreInto writes into a process
that is not frozen for a job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cpcoord import faults
from cpcoord.errors import (
    CpcoordError,
    FreezeFailed,
    KernelStateChanged,
    NotFrozen,
    RestoreRefused,
    UnknownMember,
)
from cpcoord.gen.v1 import agent_pb2
from nodeagent.capture import copyout
from nodeagent.daemon import prefetch, restore_live, restore_ops, tracking, tree
from nodeagent.daemon.membership import HeldMember
from nodeagent.daemon.worker_ops import (
    FreezeOp,
    FrozenEntry,
    PeekOp,
    R,
    RestoreIntoOp,
    RestoreOp,
    member_gone,
    process,
    result,
)
from nodeagent.daemon.worker_state import STAGE_FAILED, WorkerState
from nodeagent.pages import PageNumbers
from nodeagent.proc.freeze import freeze as freeze_process
from nodeagent.proc.procfs import ProcessIdentity
from nodeagent.restore import apply as restore
from nodeagent.restore.livebackup import LiveBackup

log = logging.getLogger(__name__)


def freeze(st: WorkerState, op: FreezeOp) -> None:
    t_op = time.monotonic()  # for the log: staging, then every member stopped
    lease_s = min(op.lease_ms / 1000 or st.config.lease_s, st.config.lease_s)
    targets: list[HeldMember] = []
    for m in st.lookup(op.job, op.members):
        if isinstance(m, str):
            err = UnknownMember(op.job, m, f"on node {st.config.node}")
            st.fail(op.job, op.generation, m, R.ABORT_REASON_FREEZE_FAILED, err, op.epoch)
        elif not m.alive:
            st.emit(member_gone(m), op.epoch)
        else:
            if st.thaw(m.key) is not None:  # left over from an older generation
                log.warning("thawed a stale freeze", extra={"fields": {"member": m.name}})
            targets.append(m)
    targets = _whole_groups(st, op, targets)
    # New descendants are members from the next generation; those of a group frozen now
    # are frozen with it (passengers), so that no process of the group runs while its
    # shared memory is copied or written back.
    groups = {m.group for m in targets if m.group}
    passengers = [m for m in tree.rescan(st, op.job, op.epoch) if m.group in groups]
    # Size and prefault staging while everything still runs.
    ready: list[HeldMember] = []
    lives = _live_backups(st, op, targets, lease_s) if op.restore else {}
    for m in targets:
        if op.restore:  # nothing is copied out: no staging
            ready.append(m)
            continue
        try:
            copyout.prepare(st.staging(m), m.ident.view("freeze"), m.regions)
            if op.precopy_s > 0:
                left = t_op + op.precopy_s - time.monotonic()
                st.enforce_leases()  # (other jobs' members may be frozen meanwhile)
                tracking.precopy_member(
                    m, op.generation, op.full, st.staging(m), left, st.config.freeze_timeout_s
                )
            ready.append(m)
        except STAGE_FAILED:
            st.mark_gone(m, op.epoch)
        except CpcoordError as e:
            st.fail(op.job, op.generation, m.name, R.ABORT_REASON_FREEZE_FAILED, e, op.epoch)
    try:
        _freeze_ready(st, op, ready, targets, lives, lease_s, t_op, passengers)
    finally:
        for live in lives.values():  # not handed to a frozen member
            restore_live.close(live)


def _live_backups(
    st: WorkerState, op: FreezeOp, targets: list[HeldMember], lease_s: float
) -> dict[str, LiveBackup]:
    """A restore Freeze: back up live what large rollbacks will overwrite (restore_live),
    within a quarter of the lease in all (the freeze deadline is half of it)."""
    out: dict[str, LiveBackup] = {}
    want = dict(op.live)
    t_end = time.monotonic() + lease_s / 4
    for m in targets:
        pages = want.get(m.name)
        left = t_end - time.monotonic()
        if pages is None or left <= 0:
            continue
        try:
            live = restore_live.before_freeze(m, pages, left, st.config.freeze_timeout_s)
        except (CpcoordError, OSError) as e:  # the freeze that follows meets it again, or not
            log.info("live backup skipped", extra={"fields": {"member": m.name, "error": str(e)}})
            continue
        if live is not None:
            out[m.name] = live
            faults.fault_point("agent.restore.live")  # tests write into it here
    return out


def _freeze_ready(
    st: WorkerState,
    op: FreezeOp,
    ready: list[HeldMember],
    targets: list[HeldMember],
    lives: dict[str, LiveBackup],
    lease_s: float,
    t_op: float,
    passengers: list[HeldMember],
) -> None:
    done: list[agent_pb2.FrozenMember] = []
    misfit = False  # restore: a member that cannot take the generation back
    lease_ms = int(lease_s * 1000)

    def aborted() -> bool:  # the Abort is queued behind us: stop freezing for it
        return st.aborted(op.job, op.generation)

    for m in ready:
        if aborted():
            return  # the queued AbortOp thaws those frozen already
        t0 = time.monotonic()
        try:
            fp = freeze_process(m.ident, min(st.config.freeze_timeout_s, lease_s), aborted)
        except STAGE_FAILED:
            st.mark_gone(m, op.epoch)
            continue
        except CpcoordError as e:
            log.warning("freeze failed", extra={"fields": {"member": m.name, "error": str(e)}})
            st.fail(op.job, op.generation, m.name, R.ABORT_REASON_FREEZE_FAILED, e, op.epoch)
            continue
        fe = FrozenEntry(op.job, op.generation, fp, t0, t0 + lease_s, lease_ms, op.epoch)
        fe.live = lives.pop(m.name, None)  # the entry owns it from here (thaw frees it)
        st.frozen[m.key] = fe
        if op.restore and not _fit(st, op, m, fe):
            misfit = True
        done.append(
            agent_pb2.FrozenMember(
                name=m.name,
                process=process(m),
                threads=len(fp.tids),
                freeze_seconds=time.monotonic() - t0,
            )
        )
    if not done or misfit:  # a misfit: Failed instead, all stay frozen until the Abort
        return
    for m in passengers:
        if aborted():
            return
        _freeze_passenger(st, op, m, lease_s, aborted)
    if len(done) == len(targets):
        faults.fault_point("agent.freeze")
    log.info(
        "frozen",
        extra={
            "fields": {
                "job": op.job,
                "generation": op.generation,
                "members": len(done),
                "ms": round((time.monotonic() - t_op) * 1e3, 3),
            }
        },
    )
    frozen_msg = agent_pb2.Frozen(job=op.job, generation=op.generation, members=done)
    st.emit(agent_pb2.AgentMessage(frozen=frozen_msg), op.epoch)


def _freeze_passenger(
    st: WorkerState, op: FreezeOp, m: HeldMember, lease_s: float, aborted: Callable[[], bool]
) -> None:
    """Freeze a descendant found at this Freeze with its group (not in the generation;
    thawed with the group's members). One that cannot be frozen would run under its
    group's cut: the group's generation fails (through its root) instead."""
    t0 = time.monotonic()
    try:
        fp = freeze_process(m.ident, min(st.config.freeze_timeout_s, lease_s), aborted)
    except STAGE_FAILED:
        st.mark_gone(m, op.epoch)  # exited: nothing of it runs
        return
    except CpcoordError as e:
        fields = {"member": m.name, "error": str(e)}
        log.warning("passenger freeze failed", extra={"fields": fields})
        st.fail(op.job, op.generation, m.group, R.ABORT_REASON_FREEZE_FAILED, e, op.epoch)
        return
    lease_ms = int(lease_s * 1000)
    fe = FrozenEntry(op.job, op.generation, fp, t0, t0 + lease_s, lease_ms, op.epoch)
    fe.passenger = True
    st.frozen[m.key] = fe
    log.info("passenger frozen", extra={"fields": {"member": m.name, "group": m.group}})


def _whole_groups(st: WorkerState, op: FreezeOp, targets: list[HeldMember]) -> list[HeldMember]:
    """A tree group is frozen whole or not at all (nodeagent/daemon/tree.py): the members
    of a group some of whose live members the Freeze leaves out fail instead."""
    parts = tree.split(st, op.job, targets)
    if not parts:
        return targets
    for m in targets:
        if m.group in parts:
            why = f"tree group {m.group} would be frozen in part (not: {', '.join(parts[m.group])})"
            err = FreezeFailed(m.ident.pid, why)
            st.fail(op.job, op.generation, m.name, R.ABORT_REASON_FREEZE_FAILED, err, op.epoch)
    return [m for m in targets if m.group not in parts]


def _fit(st: WorkerState, op: FreezeOp, m: HeldMember, fe: FrozenEntry) -> bool:
    try:
        fe.fitted = restore_ops.fit(m, fe.fp, op.layouts)
        return True
    except CpcoordError as e:
        mismatch = restore_ops.fit_error(e)
        reason = R.ABORT_REASON_MISMATCH if mismatch else R.ABORT_REASON_RESTORE_FAILED
        if isinstance(e, KernelStateChanged):  # its own reason: the CLI exits 146 for it
            reason = R.ABORT_REASON_KERNEL_STATE
        log.warning("restore refused", extra={"fields": {"member": m.name, "error": str(e)}})
        st.fail(op.job, op.generation, m.name, reason, e, op.epoch)
        return False


def restore_member(st: WorkerState, op: RestoreOp) -> None:
    """Write the generation into a member frozen (and fitted) for it; do not thaw."""
    if st.aborted(op.job, op.generation):
        return  # the queued AbortOp thaws it: nothing is written after an Abort
    m = st.members.get(op.job, op.member)
    fe = st.frozen.get((op.job, op.member))
    fitted = fe.fitted if fe is not None and fe.generation == op.generation else None
    err = op.error
    if m is None or fe is None or fitted is None or err is not None:
        why = "no restore Freeze for it, or its lease expired"
        err = err or NotFrozen(op.member, op.job, op.generation, why)
        st.fail(op.job, op.generation, op.member, R.ABORT_REASON_RESTORE_FAILED, err, op.epoch)
        return
    # The member's capture staging is idle during a restore (unless an upload still
    # reads it) and prefaulted: it takes the backup of what the restore overwrites.
    backup = m.staging if m.staging is not None and not m.staging_busy else None
    timeout = st.config.freeze_timeout_s
    contents, scope = op.contents, op.scope
    t_in = time.monotonic()  # the log splits the frozen time: before, top-up, write, after
    t_top = t_live = t_in
    live, fe.live = fe.live, None  # freed below, whatever happens
    had_live = live is not None  # its collect write-protected the scope again
    try:
        if scope is not None and op.fetch is not None:  # a partial write: top up, frozen
            seen: list[PageNumbers | None] = []
            contents, scope = prefetch.top_up(m, op.base, contents, scope, op.fetch, seen)
            t_live = time.monotonic()
            usable = scope is not None and restore_live.mark_stale(m, fe.fp, live, seen[0])
            if live is not None and not usable:
                restore_live.close(live)
                live = None
            t_top = time.monotonic()
        elif live is not None:
            restore_live.close(live)
            live = None
        unprotect = restore_live.Unprotect(m, fe.fp) if had_live else None
        try:
            written = restore.write(
                fitted, prefetch.with_scope(contents, scope), staging=backup, live=live,
                ahead=unprotect,
            )  # fmt: skip
        finally:
            if unprotect is not None:
                unprotect.close()
    except CpcoordError as e:
        if isinstance(e, STAGE_FAILED) or not m.ident.alive():
            st.mark_gone(m, op.epoch)
        else:  # put back (RestoreUndone), still the tracker saw writes: start afresh
            tracking.after_restore(m, fe.fp, timeout)
        st.fail(op.job, op.generation, op.member, R.ABORT_REASON_RESTORE_FAILED, e, op.epoch)
        return
    finally:
        restore_live.close(live)
    t_written = time.monotonic()
    kept = scope is not None
    if kept:  # the tracker stays armed, relative to its base; what was written counts
        prefetch.after_partial(m, prefetch.with_scope(contents, scope))
    else:
        tracking.after_restore(m, fe.fp, timeout)
    now = time.monotonic()
    frozen_s = now - fe.started
    phases = {
        "member": m.name,
        "generation": op.generation,
        "frozen_ms": round(frozen_s * 1e3, 3),
        "before_ms": round((t_in - fe.started) * 1e3, 3),  # freeze, fit, the round trip
        "top_up_ms": round((t_top - t_in) * 1e3, 3),
        "live_ms": round((t_top - t_live) * 1e3, 3),  # of which: the live backup's checks
        "write_ms": round((t_written - t_top) * 1e3, 3),
        "after_ms": round((now - t_written) * 1e3, 3),  # the tracker, re-armed or kept
        "bytes": written.bytes_written,
        "backup_bytes": written.backup_bytes,
        "backup_live_bytes": written.backup_live_bytes,
    }
    log.info("restore written", extra={"fields": phases})
    msg = restore_ops.restored(
        op.job, op.generation, op.member, written, frozen_s, op.prefetched, kept, op.read_path,
        fitted.kernel_warnings,
    )  # fmt: skip
    st.emit(msg, op.epoch)


def peek(st: WorkerState, op: PeekOp) -> None:
    """A restore's prefetch asks which pages may differ from the member's base."""
    m = st.members.get(op.job, op.member)
    got = None
    if m is not None and m.alive:
        try:
            got = prefetch.written_since_base(m, op.base)
        except (CpcoordError, OSError) as e:
            fields = {"member": op.member, "error": str(e)}
            log.info("restore peek failed: every page is written", extra={"fields": fields})
    op.reply(got)


def restore_into(st: WorkerState, op: RestoreIntoOp) -> None:
    err = op.error
    if err is None:
        try:
            ident = op.target
            if isinstance(ident, int):
                ident = ProcessIdentity.of(ident)
            if ident.pid in {fe.fp.ident.pid for fe in st.frozen.values()}:
                raise RestoreRefused(op.member, f"process {ident.pid} is frozen for a job")
            now = {n: (a, size) for n, a, size in op.regions_now} or {
                c.name: (c.start, c.size) for c in op.contents
            }
            restore.restore_into(
                ident,
                now,
                op.contents,
                member=op.member,
                freeze_timeout=st.config.freeze_timeout_s,
            )
            held = st.members.by_pid(ident.pid)
            if held is not None:  # a held member rewritten: its next capture is full
                tracking.after_restore(held, None, st.config.freeze_timeout_s)
        except CpcoordError as e:
            err = e
    st.emit(result(op.command_id, err=err), op.epoch)
