"""`cpcoord slurm`: run a Slurm job's ranks under cpcoord (docs/slurm.md). This module
holds the parser and the dispatch; the actions are in cli/slurm_actions.py.

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
import os
import re
from typing import Any

from cpcoord import clientconn
from cpcoord import config as cfgmod
from cpcoord.cli import slurm_actions
from cpcoord.slurm import member_name

NAME = "slurm"
HELP = "run a Slurm job's ranks under cpcoord: checkpoint, requeue, restore"
DESCRIPTION = __doc__.split("\n\n", 1)[1] if __doc__ else HELP
EPILOG = """\
examples (a batch script; docs/slurm.md):
  #SBATCH --ntasks=4 --requeue --open-mode=append --signal=B:USR1@120
  exec cpcoord slurm batch --every 15m -- srun cpcoord slurm run -- python train.py
  cpcoord slurm release --slurm-job-id 4242      # EpilogSlurmctld: generations of ended jobs"""


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


def client_config(args: argparse.Namespace) -> None:
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


def run(args: argparse.Namespace) -> int:
    action = args.slurm_action
    if action == "name":
        s, job = slurm_actions.names(args)
        print(job if s.procid is None else f"{job} {member_name(s)}")
        return 0
    client_config(args)
    if action == "batch":
        return slurm_actions.batch(args)
    if action == "run":
        return slurm_actions.run_rank(args)
    return slurm_actions.release(args)
