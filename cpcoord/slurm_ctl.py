"""Slurm's own commands, as the integration uses them: `scontrol requeue` and a job's
state (`scontrol show job`). Errors are SlurmCommandFailed with Slurm's own words."""

from __future__ import annotations

import re
import subprocess

from cpcoord.errors import SlurmCommandFailed

# Slurm job states on the way to the next one (an epilog sees COMPLETING).
TRANSIENT = frozenset({"COMPLETING", "CONFIGURING", "REQUEUED", "RESIZING", "SIGNALING"})
# Slurm job states after which the job never runs again (squeue/scontrol JobState).
ENDED = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)


def scontrol_requeue(job_id: str, scontrol: str = "scontrol") -> None:
    """Put the job back into the queue (Slurm ends its current run)."""
    try:
        r = subprocess.run(
            [scontrol, "requeue", job_id], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmCommandFailed(f"{scontrol} requeue {job_id}", str(e)) from None
    if r.returncode != 0:
        why = (r.stderr or r.stdout).strip() or f"exit {r.returncode}"
        raise SlurmCommandFailed(f"{scontrol} requeue {job_id}", why)


def slurm_state(job_id: str, scontrol: str = "scontrol") -> str:
    """JobState of a Slurm job as scontrol shows it; "" when Slurm no longer knows it."""
    try:
        r = subprocess.run(
            [scontrol, "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmCommandFailed(f"{scontrol} show job {job_id}", str(e)) from None
    if r.returncode != 0:
        if "Invalid job id" in r.stderr:
            return ""
        raise SlurmCommandFailed(f"{scontrol} show job {job_id}", r.stderr.strip())
    m = re.search(r"\bJobState=(\S+)", r.stdout)
    return m.group(1) if m else ""
