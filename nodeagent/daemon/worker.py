"""The ptrace thread: ONE OS thread does every ptrace operation of the agent.

ptrace binds a tracee to the thread that seized it, so freeze, tracker arm/collect
(uffd-wp injects system calls into the target), the copy and the thaw of a member all
run here, fed by a queue of operations (nodeagent/daemon/worker_ops.py). The thread is also the
only writer of the members' tracking state, and it enforces the lease on its own: a
member frozen longer than its lease (the Freeze's `lease_ms`, capped by the agent's
`--lease`) without a Capture is thawed here and reported `Failed(LEASE_EXPIRED)`,
whatever happens to the coordinator. Leases are checked whenever the queue is idle until
the next deadline, between operations and between the members of a Capture, so a thaw
is late by at most one member's copy. Threads a thaw could not detach (they had not
stopped: vfork, an uninterruptible wait) are held by this thread (nodeagent/proc/tracees.py)
and polled on the same loop, between operations and on a short timer, so each is
detached the moment it stops or reaped when it dies; a Freeze whose generation is
aborted meanwhile stops waiting for a member that does not stop.

This module owns the thread, its queue and loop, and the membership steps (attach,
prepare, detach). Before its first operation the thread closes the userfaultfds that
agents killed with SIGKILL left in processes, and at shutdown it releases every member's
tracker (nodeagent/trackers/leftovers.py, docs/uffd-wp.md "Leaving no trace"). The
state the steps share is a `WorkerState` (nodeagent/daemon/worker_state.py); Freeze and
restore are nodeagent/daemon/worker_freeze.py, Capture nodeagent/daemon/worker_capture.py.
Events go out through `emit(message, epoch)`: the epoch names the control stream the
command came on, so nothing is reported on a newer stream for an older one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from cpcoord.errors import AgentStepFailed, CpcoordError, UnknownMember
from nodeagent.capture import copyout
from nodeagent.daemon import tracking, tree
from nodeagent.daemon import worker_ops as ops
from nodeagent.daemon.membership import (
    DeathWatch,
    HeldMember,
    Key,
    Members,
    new_member,
    same_attach,
)
from nodeagent.daemon.metrics import AgentMetrics, unserved
from nodeagent.daemon.worker_capture import OnStaged, capture
from nodeagent.daemon.worker_freeze import freeze, peek, restore_into, restore_member
from nodeagent.daemon.worker_state import Emit, WorkerState
from nodeagent.proc import tracees
from nodeagent.proc.reader import ReadvFn, sys_readv
from nodeagent.trackers import leftovers

log = logging.getLogger(__name__)
# A member killed while frozen is not seen by its pidfd: its traced threads stay zombies
# until we, the tracer, reap them (at the thaw). So frozen members are polled.
FROZEN_POLL_S = 0.1


class Worker:
    """The ptrace thread and the state it owns. `submit` from any thread."""

    def __init__(
        self,
        members: Members,
        emit: Emit,
        on_staged: OnStaged,
        config: ops.WorkerConfig | None = None,
        epoch: Callable[[], int] = lambda: 0,
        readv: ReadvFn | None = None,
        metrics: AgentMetrics | None = None,
        on_prepared: Callable[[int], None] | None = None,
    ) -> None:
        self.members = members
        self._on_prepared = on_prepared  # (staging bytes): a member may be captured soon
        self.config = config or ops.WorkerConfig()
        self.metrics = metrics or unserved()
        self._on_staged = on_staged
        self._epoch = epoch  # the current stream's, for news nobody asked for (a death)
        self._readv = readv or sys_readv
        self._q: queue.Queue[ops.Op] = queue.Queue()
        watch = DeathWatch(lambda key: self.submit(ops.GoneOp(key)))
        self._st = WorkerState(members, emit, self.config, self.metrics, watch)
        self._thread = threading.Thread(target=self._run, name="cpcoord-ptrace", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, op: ops.Op) -> None:
        if isinstance(op, ops.AbortOp):
            # Seen by a Capture in progress between two members (the AbortOp thaws).
            self._st.abort(op.job, op.generation)
        self._q.put(op)

    def stop(self, timeout: float = 30.0) -> None:
        self._q.put(ops.StopOp())
        self._thread.join(timeout)
        self._st.watch.close()

    def frozen_keys(self) -> list[Key]:
        return list(self._st.frozen)

    def members_frozen(self) -> int:
        return len(self._st.frozen)  # read from the scrape thread: len() of a dict is atomic

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        st = self._st
        self._sweep(None)  # before any member is attached: the queue waits
        try:
            while True:
                deadline = min((f.deadline for f in st.frozen.values()), default=None)
                timeout = tracees.next_poll()
                if deadline is not None:
                    left = min(max(0.0, deadline - time.monotonic()), FROZEN_POLL_S)
                    timeout = left if timeout is None else min(timeout, left)
                try:
                    op: ops.Op | None = self._q.get(timeout=timeout)
                except queue.Empty:
                    op = None
                if isinstance(op, ops.StopOp):
                    self._shutdown()
                    return
                try:
                    st.enforce_leases()
                    st.check_frozen_alive()
                    tracees.poll()
                    if op is not None:
                        self._dispatch(op)
                        tracees.poll()
                except Exception as e:  # the ptrace thread must survive any bug
                    name = type(op).__name__
                    log.exception("worker step failed", extra={"fields": {"op": name}})
                    self._release_failed(op, e)
        finally:
            st.thaw_all()
            # Threads still held (seized, never stopped) are released by the kernel when
            # this thread ends, their pending interrupt with them (exit_ptrace).
            if tracees.poll():
                held = {"threads": tracees.held()}
                log.info("held threads released by the thread's end", extra={"fields": held})

    def _release_failed(self, op: ops.Op | None, e: Exception) -> None:
        """A step failed on a bug: thaw its generation's members now (never wait for the
        lease) and tell the coordinator, which aborts the generation."""
        if not isinstance(op, ops.FreezeOp | ops.CaptureOp | ops.RestoreOp):
            return
        st = self._st
        mine = [
            k for k, fe in st.frozen.items() if (fe.job, fe.generation) == (op.job, op.generation)
        ]
        st.thaw_generation(op.job, op.generation)
        what = {ops.FreezeOp: "freeze", ops.CaptureOp: "capture", ops.RestoreOp: "restore"}
        failed = ops.R.ABORT_REASON_CAPTURE_FAILED
        if isinstance(op, ops.RestoreOp):
            failed = ops.R.ABORT_REASON_RESTORE_FAILED
        err = AgentStepFailed.of(f"{what[type(op)]} generation {op.generation}", e)
        for _job, member in mine:
            st.fail(op.job, op.generation, member, failed, err, op.epoch)

    def _dispatch(self, op: ops.Op) -> None:
        st = self._st
        if isinstance(op, ops.FreezeOp):
            freeze(st, op)
        elif isinstance(op, ops.CaptureOp):
            capture(st, op, self._readv, self._on_staged)
        elif isinstance(op, ops.AbortOp):
            st.thaw_generation(op.job, op.generation)
            st.aborted_done(op.job, op.generation)
        elif isinstance(op, ops.CommittedOp):
            for m in self.members.of_job(op.job):
                m.committed_through(op.generation)
        elif isinstance(op, ops.AttachOp):
            self._attach(op)
        elif isinstance(op, ops.DetachOp):
            self._detach(op)
        elif isinstance(op, ops.GoneOp):
            gone = self.members.get(*op.key)
            # A pidfd of a reused number or a spurious wake-up: the process still runs.
            if gone is not None and gone.alive and not gone.ident.alive():
                st.mark_gone(gone, self._epoch())
        elif isinstance(op, ops.PrepareOp):
            self._prepare(op.key)
        elif isinstance(op, ops.RestoreOp):
            restore_member(st, op)
        elif isinstance(op, ops.RestoreIntoOp):
            restore_into(st, op)
        elif isinstance(op, ops.PeekOp):
            peek(st, op)
        elif isinstance(op, ops.DisconnectOp):
            st.thaw_all()
            st.forget_aborts()

    # -- membership ------------------------------------------------------------------------

    def _attach(self, op: ops.AttachOp) -> None:
        st = self._st
        try:
            m = new_member(op.request, self.config.default_tracker, self.members)
            old = self.members.get(m.job, m.name)
            if (
                old is not None
                and old.alive
                and (same_attach(old, m) or tree.same_descendant(old, m))
            ):
                st.emit(ops.result(op.command_id, member=old.member_proto()), op.epoch)
                return
            self.members.add(m)
        except CpcoordError as e:
            st.emit(ops.result(op.command_id, err=e), op.epoch)
            return
        st.watch.add(m.key, m.ident)
        log.info(
            "member attached",
            extra={"fields": {"job": m.job, "member": m.name, "pid": m.ident.pid}},
        )
        if m.group and m.group == m.name:  # a tree root: its descendants join (before the
            tree.rescan(st, m.job, op.epoch)  # answer, so the coordinator has them then)
        st.emit(ops.result(op.command_id, member=m.member_proto()), op.epoch)
        self._q.put(ops.PrepareOp(m.key))  # after the answer: the attach does not wait for it

    def _prepare(self, key: Key) -> None:
        m = self.members.get(*key)
        if m is None or not m.alive or key in self._st.frozen:
            return
        t0 = time.perf_counter()
        try:
            staging = self._st.staging(m)
            copyout.prepare(staging, m.ident.view("freeze"), m.regions)
        except CpcoordError as e:  # the Freeze will find out and report it
            log.info("staging not prepared", extra={"fields": {"member": m.name, "error": str(e)}})
            return
        ms = round((time.perf_counter() - t0) * 1e3, 3)
        fields = {"member": m.name, "bytes": staging.capacity, "ms": ms}
        log.info("staging prepared", extra={"fields": fields})
        if self._on_prepared is not None:
            self._on_prepared(staging.capacity)

    def _detach(self, op: ops.DetachOp) -> None:
        st = self._st
        m = self.members.get(op.job, op.member)
        if m is None:
            err = UnknownMember(op.job, op.member, f"on node {self.config.node}")
            st.emit(ops.result(op.command_id, err=err), op.epoch)
            return
        fe = st.frozen.get(m.key)
        failed = tracking.release(m, fe.fp if fe else None, self.config.freeze_timeout_s)
        st.thaw(m.key)
        st.watch.remove(m.key)
        self.members.remove(op.job, op.member)
        # Detached either way; a tracker that could not be released is the coordinator's
        # to hear (it logs it), and its record is swept at this agent's shutdown.
        if failed is not None:
            st.emit(ops.result(op.command_id, err=failed), op.epoch)
            return
        st.emit(ops.result(op.command_id, member=m.member_proto()), op.epoch)

    def _sweep(self, keep: list[HeldMember] | None) -> None:
        """Close userfaultfds no agent wants (nodeagent/trackers/leftovers.py): at start,
        those of agents that died; at shutdown, also this agent's failed releases."""
        idents = None if keep is None else [m.ident for m in keep]
        try:
            n = leftovers.sweep(min(1.0, self.config.freeze_timeout_s), idents)
        except (CpcoordError, OSError) as e:
            log.warning("left-over sweep failed", extra={"fields": {"error": str(e)}})
            return
        if n:
            log.info("left-over userfaultfds closed", extra={"fields": {"count": n}})

    def _shutdown(self) -> None:
        self._st.thaw_all()
        for m in self.members.all():
            tracking.release(m, None, min(1.0, self.config.freeze_timeout_s))
        self._sweep([])
