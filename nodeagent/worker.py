"""The ptrace thread: ONE OS thread does every ptrace operation of the agent.

ptrace binds a tracee to the thread that seized it, so freeze, tracker arm/collect
(uffd-wp injects system calls into the target), the copy and the thaw of a member all
run here, fed by a queue of operations (nodeagent/worker_ops.py). The thread is also the
only writer of the members' tracking state, and it enforces the lease on its own: a
member frozen longer than its lease (the Freeze's `lease_ms`, capped by the agent's
`--lease`) without a Capture is thawed here and reported `Failed(LEASE_EXPIRED)`,
whatever happens to the coordinator. Leases are checked whenever the queue is idle until
the next deadline, between operations and between the members of a Capture, so a thaw
is late by at most one member's copy. Threads a thaw could not detach (they had not
stopped: vfork, an uninterruptible wait) are held by this thread (nodeagent/tracees.py)
and polled on the same loop, between operations and on a short timer, so each is
detached the moment it stops or reaped when it dies; a Freeze whose generation is
aborted meanwhile stops waiting for a member that does not stop.

Per Capture, members are copied one after the other (all are frozen: the cut is taken),
each thawed as soon as its copy is staged and its tracker re-armed (nodeagent/tracking.py);
uploads start only after the last member of the Capture is thawed, so they never slow
a copy. A whole-memory member's registers are saved first, while frozen, and go out with
its Staged (restore_ops.py); a restore Freeze's fit check uses the ones it brings back.
Events go out through `emit(message, epoch)`: the epoch names the control stream the
command came on, so nothing is reported on a newer stream for an older one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from cpcoord import faults
from cpcoord.errors import (
    AgentStepFailed,
    CpcoordError,
    LeaseExpired,
    MemberNotRunning,
    NoSuchProcess,
    NotFrozen,
    PidReused,
    ProcessExited,
    RestoreRefused,
    UnknownMember,
)
from cpcoord.gen.v1 import agent_pb2, common_pb2
from cpcoord.ranges import PAGE_SIZE
from nodeagent import copyout, metrics, restore, restore_ops, tracees, tracking
from nodeagent.freeze import freeze, thaw
from nodeagent.membership import (
    DeathWatch,
    HeldMember,
    Key,
    Members,
    exit_status,
    new_member,
    same_attach,
)
from nodeagent.procfs import ProcessIdentity
from nodeagent.reader import ReadvFn, Staging, _sys_readv
from nodeagent.upload import StagedMember
from nodeagent.worker_ops import (
    AbortOp,
    AttachOp,
    CaptureOp,
    CommittedOp,
    DetachOp,
    DisconnectOp,
    FreezeOp,
    FrozenEntry,
    GoneOp,
    Op,
    PrepareOp,
    R,
    RestoreIntoOp,
    RestoreOp,
    StopOp,
    WorkerConfig,
    failed,
    member_gone,
    process,
    reason_name,
    result,
)

log = logging.getLogger(__name__)
Emit = Callable[[agent_pb2.AgentMessage, int], None]
OnStaged = Callable[[list[StagedMember], int], None]
STAGE_FAILED = (NoSuchProcess, ProcessExited, PidReused, MemberNotRunning)
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
        config: WorkerConfig | None = None,
        epoch: Callable[[], int] = lambda: 0,
        readv: ReadvFn = _sys_readv,
    ) -> None:
        self.members = members
        self.config = config or WorkerConfig()
        self._emit = emit
        self._on_staged = on_staged
        self._epoch = epoch  # the current stream's, for news nobody asked for (a death)
        self._readv = readv
        self._q: queue.Queue[Op] = queue.Queue()
        self._frozen: dict[Key, FrozenEntry] = {}
        self._aborted: set[tuple[str, int]] = set()
        self._alock = threading.Lock()
        self._watch = DeathWatch(lambda key: self.submit(GoneOp(key)))
        self._thread = threading.Thread(target=self._run, name="cpcoord-ptrace", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, op: Op) -> None:
        if isinstance(op, AbortOp):
            # Seen by a Capture in progress between two members (the AbortOp thaws).
            with self._alock:
                self._aborted.add((op.job, op.generation))
        self._q.put(op)

    def stop(self, timeout: float = 30.0) -> None:
        self._q.put(StopOp())
        self._thread.join(timeout)
        self._watch.close()

    def frozen_keys(self) -> list[Key]:
        return list(self._frozen)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                deadline = min((f.deadline for f in self._frozen.values()), default=None)
                timeout = tracees.next_poll()
                if deadline is not None:
                    left = min(max(0.0, deadline - time.monotonic()), FROZEN_POLL_S)
                    timeout = left if timeout is None else min(timeout, left)
                try:
                    op: Op | None = self._q.get(timeout=timeout)
                except queue.Empty:
                    op = None
                if isinstance(op, StopOp):
                    self._shutdown()
                    return
                try:
                    self._enforce_leases()
                    self._check_frozen_alive()
                    tracees.poll()
                    if op is not None:
                        self._dispatch(op)
                        tracees.poll()
                except Exception as e:  # the ptrace thread must survive any bug
                    name = type(op).__name__
                    log.exception("worker step failed", extra={"fields": {"op": name}})
                    self._release_failed(op, e)
        finally:
            for key in list(self._frozen):
                self._thaw(key)
            # Threads still held (seized, never stopped) are released by the kernel when
            # this thread ends, their pending interrupt with them (exit_ptrace).
            if tracees.poll():
                held = {"threads": tracees.held()}
                log.info("held threads released by the thread's end", extra={"fields": held})

    def _release_failed(self, op: Op | None, e: Exception) -> None:
        """A step failed on a bug: thaw its generation's members now (never wait for the
        lease) and tell the coordinator, which aborts the generation."""
        if not isinstance(op, FreezeOp | CaptureOp | RestoreOp):
            return
        mine = [
            k
            for k, fe in self._frozen.items()
            if (fe.job, fe.generation) == (op.job, op.generation)
        ]
        self._thaw_generation(op.job, op.generation)
        what = {FreezeOp: "freeze", CaptureOp: "capture", RestoreOp: "restore"}[type(op)]
        failed = R.ABORT_REASON_CAPTURE_FAILED
        if isinstance(op, RestoreOp):
            failed = R.ABORT_REASON_RESTORE_FAILED
        err = AgentStepFailed(f"{what} generation {op.generation}", type(e).__name__)
        for _job, member in mine:
            self._fail(op.job, op.generation, member, failed, err, op.epoch)

    def _check_frozen_alive(self) -> None:
        for key in list(self._frozen):
            m = self.members.get(*key)
            if m is not None and m.alive and not m.ident.alive():
                self._mark_gone(m, self._frozen[key].epoch)

    def _dispatch(self, op: Op) -> None:
        if isinstance(op, FreezeOp):
            self._freeze(op)
        elif isinstance(op, CaptureOp):
            self._capture(op)
        elif isinstance(op, AbortOp):
            self._thaw_generation(op.job, op.generation)
            with self._alock:
                self._aborted.discard((op.job, op.generation))
        elif isinstance(op, CommittedOp):
            for m in self.members.of_job(op.job):
                m.committed_through(op.generation)
        elif isinstance(op, AttachOp):
            self._attach(op)
        elif isinstance(op, DetachOp):
            self._detach(op)
        elif isinstance(op, GoneOp):
            gone = self.members.get(*op.key)
            # A pidfd of a reused number or a spurious wake-up: the process still runs.
            if gone is not None and gone.alive and not gone.ident.alive():
                self._mark_gone(gone, self._epoch())
        elif isinstance(op, PrepareOp):
            self._prepare(op.key)
        elif isinstance(op, RestoreOp):
            self._restore(op)
        elif isinstance(op, RestoreIntoOp):
            self._restore_into(op)
        elif isinstance(op, DisconnectOp):
            for key in list(self._frozen):
                self._thaw(key)
            with self._alock:
                self._aborted.clear()

    def _thaw(self, key: Key) -> FrozenEntry | None:
        fe = self._frozen.pop(key, None)
        if fe is not None:
            thaw(fe.fp)
            metrics.FROZEN.set(len(self._frozen))
        return fe

    def _thaw_generation(self, job: str, generation: int) -> None:
        for key, fe in list(self._frozen.items()):
            if (fe.job, fe.generation) == (job, generation):
                self._thaw(key)

    def _enforce_leases(self) -> None:
        now = time.monotonic()
        for key, fe in list(self._frozen.items()):
            if now < fe.deadline:
                continue
            self._thaw(key)
            err = LeaseExpired(key[1], key[0], time.monotonic() - fe.started, fe.lease_ms)
            log.warning(
                "lease expired: thawed", extra={"fields": {"job": key[0], "member": key[1]}}
            )
            self._fail(fe.job, fe.generation, key[1], R.ABORT_REASON_LEASE_EXPIRED, err, fe.epoch)

    def _fail(
        self, job: str, gen: int, member: str, reason: int, err: CpcoordError, epoch: int
    ) -> None:
        metrics.FAILURES.labels(reason_name(reason)).inc()
        self._emit(failed(job, gen, member, reason, err), epoch)

    def _mark_gone(self, m: HeldMember, epoch: int) -> None:
        """The member's process exited: learn how, release it, report MemberGone."""
        if m.alive:
            m.exit_status, m.gone_detail = exit_status(m.ident.pid)  # before a thaw reaps it
            m.alive = False
            metrics.MEMBERS_GONE.inc()
        self._thaw(m.key)
        self._watch.remove(m.key)
        m.track.forget(None)
        self._emit(member_gone(m), epoch)

    def _lookup(self, job: str, names: Sequence[str]) -> list[HeldMember | str]:
        """The named members of the job (all held ones when none is named); a name not
        held here stays a string."""
        out: list[HeldMember | str] = []
        for n in names or [m.name for m in self.members.of_job(job)]:
            m = self.members.get(job, n)
            out.append(m if m is not None else n)
        return out

    def _staging(self, m: HeldMember) -> Staging:
        # A staging an upload still reads is left to it; the capture gets a new one.
        if m.staging is None or m.staging_busy:
            m.staging, m.staging_busy = Staging(), False
        return m.staging

    # -- Freeze ----------------------------------------------------------------------------

    def _freeze(self, op: FreezeOp) -> None:
        t_op = time.monotonic()  # for the log: staging, then every member stopped
        lease_s = min(op.lease_ms / 1000 or self.config.lease_s, self.config.lease_s)
        targets: list[HeldMember] = []
        for m in self._lookup(op.job, op.members):
            if isinstance(m, str):
                err = UnknownMember(op.job, m, f"on node {self.config.node}")
                self._fail(op.job, op.generation, m, R.ABORT_REASON_FREEZE_FAILED, err, op.epoch)
            elif not m.alive:
                self._emit(member_gone(m), op.epoch)
            else:
                if self._thaw(m.key) is not None:  # left over from an older generation
                    log.warning("thawed a stale freeze", extra={"fields": {"member": m.name}})
                targets.append(m)
        # Size and prefault staging while everything still runs.
        ready: list[HeldMember] = []
        for m in targets:
            if op.restore:  # nothing is copied out: no staging
                ready.append(m)
                continue
            try:
                copyout.prepare(self._staging(m), m.ident.view("freeze"), m.regions)
                ready.append(m)
            except STAGE_FAILED:
                self._mark_gone(m, op.epoch)
            except CpcoordError as e:
                self._fail(op.job, op.generation, m.name, R.ABORT_REASON_FREEZE_FAILED, e, op.epoch)
        done: list[agent_pb2.FrozenMember] = []
        misfit = False  # restore: a member that cannot take the generation back
        lease_ms = int(lease_s * 1000)

        def aborted() -> bool:  # the Abort is queued behind us: stop freezing for it
            with self._alock:
                return (op.job, op.generation) in self._aborted

        for m in ready:
            if aborted():
                return  # the queued AbortOp thaws those frozen already
            t0 = time.monotonic()
            try:
                fp = freeze(m.ident, min(self.config.freeze_timeout_s, lease_s), aborted)
            except STAGE_FAILED:
                self._mark_gone(m, op.epoch)
                continue
            except CpcoordError as e:
                log.warning("freeze failed", extra={"fields": {"member": m.name, "error": str(e)}})
                self._fail(op.job, op.generation, m.name, R.ABORT_REASON_FREEZE_FAILED, e, op.epoch)
                continue
            fe = FrozenEntry(op.job, op.generation, fp, t0, t0 + lease_s, lease_ms, op.epoch)
            self._frozen[m.key] = fe
            metrics.FROZEN.set(len(self._frozen))
            if op.restore and not self._fit(op, m, fe):
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
        self._emit(agent_pb2.AgentMessage(frozen=frozen_msg), op.epoch)

    # -- Restore ---------------------------------------------------------------------------

    def _fit(self, op: FreezeOp, m: HeldMember, fe: FrozenEntry) -> bool:
        try:
            fe.fitted = restore_ops.fit(m, fe.fp, op.layouts)
            return True
        except CpcoordError as e:
            mismatch = restore_ops.fit_error(e)
            reason = R.ABORT_REASON_MISMATCH if mismatch else R.ABORT_REASON_RESTORE_FAILED
            log.warning("restore refused", extra={"fields": {"member": m.name, "error": str(e)}})
            self._fail(op.job, op.generation, m.name, reason, e, op.epoch)
            return False

    def _restore(self, op: RestoreOp) -> None:
        """Write the generation into a member frozen (and fitted) for it; do not thaw."""
        with self._alock:
            if (op.job, op.generation) in self._aborted:
                return  # the queued AbortOp thaws it: nothing is written after an Abort
        m = self.members.get(op.job, op.member)
        fe = self._frozen.get((op.job, op.member))
        fitted = fe.fitted if fe is not None and fe.generation == op.generation else None
        err = op.error
        if m is None or fe is None or fitted is None or err is not None:
            why = "no restore Freeze for it, or its lease expired"
            err = err or NotFrozen(op.member, op.job, op.generation, why)
            self._fail(
                op.job, op.generation, op.member, R.ABORT_REASON_RESTORE_FAILED, err, op.epoch
            )
            return
        # The member's capture staging is idle during a restore (unless an upload still
        # reads it) and prefaulted: it takes the backup of what the restore overwrites.
        backup = m.staging if m.staging is not None and not m.staging_busy else None
        try:
            st = restore.write(fitted, op.contents, staging=backup)
        except CpcoordError as e:
            if isinstance(e, STAGE_FAILED) or not m.ident.alive():
                self._mark_gone(m, op.epoch)
            else:  # put back (RestoreUndone), still the tracker saw writes: start afresh
                tracking.after_restore(m, fe.fp, self.config.freeze_timeout_s)
            self._fail(op.job, op.generation, op.member, R.ABORT_REASON_RESTORE_FAILED, e, op.epoch)
            return
        tracking.after_restore(m, fe.fp, self.config.freeze_timeout_s)
        frozen_s = time.monotonic() - fe.started
        msg = restore_ops.restored(op.job, op.generation, op.member, st, frozen_s)
        self._emit(msg, op.epoch)

    def _restore_into(self, op: RestoreIntoOp) -> None:
        err = op.error
        if err is None:
            try:
                ident = op.target
                if isinstance(ident, int):
                    ident = ProcessIdentity.of(ident)
                if ident.pid in {fe.fp.ident.pid for fe in self._frozen.values()}:
                    raise RestoreRefused(op.member, f"process {ident.pid} is frozen for a job")
                now = {n: (a, size) for n, a, size in op.regions_now} or {
                    c.name: (c.start, c.size) for c in op.contents
                }
                restore.restore_into(
                    ident,
                    now,
                    op.contents,
                    member=op.member,
                    freeze_timeout=self.config.freeze_timeout_s,
                )
                held = self.members.by_pid(ident.pid)
                if held is not None:  # a held member rewritten: its next capture is full
                    tracking.after_restore(held, None, self.config.freeze_timeout_s)
            except CpcoordError as e:
                err = e
        self._emit(result(op.command_id, err=err), op.epoch)

    # -- Capture ---------------------------------------------------------------------------

    def _capture(self, op: CaptureOp) -> None:
        cut_ns = time.time_ns()
        staged: list[StagedMember] = []
        for m in self._lookup(op.job, op.members):
            with self._alock:
                if (op.job, op.generation) in self._aborted:
                    break  # the queued AbortOp thaws the rest
            self._enforce_leases()
            tracees.poll()
            if isinstance(m, str):
                err: CpcoordError = UnknownMember(op.job, m, f"on node {self.config.node}")
                self._fail(op.job, op.generation, m, R.ABORT_REASON_CAPTURE_FAILED, err, op.epoch)
                continue
            fe = self._frozen.get(m.key)
            if fe is None or (fe.job, fe.generation) != (op.job, op.generation):
                if not m.alive:
                    self._emit(member_gone(m), op.epoch)
                    continue
                err = NotFrozen(m.name, op.job, op.generation, "no Freeze, or its lease expired")
                self._fail(
                    op.job, op.generation, m.name, R.ABORT_REASON_CAPTURE_FAILED, err, op.epoch
                )
                continue
            sm = self._capture_member(op, m, fe, cut_ns)
            if sm is not None:
                staged.append(sm)
        if staged:
            self._on_staged(staged, op.epoch)

    def _capture_member(
        self, op: CaptureOp, m: HeldMember, fe: FrozenEntry, cut_ns: int
    ) -> StagedMember | None:
        t_copy = time.monotonic()  # the member's own copy and thaw, barrier wait excluded
        staging = self._staging(m)
        try:
            try:
                # Registers first, before a tracker injects anything: the cut's (issue 5).
                threads = restore_ops.cut_threads(m, fe.fp)
                c = tracking.capture_frozen(m, fe.fp, op.generation, op.full, staging, self._readv)
                faults.fault_point("agent.capture")
            finally:
                self._thaw(m.key)
        except STAGE_FAILED:
            self._mark_gone(m, op.epoch)
            return None
        except CpcoordError as e:
            self._fail(op.job, op.generation, m.name, R.ABORT_REASON_CAPTURE_FAILED, e, op.epoch)
            return None
        except Exception as e:  # a bug: this member fails, the others are still captured
            log.exception("capture step failed", extra={"fields": {"member": m.name}})
            err = AgentStepFailed(f"capture {m.name}", type(e).__name__)
            self._fail(op.job, op.generation, m.name, R.ABORT_REASON_CAPTURE_FAILED, err, op.epoch)
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
        regs, starts = restore_ops.staged_threads(m.name, threads)
        st = agent_pb2.Staged(
            job=op.job,
            generation=op.generation,
            member=m.name,
            stats=stats,
            threads=regs,
            thread_start_times=starts,
        )
        self._emit(agent_pb2.AgentMessage(staged=st), op.epoch)
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
                }
            },
        )
        return tracking.handoff(
            m, staging, c, op.job, op.generation, self.config.node, cut_ns, frozen_s
        )

    # -- membership ------------------------------------------------------------------------

    def _attach(self, op: AttachOp) -> None:
        try:
            m = new_member(op.request, self.config.default_tracker, self.members)
            old = self.members.get(m.job, m.name)
            if old is not None and old.alive and same_attach(old, m):
                self._emit(result(op.command_id, member=old.member_proto()), op.epoch)
                return
            self.members.add(m)
        except CpcoordError as e:
            self._emit(result(op.command_id, err=e), op.epoch)
            return
        self._watch.add(m.key, m.ident)
        metrics.MEMBERS.set(len(self.members.all()))
        log.info(
            "member attached",
            extra={"fields": {"job": m.job, "member": m.name, "pid": m.ident.pid}},
        )
        self._emit(result(op.command_id, member=m.member_proto()), op.epoch)
        self._q.put(PrepareOp(m.key))  # after the answer: the attach does not wait for it

    def _prepare(self, key: Key) -> None:
        m = self.members.get(*key)
        if m is None or not m.alive or key in self._frozen:
            return
        t0 = time.perf_counter()
        try:
            staging = self._staging(m)
            copyout.prepare(staging, m.ident.view("freeze"), m.regions)
        except CpcoordError as e:  # the Freeze will find out and report it
            log.info("staging not prepared", extra={"fields": {"member": m.name, "error": str(e)}})
            return
        ms = round((time.perf_counter() - t0) * 1e3, 3)
        fields = {"member": m.name, "bytes": staging.capacity, "ms": ms}
        log.info("staging prepared", extra={"fields": fields})

    def _detach(self, op: DetachOp) -> None:
        m = self.members.get(op.job, op.member)
        if m is None:
            err = UnknownMember(op.job, op.member, f"on node {self.config.node}")
            self._emit(result(op.command_id, err=err), op.epoch)
            return
        fe = self._frozen.get(m.key)
        tracking.release(m, fe.fp if fe else None, self.config.freeze_timeout_s)
        self._thaw(m.key)
        self._watch.remove(m.key)
        self.members.remove(op.job, op.member)
        metrics.MEMBERS.set(len(self.members.all()))
        self._emit(result(op.command_id, member=m.member_proto()), op.epoch)

    def _shutdown(self) -> None:
        for key in list(self._frozen):
            self._thaw(key)
        for m in self.members.all():
            tracking.release(m, None, min(1.0, self.config.freeze_timeout_s))
