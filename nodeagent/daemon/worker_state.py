"""What the ptrace thread (nodeagent/daemon/worker.py) owns and every one of its steps uses:
the held members, those frozen right now with their lease, the generations aborted
while a step runs, and how the thread reports (events and failure metrics).

Only the ptrace thread changes it, except the aborted set: an Abort is recorded the
moment it is submitted (from the agent's thread) so that a Freeze or Capture in
progress sees it between two members.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from cpcoord.errors import (
    CpcoordError,
    LeaseExpired,
    MemberNotRunning,
    NoSuchProcess,
    PidReused,
    ProcessExited,
)
from cpcoord.gen.v1 import agent_pb2
from nodeagent.daemon.membership import DeathWatch, HeldMember, Key, Members, exit_status
from nodeagent.daemon.metrics import AgentMetrics
from nodeagent.daemon.worker_ops import (
    FrozenEntry,
    R,
    WorkerConfig,
    failed,
    member_gone,
    reason_name,
)
from nodeagent.proc.freeze import thaw
from nodeagent.proc.staging import Staging
from nodeagent.trackers import leftovers

log = logging.getLogger(__name__)
Emit = Callable[[agent_pb2.AgentMessage, int], None]
# A step meeting these has met a member that exited: it is reported MemberGone.
STAGE_FAILED = (NoSuchProcess, ProcessExited, PidReused, MemberNotRunning)


class WorkerState:
    def __init__(
        self,
        members: Members,
        emit: Emit,
        config: WorkerConfig,
        metrics: AgentMetrics,
        watch: DeathWatch,
    ) -> None:
        self.members = members
        self.emit = emit
        self.config = config
        self.metrics = metrics
        self.watch = watch
        self.frozen: dict[Key, FrozenEntry] = {}
        self._aborted: set[tuple[str, int]] = set()
        self._alock = threading.Lock()

    # -- aborted generations (any thread) ----------------------------------------------------

    def abort(self, job: str, generation: int) -> None:
        with self._alock:
            self._aborted.add((job, generation))

    def aborted(self, job: str, generation: int) -> bool:
        with self._alock:
            return (job, generation) in self._aborted

    def aborted_done(self, job: str, generation: int) -> None:
        """The abort was carried out (its members thawed)."""
        with self._alock:
            self._aborted.discard((job, generation))

    def forget_aborts(self) -> None:
        """The stream broke: every member is thawed, every abort with it."""
        with self._alock:
            self._aborted.clear()

    # -- frozen members ------------------------------------------------------------------------

    def thaw(self, key: Key) -> FrozenEntry | None:
        fe = self.frozen.pop(key, None)
        if fe is not None:
            thaw(fe.fp)
            live, fe.live = fe.live, None
            if live is not None:
                live.close()
        return fe

    def thaw_all(self) -> None:
        for key in list(self.frozen):
            self.thaw(key)

    def thaw_generation(self, job: str, generation: int) -> None:
        for key, fe in list(self.frozen.items()):
            if (fe.job, fe.generation) == (job, generation):
                self.thaw(key)

    def enforce_leases(self) -> None:
        now = time.monotonic()
        for key, fe in list(self.frozen.items()):
            if now < fe.deadline:
                continue
            self.thaw(key)
            err = LeaseExpired(key[1], key[0], time.monotonic() - fe.started, fe.lease_ms)
            log.warning(
                "lease expired: thawed", extra={"fields": {"job": key[0], "member": key[1]}}
            )
            self.fail(fe.job, fe.generation, key[1], R.ABORT_REASON_LEASE_EXPIRED, err, fe.epoch)

    def check_frozen_alive(self) -> None:
        for key in list(self.frozen):
            m = self.members.get(*key)
            if m is not None and m.alive and not m.ident.alive():
                self.mark_gone(m, self.frozen[key].epoch)

    # -- reports -------------------------------------------------------------------------------

    def fail(
        self, job: str, gen: int, member: str, reason: int, err: CpcoordError, epoch: int
    ) -> None:
        self.metrics.failures.labels(reason_name(reason)).inc()
        self.emit(failed(job, gen, member, reason, err), epoch)

    def mark_gone(self, m: HeldMember, epoch: int) -> None:
        """The member's process exited: learn how, release it, report MemberGone."""
        if m.alive:
            m.exit_status, m.gone_detail = exit_status(m.ident.pid)  # before a thaw reaps it
            m.alive = False
            self.metrics.members_gone.inc()
        self.thaw(m.key)
        self.watch.remove(m.key)
        m.track.forget(None)
        leftovers.done(m.ident)
        self.emit(member_gone(m), epoch)

    # -- members -------------------------------------------------------------------------------

    def lookup(self, job: str, names: Sequence[str]) -> list[HeldMember | str]:
        """The named members of the job (all held ones when none is named); a name not
        held here stays a string."""
        out: list[HeldMember | str] = []
        for n in names or [m.name for m in self.members.of_job(job)]:
            m = self.members.get(job, n)
            out.append(m if m is not None else n)
        return out

    def staging(self, m: HeldMember) -> Staging:
        # A staging an upload still reads is left to it; the capture gets a new one.
        if m.staging is None or m.staging_busy:
            m.staging, m.staging_busy = Staging(), False
        return m.staging
