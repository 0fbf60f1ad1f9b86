"""Slurm, process side: job and member names from Slurm's environment, and `resume`, the
one call a rank makes to register its state and get it back after a requeue.

    from cpcoord import client, slurm
    state = client.zeros(1 << 20)
    r = slurm.resume({"state": state})   # restored on a restart, untouched on a first run
    for step in range(int(state[0]) + 1, steps + 1): ...

Names (docs/slurm.md): the job is `slurm-<cluster>-<SLURM_JOB_ID>` (Slurm keeps the job id
across requeues, so the job keeps its generations), a rank is member `rank-<SLURM_PROCID>`.
`cpcoord slurm batch` exports CPCOORD_SLURM_JOB (the name) and, on a restart,
CPCOORD_SLURM_GENERATION (the generation every rank restores, fixed once for all ranks).

`resume` registers the regions, restores them when SLURM_RESTART_COUNT > 0, and last
registers a one-page region MARKER. The marker says "this rank holds its real state":
`cpcoord slurm batch` checkpoints only when every rank has it, so no generation ever holds
a rank that registered but had not restored yet (docs/decisions.md, "Slurm").
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cpcoord import client as local
from cpcoord.errors import NoSuchGeneration, NotInSlurmJob

MARKER = "cpcoord.slurm"
JOB_ENV = "CPCOORD_SLURM_JOB"
GENERATION_ENV = "CPCOORD_SLURM_GENERATION"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class SlurmEnv:
    """What a process learns of its Slurm job from the environment."""

    job_id: str
    cluster: str = ""
    procid: int | None = None  # SLURM_PROCID: set in srun tasks, not in the batch shell
    restart_count: int = 0
    ntasks: int | None = None

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> SlurmEnv:
        env = os.environ if env is None else env
        job_id = env.get("SLURM_JOB_ID", "").strip()
        if not job_id.isdigit():
            raise NotInSlurmJob("SLURM_JOB_ID", job_id or "unset")

        def num(name: str) -> int | None:
            v = env.get(name, "").strip()
            return int(v) if v.isdigit() else None

        return cls(
            job_id=job_id,
            cluster=env.get("SLURM_CLUSTER_NAME", "").strip(),
            procid=num("SLURM_PROCID"),
            restart_count=num("SLURM_RESTART_COUNT") or 0,
            ntasks=num("SLURM_NTASKS"),
        )

    @property
    def restarted(self) -> bool:
        return self.restart_count > 0


def job_name(s: SlurmEnv, env: Mapping[str, str] | None = None) -> str:
    """The cpcoord job of this Slurm job: CPCOORD_SLURM_JOB when the batch helper set it,
    else `slurm-<cluster>-<job id>`. The cluster is in it because job ids start again at
    1 on a new cluster (or a controller whose state was wiped)."""
    env = os.environ if env is None else env
    given = env.get(JOB_ENV, "").strip()
    if given:
        return given
    cluster = _UNSAFE.sub("-", s.cluster).strip("-.")[:40]
    return f"slurm-{cluster}-{s.job_id}" if cluster else f"slurm-{s.job_id}"


def member_name(s: SlurmEnv) -> str:
    if s.procid is None:
        raise NotInSlurmJob("SLURM_PROCID", "unset (run this under srun)")
    return f"rank-{s.procid}"


def pinned_generation(env: Mapping[str, str] | None = None) -> int | None:
    """The generation the batch helper chose for this restart: None when it chose none
    (no helper: restore the latest), 0 when the job has none (start over)."""
    env = os.environ if env is None else env
    v = env.get(GENERATION_ENV, "").strip()
    return int(v) if v.isdigit() else None


@dataclass(frozen=True)
class Resumed:
    restart_count: int
    generation: int  # restored from; 0 = started from the beginning
    nbytes: int = 0


def _say(msg: str) -> None:
    print(f"cpcoord slurm: {msg}", file=sys.stderr, flush=True)


def resume(regions: Mapping[str, Any], c: local.Client | None = None) -> Resumed:
    """Register `regions` (name -> page-aligned buffer, e.g. `client.zeros`); on a Slurm
    restart restore them from the job's generation; then mark this rank ready."""
    s = SlurmEnv.from_environ()
    c = c or local.default_client()
    for name, buf in regions.items():
        c.register(name, buf)
    generation, nbytes = 0, 0
    if s.restarted:
        want = pinned_generation()
        if want == 0:
            _say(f"restart {s.restart_count}: the job has no generation; starting over")
        else:
            try:
                r = c.restore(*regions, generation=want)
            except NoSuchGeneration:
                _say(f"restart {s.restart_count}: the job has no generation; starting over")
            else:
                generation, nbytes = r.generation, r.nbytes
                _say(
                    f"restart {s.restart_count}: rank {s.procid} restored generation "
                    f"{generation} of {c.job} ({nbytes} bytes)"
                )
    mark = local.zeros(local.PAGE_SIZE, dtype="uint8")
    info = {
        "slurm_job_id": s.job_id,
        "restart_count": s.restart_count,
        "restored_generation": generation,
    }
    raw = json.dumps(info).encode()
    memoryview(mark)[: len(raw)] = raw
    c.register(MARKER, mark)
    return Resumed(s.restart_count, generation, nbytes)
