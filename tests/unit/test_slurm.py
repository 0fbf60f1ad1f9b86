"""The Slurm integration's decisions without Slurm: names from the environment, the
batch supervisor (cpcoord/slurm_batch.py) over a scripted coordinator, durations.
tests/integration/test_slurm.py runs the real thing."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cpcoord.api import values as v
from cpcoord.cli import build_parser
from cpcoord.cli.slurm import client_config, parse_duration
from cpcoord.errors import (
    CoordinatorUnavailable,
    CpcoordError,
    GenerationAborted,
    JobBusy,
    NotInSlurmJob,
    SlurmCommandFailed,
)
from cpcoord.slurm import SlurmEnv, job_name, member_name, pinned_generation
from cpcoord.slurm_batch import Options, Supervisor
from cpcoord.slurm_ctl import ENDED, TRANSIENT, slurm_state

# -- names ---------------------------------------------------------------------------------


def test_names_from_the_environment() -> None:
    env = {"SLURM_JOB_ID": "4242", "SLURM_CLUSTER_NAME": "hpc", "SLURM_PROCID": "3"}
    s = SlurmEnv.from_environ(env)
    assert (s.job_id, s.procid, s.restart_count, s.restarted) == ("4242", 3, 0, False)
    assert job_name(s, env) == "slurm-hpc-4242"
    assert member_name(s) == "rank-3"
    restarted = SlurmEnv.from_environ({**env, "SLURM_RESTART_COUNT": "2", "SLURM_NTASKS": "8"})
    assert restarted.restarted and restarted.ntasks == 8
    # The batch helper's choice wins; a cluster name is made safe as a job name.
    assert job_name(s, {**env, "CPCOORD_SLURM_JOB": "mine"}) == "mine"
    odd = SlurmEnv("7", cluster="my cluster/x")
    assert job_name(odd, {}) == "slurm-my-cluster-x-7"
    assert job_name(SlurmEnv("7"), {}) == "slurm-7"


@pytest.mark.parametrize("env", [{}, {"SLURM_JOB_ID": ""}, {"SLURM_JOB_ID": "12abc"}])
def test_outside_a_job_is_a_clear_error(env: dict[str, str]) -> None:
    with pytest.raises(NotInSlurmJob, match="SLURM_JOB_ID"):
        SlurmEnv.from_environ(env)


def test_member_needs_srun() -> None:
    with pytest.raises(NotInSlurmJob, match="srun"):
        member_name(SlurmEnv("1"))


def test_pinned_generation() -> None:
    assert pinned_generation({}) is None
    assert pinned_generation({"CPCOORD_SLURM_GENERATION": "0"}) == 0
    assert pinned_generation({"CPCOORD_SLURM_GENERATION": "17"}) == 17


def test_durations() -> None:
    assert parse_duration("90") == 90
    assert parse_duration("90s") == 90
    assert parse_duration("15m") == 900
    assert parse_duration("1.5h") == 5400
    for bad in ("", "0", "-5m", "5d", "m"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)


# -- the supervisor ------------------------------------------------------------------------


def gen(n: int, finished_s: float = 1000.0) -> v.Generation:
    return v.Generation(
        "j", n, None, v.GenerationState.COMMITTED, finished_unix_ms=int(finished_s * 1000)
    )


@dataclass
class FakeCoordinator:
    """Scripted answers; each list is consumed from the front (its last entry repeats)."""

    newest_: list[v.Generation | CpcoordError | None] = field(default_factory=lambda: [None])
    ready: list[str] = field(default_factory=lambda: [""])
    results: list[v.Generation | CpcoordError] = field(default_factory=list)
    released: int = 0
    calls: list[str] = field(default_factory=list)

    @staticmethod
    def _next(items: list) -> object:  # type: ignore[type-arg]
        return items.pop(0) if len(items) > 1 else items[0]

    def newest(self, job: str, timeout: float) -> v.Generation | None:
        self.calls.append("newest")
        got = self._next(self.newest_)
        if isinstance(got, CpcoordError):
            raise got
        return got  # type: ignore[return-value]

    def not_ready(self, job: str, ranks: int | None, timeout: float) -> str:
        self.calls.append("not_ready")
        return str(self._next(self.ready))

    def checkpoint(self, job: str, timeout: float) -> v.Generation:
        self.calls.append("checkpoint")
        got = self.results.pop(0)
        if isinstance(got, CpcoordError):
            raise got
        return got

    def release(self, job: str, timeout: float) -> int:
        self.calls.append("release")
        return self.released


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def make(
    coord: FakeCoordinator, restart: int = 0, **opts: object
) -> tuple[Supervisor, list[str], Clock]:
    requeued: list[str] = []
    clock = Clock()
    sup = Supervisor(
        Options(job="j", **opts),  # type: ignore[arg-type]
        coord,
        SlurmEnv("42", restart_count=restart),
        lambda: requeued.append("requeue"),
        clock=clock,
        wall=lambda: 1010.0,
        sleep=clock.sleep,
    )
    return sup, requeued, clock


def messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


def test_first_run_exports_the_job_only() -> None:
    sup, _, _ = make(FakeCoordinator())
    assert sup.prepare() == {"CPCOORD_SLURM_JOB": "j"}


def test_restart_fixes_the_generation_every_rank_restores() -> None:
    sup, _, _ = make(FakeCoordinator(newest_=[gen(7)]), restart=1)
    assert sup.prepare() == {"CPCOORD_SLURM_JOB": "j", "CPCOORD_SLURM_GENERATION": "7"}
    sup, _, _ = make(FakeCoordinator(newest_=[None]), restart=1)
    assert sup.prepare()["CPCOORD_SLURM_GENERATION"] == "0"  # none: start over


def test_prepare_waits_for_the_coordinator_then_gives_up() -> None:
    down = CoordinatorUnavailable("c:1", "refused")
    coord = FakeCoordinator(newest_=[down, down, gen(3)])
    sup, _, clock = make(coord, restart=1, connect_timeout=60.0)
    assert sup.prepare()["CPCOORD_SLURM_GENERATION"] == "3"
    assert clock.t == 4.0
    sup, _, clock = make(FakeCoordinator(newest_=[down]), connect_timeout=10.0)
    with pytest.raises(CoordinatorUnavailable):
        sup.prepare()
    assert 10.0 <= clock.t <= 12.0


def test_tick_checkpoints_only_when_ready(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "cpcoord.slurm")
    coord = FakeCoordinator(ready=["not attached: rank-1", ""], results=[gen(1)])
    sup, requeued, _ = make(coord)
    assert sup.tick() is None
    assert coord.calls == ["not_ready"]  # no checkpoint of a half-restored job
    assert sup.tick() == gen(1)
    assert sup.last == gen(1)
    coord.results.append(GenerationAborted(2, "j", "agent_lost", ""))
    assert sup.tick() is None  # logged; the next tick tries again
    assert sup.last == gen(1) and requeued == []
    assert "checkpoint failed" in messages(caplog)


def test_preempt_checkpoints_then_requeues(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "cpcoord.slurm")
    coord = FakeCoordinator(results=[gen(5)])
    sup, requeued, _ = make(coord)
    assert sup.preempt() == gen(5)
    assert requeued == ["requeue"]
    assert "checkpoint before requeue committed: generation 5" in messages(caplog)
    assert sup.preempted


def test_preempt_waits_out_a_busy_job_within_the_bound() -> None:
    busy = JobBusy("j", 4)
    coord = FakeCoordinator(results=[busy, busy, gen(5)])
    sup, requeued, clock = make(coord, timeout=10.0)
    assert sup.preempt() == gen(5)
    assert clock.t == 2.0 and requeued == ["requeue"]
    coord = FakeCoordinator(results=[busy] * 20)
    sup, requeued, clock = make(coord, timeout=3.0)
    assert sup.preempt() is None
    assert clock.t <= 3.0 and requeued == ["requeue"]


@pytest.mark.parametrize(
    "failure",
    [
        CoordinatorUnavailable("c:1", "no answer within 5 s"),
        GenerationAborted(9, "j", "agent_lost", "node-b"),
    ],
)
def test_a_failed_checkpoint_never_blocks_the_requeue(
    failure: CpcoordError, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "cpcoord.slurm")
    coord = FakeCoordinator(newest_=[gen(8, finished_s=1000.0)], results=[gen(8), failure])
    sup, requeued, _ = make(coord)
    sup.tick()
    assert sup.preempt() is None
    assert requeued == ["requeue"]
    said = messages(caplog)
    assert (
        "checkpoint before requeue FAILED: requeueing anyway; the job restarts from "
        "generation 8, committed 10 s ago, its last good one" in said
    )
    assert str(failure) in [getattr(r, "fields", {}).get("error") for r in caplog.records]


def test_unreachable_and_never_checkpointed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "cpcoord.slurm")
    down = CoordinatorUnavailable("c:1", "refused")
    coord = FakeCoordinator(newest_=[down], ready=[""], results=[down])
    sup, requeued, _ = make(coord)
    sup.preempt()
    assert requeued == ["requeue"]
    assert "it restarts from the beginning" in messages(caplog)


def test_ranks_not_ready_at_preemption_requeue_without_checkpoint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "cpcoord.slurm")
    coord = FakeCoordinator(newest_=[gen(3)], ready=["not resumed yet: rank-0"])
    sup, requeued, _ = make(coord, restart=1)
    sup.prepare()
    assert sup.preempt() is None
    assert "checkpoint" not in coord.calls and requeued == ["requeue"]
    assert "restarts from generation 3" in messages(caplog)


def test_no_requeue_option_leaves_it_to_slurm() -> None:
    sup, requeued, _ = make(FakeCoordinator(results=[gen(1)]), requeue=False)
    sup.preempt()
    assert requeued == []


@pytest.mark.parametrize(
    ("code", "terminated", "preempted", "release", "want"),
    [
        (0, False, False, True, True),  # finished: nothing will restore them
        (1, False, False, True, False),  # failed: kept for whoever looks into it
        (0, True, False, True, False),  # Slurm ended it (cancel, requeue, time limit)
        (0, False, True, True, False),  # requeued: the restart needs them
        (0, False, False, False, False),  # --keep
    ],
)
def test_release_only_when_the_command_succeeded_on_its_own(
    code: int, terminated: bool, preempted: bool, release: bool, want: bool
) -> None:
    coord = FakeCoordinator(results=[gen(1)], released=4)
    sup, _, _ = make(coord, release=release)
    if preempted:
        sup.preempt()
    sup.finished(code, terminated)
    assert ("release" in coord.calls) is want


# -- the command's own pieces ----------------------------------------------------------------


def test_slurm_state_from_scontrol(tmp_path: Path) -> None:
    fake = tmp_path / "scontrol"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$4" in\n'
        "  5) echo 'JobId=5 JobName=train UserId=u(1) JobState=COMPLETING Reason=None' ;;\n"
        "  6) echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1 ;;\n"
        "  *) echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1 ;;\n"
        "esac\n"
    )
    fake.chmod(0o755)
    assert slurm_state("5", str(fake)) == "COMPLETING"
    assert slurm_state("6", str(fake)) == ""  # purged: Slurm no longer knows it
    with pytest.raises(SlurmCommandFailed, match="Unable to contact"):
        slurm_state("7", str(fake))
    assert "COMPLETING" in TRANSIENT and not TRANSIENT & ENDED and "PENDING" not in ENDED


def test_nested_actions_take_the_client_table_of_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[client]\ncoordinator = "coord:7420"\ninsecure = true\n')
    monkeypatch.delenv("CPCOORD_COORDINATOR", raising=False)
    monkeypatch.delenv("CPCOORD_INSECURE", raising=False)
    args = build_parser().parse_args(["--config", str(cfg), "slurm", "run", "--", "true"])
    client_config(args)
    assert (args.coordinator, args.insecure) == ("coord:7420", True)
    # The command line and the environment win over the file.
    args = build_parser().parse_args(
        ["--config", str(cfg), "slurm", "run", "--coordinator", "x:1", "--", "true"]
    )
    monkeypatch.setenv("CPCOORD_INSECURE", "0")
    client_config(args)
    assert (args.coordinator, args.insecure) == ("x:1", False)
