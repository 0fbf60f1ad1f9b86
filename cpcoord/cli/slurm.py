"""`cpcoord slurm`: run a Slurm job's ranks under cpcoord (docs/slurm.md).

- `batch -- CMD`: the batch script's last line (`exec cpcoord slurm batch ... -- srun ...`).
  Runs CMD, checkpoints the job every --every, and on Slurm's warning signal checkpoints
  once more (bounded) and requeues (cpcoord/slurm_batch.py holds the decisions).
- `run -- CMD`: what srun starts on each rank: `cpcoord run` with the names taken from
  Slurm's environment, once this node's agent is connected and a member of the same name
  left by the job's previous run (a requeue kills it) is detached.
- `release`: delete the generations of a Slurm job that ended for good (an
  EpilogSlurmctld, or by hand); `name`: print the job and member names.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

from cpcoord import clientconn
from cpcoord import config as cfgmod
from cpcoord.errors import CommandNotFound, CpcoordError, InvalidArgument, UnknownJob
from cpcoord.gen.v1 import coordinator_pb2
from cpcoord.ranges import check_name
from cpcoord.slurm import SlurmEnv, job_name, member_name
from cpcoord.slurm_ctl import ENDED, TRANSIENT, scontrol_requeue, slurm_state

NAME = "slurm"
HELP = "run a Slurm job's ranks under cpcoord: checkpoint, requeue, restore"
DESCRIPTION = __doc__.split("\n\n", 1)[1] if __doc__ else HELP
EPILOG = """\
examples (a batch script; docs/slurm.md):
  #SBATCH --ntasks=4 --requeue --open-mode=append --signal=B:USR1@120
  exec cpcoord slurm batch --every 15m -- srun cpcoord slurm run -- python train.py
  cpcoord slurm release --slurm-job-id 4242      # EpilogSlurmctld: generations of ended jobs"""

POLL_S = 0.2  # how soon the batch helper sees a signal or the command's exit


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `2h`, `1.5m` -> seconds (> 0)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration such as 90s, 15m or 2h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _action(
    sub: Any, name: str, help_: str, description: str, example: str
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help_,
        description=description,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--job", default="", help="cpcoord job name (default: slurm-CLUSTER-JOBID)")
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="slurm_action", metavar="ACTION")
    sub.required = True
    b = _action(
        sub,
        "batch",
        "run the job's command; checkpoint; requeue on Slurm's signal",
        "Run in the batch shell's place: exec cpcoord slurm batch -- srun ...",
        "cpcoord slurm batch --every 15m -- srun cpcoord slurm run -- python3 train.py",
    )
    b.add_argument(
        "--every",
        type=parse_duration,
        default=None,
        metavar="DURATION",
        help="checkpoint the job this often (90s, 15m, 2h; default: only on the signal)",
    )
    b.add_argument(
        "--checkpoint-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="bound of each checkpoint, the one before a requeue included (60)",
    )
    b.add_argument(
        "--ranks",
        type=int,
        default=None,
        metavar="N",
        help="ranks that must be ready before a checkpoint (default: $SLURM_NTASKS)",
    )
    b.add_argument(
        "--signal",
        default="USR1",
        metavar="SIG",
        help="Slurm's warning signal (--signal=B:SIG@N; default USR1)",
    )
    b.add_argument(
        "--no-requeue",
        action="store_true",
        help="checkpoint on the signal but leave the requeue to Slurm",
    )
    b.add_argument(
        "--keep", action="store_true", help="keep the job's generations when the command succeeds"
    )
    b.add_argument(
        "--connect-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="wait this long for the coordinator at start (300)",
    )
    clientconn.add_arguments(b)
    b.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    r = _action(
        sub,
        "run",
        "run one rank (under srun) as member rank-$SLURM_PROCID",
        "Run under srun: cpcoord run with the names from Slurm's environment.",
        "cpcoord slurm run -- python3 train.py       # what srun starts, once per rank",
    )
    r.add_argument("--member", default="", help="member name (default: rank-$SLURM_PROCID)")
    r.add_argument(
        "--node",
        default="",
        help="this node's agent (default: $CPCOORD_NODE, else $SLURMD_NODENAME)",
    )
    r.add_argument("--tracker", default="", help="preferred tracker backend")
    r.add_argument(
        "--connect-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="wait this long for this node's agent to be connected (300)",
    )
    clientconn.add_arguments(r)
    r.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    rel = _action(
        sub,
        "release",
        "delete the generations of a Slurm job that has ended",
        "Delete the generations of a Slurm job once Slurm says it ended for good\n"
        "(never while it is pending, requeued or running). For EpilogSlurmctld.",
        "cpcoord slurm release --wait 600 --slurm-job-id 4242 --cluster hpc",
    )
    rel.add_argument(
        "--slurm-job-id", default="", metavar="ID", help="the Slurm job (default: $SLURM_JOB_ID)"
    )
    rel.add_argument("--cluster", default=None, help="its cluster (default: $SLURM_CLUSTER_NAME)")
    rel.add_argument("--force", action="store_true", help="do not ask Slurm whether it ended")
    rel.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="while the job is still completing, wait this long for its next state",
    )
    clientconn.add_arguments(rel)

    _action(
        sub,
        "name",
        "print this Slurm job's cpcoord job (and member) name",
        "Print the job name, and the member name inside an srun task.",
        "cpcoord slurm name          # slurm-hpc-4242 (and rank-3 under srun)",
    )


# -- helpers -------------------------------------------------------------------------------


def _client_config(args: argparse.Namespace) -> None:
    """The config file's [client] table as defaults of the nested action (the top-level
    config.apply sees only first-level subcommands); environment and command line win."""
    cfg = cfgmod.load(getattr(args, "config", None))
    for k, val in cfg.client.items():
        env = cfgmod.ENV_OF.get(k, "")
        if env and os.environ.get(env):
            continue
        if k == "timeout":
            continue  # has a built-in default; the command line sets it
        if getattr(args, k, None) in (None, False):
            setattr(args, k, val)


def _command(args: argparse.Namespace) -> list[str]:
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise InvalidArgument("give the command to run after --")
    return argv


def _names(args: argparse.Namespace) -> tuple[SlurmEnv, str]:
    s = SlurmEnv.from_environ()
    job = args.job or job_name(s)
    check_name(job)
    return s, job


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


# -- batch ---------------------------------------------------------------------------------


def _batch(args: argparse.Namespace) -> int:
    from cpcoord import slurm_batch as sb

    s, job = _names(args)
    argv = _command(args)
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
        code = _exit_code(proc.returncode)
        sup.finished(code, terminated=got["term"])
    return code


# -- run -----------------------------------------------------------------------------------


def _wait_agent(c: Any, node: str, timeout: float) -> None:
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


def _detach_stale(c: Any, job: str, member: str, wait: float = 30.0) -> None:
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


def _run(args: argparse.Namespace) -> int:
    s, job = _names(args)
    member = args.member or member_name(s)
    check_name(member)
    node = args.node or os.environ.get("CPCOORD_NODE", "") or os.environ.get("SLURMD_NODENAME", "")
    argv = _command(args)
    with clientconn.connect(args) as c:
        _wait_agent(c, node, args.connect_timeout)
        _detach_stale(c, job, member)
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


def _release(args: argparse.Namespace) -> int:
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
        deadline = time.monotonic() + args.wait
        while True:
            # An epilog runs while the job is COMPLETING, a requeue's as well as the
            # last one's: only the state after that tells them apart.
            state = slurm_state(s.job_id)
            if state not in TRANSIENT or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        if state and state not in ENDED:
            print(f"Slurm job {s.job_id} is {state}: generations of {job} kept")
            return 0
    with clientconn.connect(args) as c:
        n = sb.GrpcCoordinator(c).release(job, timeout=args.timeout)
    print(f"released {n} generations of {job} (`cpcoord gc` frees their space)")
    return 0


def run(args: argparse.Namespace) -> int:
    action = args.slurm_action
    if action == "name":
        s, job = _names(args)
        print(job if s.procid is None else f"{job} {member_name(s)}")
        return 0
    _client_config(args)
    if action == "batch":
        return _batch(args)
    if action == "run":
        return _run(args)
    return _release(args)
