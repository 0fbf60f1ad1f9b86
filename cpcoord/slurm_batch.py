"""Slurm, batch side: what `cpcoord slurm batch` does around the job's command.

It runs in the batch shell's place (`exec cpcoord slurm batch -- srun ...`), so Slurm's
warning signal (`--signal=B:USR1@N`, or the preemption signal with
`SlurmctldParameters=preempt_send_user_signal`) reaches it and no rank. The
`Supervisor` holds the decisions, over a `Coordinator` (protocol; the gRPC one is
`GrpcCoordinator`) and a requeue function, so they are tested without Slurm:

- before the command starts: wait (bounded) for the coordinator; on a restart fix the
  generation every rank restores (the newest committed one) and export it;
- every `every` seconds: checkpoint the whole job, but only when every rank is ready
  (has the `cpcoord.slurm` marker region, cpcoord/slurm.py); a failure is logged and the
  next tick tries again;
- on the warning signal: one more checkpoint, bounded by `timeout` seconds in all, then
  requeue whatever happened. A failed checkpoint never blocks the requeue: the log says
  which generation the job will restart from;
- when the command exits 0 (and was not preempted or terminated): release the job's
  generations (they can never be restored again: the job id is not reused).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cpcoord import clientconn
from cpcoord.api import convert
from cpcoord.api import values as v
from cpcoord.errors import (
    CoordinatorUnavailable,
    CpcoordError,
    GenerationAborted,
    JobBusy,
    RemoteError,
    StreamIncomplete,
    UnknownJob,
)
from cpcoord.gen.v1 import coordinator_pb2
from cpcoord.log import log_event
from cpcoord.slurm import MARKER, SlurmEnv

log = logging.getLogger("cpcoord.slurm")


class Coordinator(Protocol):
    def newest(self, job: str, timeout: float) -> v.Generation | None:
        """The job's newest committed generation (None: none, or no such job)."""

    def not_ready(self, job: str, ranks: int | None, timeout: float) -> str:
        """Why the job cannot be checkpointed consistently now ("" = it can)."""

    def checkpoint(self, job: str, timeout: float) -> v.Generation:
        """One committed generation within `timeout` seconds, or a CpcoordError."""

    def release(self, job: str, timeout: float) -> int:
        """Delete the job's unpinned generations; how many went."""


@dataclass(frozen=True)
class Options:
    job: str
    every: float | None = None  # seconds between periodic checkpoints; None: none
    timeout: float = 60.0  # bound of one checkpoint, the preemption one included
    ranks: int | None = None  # members rank-0..rank-(N-1) must be ready; None: all attached
    requeue: bool = True
    release: bool = True
    connect_timeout: float = 300.0


def _ago(g: v.Generation, now: float) -> str:
    t = (g.finished_unix_ms or g.started_unix_ms) / 1000
    return f"{max(0.0, now - t):.0f} s ago" if t else "at an unknown time"


class Supervisor:
    def __init__(
        self,
        opts: Options,
        coord: Coordinator,
        slurm: SlurmEnv,
        requeue: Callable[[], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.opts, self.coord, self.slurm, self._requeue = opts, coord, slurm, requeue
        self.clock, self.wall, self.sleep = clock, wall, sleep
        self.last: v.Generation | None = None  # newest committed generation we know of
        self.preempted = False

    def _event(self, level: int, msg: str, **fields: object) -> None:
        log_event(log, level, msg, job=self.opts.job, slurm_job_id=self.slurm.job_id, **fields)

    # -- start -----------------------------------------------------------------------

    def prepare(self) -> dict[str, str]:
        """Wait for the coordinator; the environment the command gets."""
        from cpcoord.slurm import GENERATION_ENV, JOB_ENV

        deadline = self.clock() + self.opts.connect_timeout
        while True:
            try:
                self.last = self.coord.newest(self.opts.job, timeout=10.0)
                break
            except CpcoordError as e:
                if self.clock() >= deadline:
                    self._event(logging.ERROR, "coordinator unreachable: giving up", error=str(e))
                    raise
                self._event(logging.WARNING, "coordinator unreachable: waiting", error=str(e))
                self.sleep(2.0)
        env = {JOB_ENV: self.opts.job}
        self._event(
            logging.INFO,
            "Slurm job started",
            restart_count=self.slurm.restart_count,
            every_s=self.opts.every or 0,
            ranks=self.opts.ranks or "all attached",
        )
        if self.slurm.restarted:
            g = self.last
            env[GENERATION_ENV] = str(g.number if g else 0)
            ago = _ago(g, self.wall()) if g else ""
            if g is None:
                self._event(logging.WARNING, "restart: the job has no generation; ranks start over")
            else:
                self._event(
                    logging.INFO,
                    f"restart: ranks restore generation {g.number}, committed {ago}",
                    generation=g.number,
                )
        return env

    # -- checkpoints -----------------------------------------------------------------

    def _checkpoint(self, budget: float) -> v.Generation:
        """Check readiness, then checkpoint; JobBusy (another operation of the job) is
        waited out within the budget."""
        deadline = self.clock() + budget
        while True:
            left = deadline - self.clock()
            why = self.coord.not_ready(self.opts.job, self.opts.ranks, timeout=max(left, 0.1))
            if why:
                raise _NotReady(why)
            try:
                g = self.coord.checkpoint(self.opts.job, timeout=max(deadline - self.clock(), 0.1))
            except JobBusy:
                if self.clock() + 1.0 >= deadline:
                    raise
                self.sleep(1.0)
                continue
            self.last = g
            return g

    def tick(self) -> v.Generation | None:
        """A periodic checkpoint; None when skipped or failed (logged)."""
        try:
            g = self._checkpoint(self.opts.timeout)
        except _NotReady as e:
            self._event(logging.INFO, "checkpoint skipped: ranks not ready", why=str(e))
            return None
        except CpcoordError as e:
            self._event(
                logging.WARNING, "checkpoint failed; next one at the next interval", error=str(e)
            )
            return None
        self._event(
            logging.INFO,
            "checkpoint committed",
            generation=g.number,
            pages_captured=g.pages_captured,
            seconds=round(g.seconds, 3),
        )
        return g

    def preempt(self) -> v.Generation | None:
        """Slurm's warning signal: checkpoint (bounded), then requeue whatever happened."""
        self.preempted = True
        self._event(
            logging.WARNING,
            "warning signal from Slurm: checkpointing before requeue",
            bound_s=self.opts.timeout,
        )
        start = self.clock()
        g: v.Generation | None = None
        try:
            g = self._checkpoint(self.opts.timeout)
        except (_NotReady, CpcoordError) as e:
            self._failed(e, self.opts.timeout - (self.clock() - start))
        else:
            self._event(
                logging.INFO,
                f"checkpoint before requeue committed: generation {g.number}",
                generation=g.number,
                seconds=round(self.clock() - start, 3),
            )
        self.requeue()
        return g

    def _failed(self, e: Exception, left: float) -> None:
        why = str(e)
        if isinstance(e, _NotReady):
            why = f"ranks not ready ({e})"
        # The coordinator may answer now (the checkpoint failed for another reason) and
        # know a newer generation than ours; ask briefly, never past the bound.
        if left > 0.5:
            try:
                newest = self.coord.newest(self.opts.job, timeout=min(left, 2.0))
            except CpcoordError:
                pass
            else:
                if newest is not None:
                    self.last = newest
        g = self.last
        if g is None:
            where = "the job has no committed generation: it restarts from the beginning"
        else:
            where = (
                f"the job restarts from generation {g.number}, "
                f"committed {_ago(g, self.wall())}, its last good one"
            )
        self._event(
            logging.WARNING,
            f"checkpoint before requeue FAILED: requeueing anyway; {where}",
            error=why,
            generation=g.number if g else 0,
        )

    def requeue(self) -> None:
        if not self.opts.requeue:
            self._event(logging.INFO, "not requeueing (--no-requeue): Slurm decides")
            return
        try:
            self._requeue()
        except CpcoordError as e:
            self._event(logging.ERROR, "requeue failed", error=str(e))
            return
        self._event(logging.INFO, "requeued: Slurm ends this run and starts the job again")

    # -- end -------------------------------------------------------------------------

    def finished(self, code: int, terminated: bool) -> None:
        self._event(logging.INFO, "command exited", code=code)
        if code != 0 or terminated or self.preempted or not self.opts.release:
            return
        try:
            n = self.coord.release(self.opts.job, timeout=30.0)
        except CpcoordError as e:
            self._event(
                logging.WARNING, "job finished; its generations were not released", error=str(e)
            )
            return
        self._event(logging.INFO, "job finished: generations released", released=n)


class _NotReady(Exception):
    pass


# -- the real pieces -------------------------------------------------------------------------


class GrpcCoordinator:
    """`Coordinator` over a clientconn.Client (the CLI's connection options)."""

    def __init__(self, conn: clientconn.Client) -> None:
        self.conn = conn

    def _hung(self, e: RemoteError, timeout: float) -> CpcoordError:
        """A call past its deadline: say so plainly (the coordinator is hung, or so slow
        it is as good as unreachable)."""
        if "DEADLINE_EXCEEDED" in str(e):
            return CoordinatorUnavailable(self.conn.address, f"no answer within {timeout:.0f} s")
        return e

    def _call(self, method: str, req: object, timeout: float) -> Any:
        try:
            return self.conn.call(method, req, timeout=timeout)
        except RemoteError as e:
            raise self._hung(e, timeout) from e

    def newest(self, job: str, timeout: float) -> v.Generation | None:
        req = coordinator_pb2.ListGenerationsRequest(job=job, limit=8)
        try:
            gens = self._call("ListGenerations", req, timeout).generations
        except UnknownJob:
            return None
        for g in gens:  # newest first; in-flight ones are listed too
            got = convert.generation(g)
            if got.committed:
                return got
        return None

    def not_ready(self, job: str, ranks: int | None, timeout: float) -> str:
        try:
            jobs = self._call("ListJobs", coordinator_pb2.ListJobsRequest(job=job), timeout).jobs
        except UnknownJob:
            return "no rank has attached yet"
        members = {m.name: convert.member(m) for j in jobs for m in j.members}
        want = [f"rank-{i}" for i in range(ranks)] if ranks else sorted(members)
        if not want:
            return "no rank has attached yet"
        missing = [n for n in want if n not in members]
        if missing:
            return f"not attached: {', '.join(missing[:8])}"
        waiting = [n for n in want if MARKER not in {r.name for r in members[n].regions}]
        if waiting:
            return f"not resumed yet (no {MARKER} region): {', '.join(waiting[:8])}"
        gone = [n for n in want if members[n].health is not v.MemberHealth.RUNNING]
        if gone:
            return f"not running: {', '.join(gone[:8])}"
        return ""

    def checkpoint(self, job: str, timeout: float) -> v.Generation:
        req = coordinator_pb2.CheckpointRequest(job=job)
        last: v.ProgressEvent | None = None
        try:
            for msg in self.conn.stream("Checkpoint", req, timeout=timeout):
                last = convert.progress(msg)
        except RemoteError as e:
            raise self._hung(e, timeout) from e
        if last is None or not last.final:
            raise StreamIncomplete("Checkpoint")
        if last.kind is not v.ProgressKind.COMMITTED:
            raise GenerationAborted(last.generation, job, last.reason.value, last.detail)
        if last.info is None:
            return v.Generation(job, last.generation, None, v.GenerationState.COMMITTED)
        return last.info

    def release(self, job: str, timeout: float) -> int:
        req = coordinator_pb2.ListGenerationsRequest(job=job, include_aborted=True)
        try:
            gens = self._call("ListGenerations", req, timeout).generations
        except UnknownJob:
            return 0
        n = 0
        for g in gens:
            if g.pinned:
                continue
            req_d = coordinator_pb2.DeleteGenerationRequest(job=job, generation=g.number)
            self._call("DeleteGeneration", req_d, timeout)
            n += 1
        return n
