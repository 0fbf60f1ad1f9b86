"""The actions of `cpcoord slurm` (the parser and the dispatch: cli/slurm.py).

- `batch`: run the command, checkpoint every --every, on Slurm's warning signal
  checkpoint once more and requeue (the decisions: cpcoord/slurm_batch.py).
- `run_rank`: wait for this node's agent, detach a member the job's previous run left,
  then exec `cpcoord run` with the names taken from Slurm's environment.
- `release`: delete the generations of a Slurm job that ended for good.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from cpcoord import clientconn
from cpcoord.errors import (
    CommandNotFound,
    CpcoordError,
    InvalidArgument,
    SlurmCommandFailed,
    UnknownJob,
)
from cpcoord.gen.v1 import coordinator_pb2
from cpcoord.ranges import check_name
from cpcoord.slurm import SlurmEnv, job_name, member_name
from cpcoord.slurm_ctl import ENDED, TRANSIENT, scontrol_requeue, slurm_state

POLL_S = 0.2  # how soon the batch helper sees a signal or the command's exit


def command(args: argparse.Namespace) -> list[str]:
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise InvalidArgument("give the command to run after --")
    return argv


def names(args: argparse.Namespace) -> tuple[SlurmEnv, str]:
    s = SlurmEnv.from_environ()
    job = args.job or job_name(s)
    check_name(job)
    return s, job


def exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


# -- batch ---------------------------------------------------------------------------------


def batch(args: argparse.Namespace) -> int:
    from cpcoord import slurm_batch as sb

    s, job = names(args)
    argv = command(args)
    if sb.log.getEffectiveLevel() > logging.INFO:
        sb.log.setLevel(logging.INFO)  # the job's log: what happened to its checkpoints
    try:
        sig = signal.Signals[f"SIG{args.signal.upper().removeprefix('SIG')}"]
    except KeyError:
        raise InvalidArgument(f"--signal {args.signal}: not a signal name") from None
    opts = sb.Options(
        job=job,
        every=args.every,
        timeout=args.checkpoint_timeout,
        ranks=args.ranks or s.ntasks,
        requeue=not args.no_requeue,
        release=not args.keep,
        connect_timeout=args.connect_timeout,
    )
    got: dict[str, bool] = {"preempt": False, "term": False}

    def on(key: str) -> Any:
        def handler(signum: int, frame: object) -> None:
            # Only a flag (no lock: the handler runs in the thread it interrupts); the
            # loop below polls it every POLL_S.
            got[key] = True

        return handler

    signal.signal(sig, on("preempt"))
    signal.signal(signal.SIGTERM, on("term"))
    with clientconn.connect(args) as conn:
        sup = sb.Supervisor(opts, sb.GrpcCoordinator(conn), s, lambda: scontrol_requeue(s.job_id))
        env = dict(os.environ, **sup.prepare())
        try:
            proc = subprocess.Popen(argv, env=env)
        except FileNotFoundError:
            raise CommandNotFound(argv[0], "not found or not executable (PATH)") from None
        preempted = forwarded = False
        next_tick = time.monotonic() + opts.every if opts.every else None
        while proc.poll() is None:
            if got["term"] and not forwarded:
                forwarded = True  # Slurm ends the job: pass it on, checkpoint nothing
                proc.send_signal(signal.SIGTERM)
            elif got["preempt"] and not preempted:
                preempted = True
                sup.preempt()
            elif next_tick is not None and not preempted and time.monotonic() >= next_tick:
                sup.tick()
                next_tick = time.monotonic() + (opts.every or 0)
            left = POLL_S if next_tick is None else next_tick - time.monotonic()
            time.sleep(min(POLL_S, max(left, 0.0)))
        code = exit_code(proc.returncode)
        sup.finished(code, terminated=got["term"])
    return code


# -- run -----------------------------------------------------------------------------------


def wait_agent(c: Any, node: str, timeout: float) -> None:
    """Until the coordinator answers and (with a node) that node's agent is connected."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            agents = c.call("ListAgents", coordinator_pb2.ListAgentsRequest(), timeout=10).agents
            up = [a.node for a in agents if a.connected]
            if (node and node in up) or (not node and up):
                return
            why = f"agent of node {node or '(any)'} not connected (connected: {up or 'none'})"
        except CpcoordError as e:
            why = str(e)
        if time.monotonic() >= deadline:
            raise InvalidArgument(f"gave up after {timeout:.0f} s: {why}")
        print(f"cpcoord slurm run: waiting: {why}", file=sys.stderr, flush=True)
        time.sleep(2.0)


def detach_stale(c: Any, job: str, member: str, wait: float = 30.0) -> None:
    """A member of this name whose process is gone is what the job's previous run left
    (Slurm killed it); a running one may be the agent not having noticed yet."""
    deadline = time.monotonic() + wait
    while True:
        try:
            jobs = c.call("ListJobs", coordinator_pb2.ListJobsRequest(job=job)).jobs
        except UnknownJob:
            return
        ms = [m for j in jobs for m in j.members if m.name == member]
        if not ms:
            return
        from cpcoord.api import convert
        from cpcoord.api.values import MemberHealth

        if convert.member(ms[0]).health is not MemberHealth.RUNNING or time.monotonic() >= deadline:
            try:
                c.call("DetachMember", coordinator_pb2.DetachMemberRequest(job=job, member=member))
            except CpcoordError as e:
                if time.monotonic() >= deadline:
                    raise
                print(f"cpcoord slurm run: detach of {member}: {e}", file=sys.stderr, flush=True)
            else:
                print(
                    f"cpcoord slurm run: member {member} of {job} was left by an earlier run "
                    "of the Slurm job: detached",
                    file=sys.stderr,
                    flush=True,
                )
                return
        time.sleep(0.5)


def run_rank(args: argparse.Namespace) -> int:
    s, job = names(args)
    member = args.member or member_name(s)
    check_name(member)
    node = args.node or os.environ.get("CPCOORD_NODE", "") or os.environ.get("SLURMD_NODENAME", "")
    argv = command(args)
    with clientconn.connect(args) as c:
        wait_agent(c, node, args.connect_timeout)
        detach_stale(c, job, member)
    # A new process for `cpcoord run`: it forks the command, and gRPC (used above) does
    # not survive a fork.
    run = [sys.executable, "-m", "cpcoord"]
    if getattr(args, "log_level", None):
        run += ["--log-level", args.log_level]
    run += ["run", "--job", job, "--member", member]
    if node:
        run += ["--node", node]
    if args.tracker:
        run += ["--tracker", args.tracker]
    env = dict(os.environ)
    if args.coordinator:
        run += ["--coordinator", args.coordinator]
    if args.insecure:
        run += ["--insecure"]
    for what in ("tls_cert", "tls_key", "tls_ca", "token_file"):
        if getattr(args, what, None):
            run += [f"--{what.replace('_', '-')}", str(getattr(args, what))]
    if args.token:
        env["CPCOORD_TOKEN"] = args.token  # not on a command line others can read
    run += ["--timeout", str(args.timeout), "--", *argv]
    os.execve(sys.executable, run, env)
    return 0  # not reached


# -- release and name ----------------------------------------------------------------------


def _settled_state(job_id: str, wait: float) -> str:
    """The job's state once it has left the transient ones (or when `wait` runs out).

    An epilog runs while the job is COMPLETING, a requeue's as well as the last one's:
    only the state after that tells them apart. A controller busy with the very job that
    is ending may fail a query (socket timeout): that is asked again until `wait` runs
    out, as giving up would leave the job's generations behind for good."""
    deadline = time.monotonic() + wait
    while True:
        try:
            state = slurm_state(job_id)
        except SlurmCommandFailed as e:
            if time.monotonic() >= deadline:
                raise
            print(f"cpcoord slurm release: {e}: asking again", file=sys.stderr, flush=True)
            time.sleep(2.0)
            continue
        if state not in TRANSIENT or time.monotonic() >= deadline:
            return state
        time.sleep(1.0)


def release(args: argparse.Namespace) -> int:
    from cpcoord import slurm_batch as sb

    job_id = args.slurm_job_id or os.environ.get("SLURM_JOB_ID", "")
    env = dict(os.environ, SLURM_JOB_ID=job_id)
    if args.cluster is not None:
        env["SLURM_CLUSTER_NAME"] = args.cluster
    env.pop("CPCOORD_SLURM_JOB", None)
    s = SlurmEnv.from_environ(env)
    job = args.job or job_name(s, env)
    check_name(job)
    if not args.force:
        state = _settled_state(s.job_id, args.wait)
        if state and state not in ENDED:
            print(f"Slurm job {s.job_id} is {state}: generations of {job} kept")
            return 0
    with clientconn.connect(args) as c:
        n = sb.GrpcCoordinator(c).release(job, timeout=args.timeout)
    print(f"released {n} generations of {job} (`cpcoord gc` frees their space)")
    return 0
