"""Slurm drives cpcoord, end to end: a real one-node Slurm 22.05 (munge,
slurmctld, slurmd; tests/helpers/slurm.py), a real coordinator and agent, and a two-rank
batch job written the way docs/slurm.md says:

    exec cpcoord slurm batch --every 2s -- srun cpcoord slurm run -- python slurm_rank.py

Each rank computes an iterative result held in one registered NumPy array
(tests/helpers/slurm_rank.py), paced by the test through a budget file, so the test
knows where every rank stands. A higher-priority job on partition `high` preempts it
(PreemptMode=REQUEUE; preempt_send_user_signal delivers the job's B:USR1 to the batch
helper), which checkpoints the job and requeues it; Slurm starts it again
(SLURM_RESTART_COUNT=1), every rank restores and the job finishes with exactly the
result of an uninterrupted run. Then the same with the coordinator hung (SIGSTOP) at
preemption: the job still requeues, from the previous generation, and says so.
"""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cpcoord.api import Client
from cpcoord.errors import UnknownJob
from testbed.cluster import Cluster
from testbed.daemons import REPO, public_tmpdir, wait_for
from tests.helpers import slurm_rank
from tests.helpers.slurm import NODE, Slurm, slurm
from tests.helpers.socket_cluster import start_socket_agent

pytestmark = pytest.mark.integration
__all__ = ["slurm"]  # fixture used by name

TOTAL = 100
FIRST, PREEMPT_AT = 40, 70  # the ranks wait at these steps (budget file)
RANK = Path(slurm_rank.__file__)
TEMPLATE = REPO / "deploy" / "slurm" / "cpcoord-job.sbatch"
EPILOG = REPO / "deploy" / "slurm" / "epilog-slurmctld.sh"


@dataclass
class Stack:
    slurm: Slurm
    cluster: Cluster
    socket: Path
    work: Path

    def api(self) -> Client:
        return Client(self.cluster.address, insecure=True, timeout=10)

    def job_env(self) -> dict[str, str]:
        return {
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "CPCOORD_CONFIG": "/dev/null",
            "CPCOORD_COORDINATOR": self.cluster.address,
            "CPCOORD_INSECURE": "1",
            "CPCOORD_AGENT_SOCKET": str(self.socket),
        }

    def committed(self, job: str) -> list[int]:
        with self.api() as c:
            try:
                return sorted(g.number for g in c.generations(job) if g.committed)
            except UnknownJob:
                return []

    def logs(self) -> str:
        out = [self.cluster.logs(), self.slurm.logs()]
        said = sorted(self.work.glob("*.out")) + sorted(self.work.glob("rank-*.log"))
        for f in [*said, *self.work.glob("epilog.log")]:
            out.append(f"== {f.name}\n" + "\n".join(f.read_text().splitlines()[-40:]))
        return "\n".join(out)


@pytest.fixture
def stack(slurm: Slurm, tmp_path: Path) -> Iterator[Stack]:
    """A coordinator and one agent named like the Slurm node, serving the local API."""
    sockdir = public_tmpdir("cpcoord-slurm-sock-")
    sock = sockdir / "agent.sock"
    c = Cluster(tmp_path / "cluster", nodes=(), keep=50)
    c.root.mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    try:
        c.start()
        start_socket_agent(c, sock, NODE)
        install_epilog(slurm, c, work)
        yield Stack(slurm, c, sock, work)
    finally:
        slurm.close()  # the job's processes go before the agent they talk to
        c.close()
        import shutil

        shutil.rmtree(sockdir, ignore_errors=True)


def install_epilog(slurm: Slurm, c: Cluster, work: Path) -> None:
    """The shipped EpilogSlurmctld, with `cpcoord` on its PATH and this coordinator as
    the one its config would name; what it says goes to work/epilog.log."""
    bin_dir = work / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "cpcoord"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m cpcoord "$@"\n')
    shim.chmod(0o755)
    logger = bin_dir / "logger"  # syslog stands in: the release's messages, to a file
    logger.write_text(f"#!/bin/sh\ncat >> {work}/epilog.log\n")
    logger.chmod(0o755)
    slurm.epilog.write_text(
        f"""#!/bin/sh
export PATH={bin_dir}:$PATH PYTHONPATH={REPO} CPCOORD_CONFIG=/dev/null
export SLURM_CONF={slurm.conf} CPCOORD_COORDINATOR={c.address} CPCOORD_INSECURE=1
echo "epilog started for job $SLURM_JOB_ID" >> {work}/epilog.log
exec {EPILOG}
"""
    )


# -- the job ---------------------------------------------------------------------------------


def submit(st: Stack, timeout_s: int) -> tuple[str, str, Path]:
    """Submit the shipped batch script (deploy/slurm/cpcoord-job.sbatch) with two ranks,
    a 2 s interval and the test's program; (Slurm job id, cpcoord job name, output)."""
    py = sys.executable
    text = TEMPLATE.read_text()
    for old, new in (
        ("--ntasks=4", "--ntasks=2"),
        ("exec cpcoord slurm batch", f"exec {py} -m cpcoord slurm batch"),
        ("srun cpcoord slurm run", f"srun {py} -m cpcoord slurm run"),
        ("--every 15m --checkpoint-timeout 120", f"--every 2s --checkpoint-timeout {timeout_s}"),
        ("python3 train.py", f"{py} {RANK} {st.work} {TOTAL}"),
        (
            "#SBATCH --job-name=train\n",
            f"#SBATCH --job-name=train\n#SBATCH --partition=low\n"
            f"#SBATCH --output={st.work}/slurm-%j.out\n",
        ),
    ):
        assert old in text, f"{TEMPLATE.name} lost {old!r}"
        text = text.replace(old, new)
    script = st.work / "job.sh"
    script.write_text(text)
    set_budget(st, FIRST)
    job_id = st.slurm.sbatch(script, env=st.job_env())
    return job_id, f"slurm-{st.slurm.cluster}-{job_id}", st.work / f"slurm-{job_id}.out"


def set_budget(st: Stack, n: int) -> None:
    tmp = st.work / "budget.tmp"
    tmp.write_text(str(n))
    tmp.replace(st.work / "budget")


@dataclass(frozen=True)
class Run:
    start: dict[str, str]
    steps: list[int]
    result: dict[str, str]


def runs(st: Stack, rank: int) -> list[Run]:
    """The rank's runs, from its log: one per Slurm start of the job."""
    path = st.work / f"rank-{rank}.log"
    out: list[Run] = []
    text = path.read_text() if path.exists() else ""
    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        if word == "start":
            out.append(Run(dict(re.findall(r"(\w+)=(\S+)", rest)), [], {}))
        elif word == "step" and out:
            out[-1].steps.append(int(rest))
        elif word == "result" and out:
            out[-1].result.update(re.findall(r"(\w+)=(\S+)", rest))
    return out


def last_step(run: Run) -> int:
    return run.steps[-1] if run.steps else int(run.start.get("step", 0))


def at_step(st: Stack, run: int, step: int) -> bool:
    """Both ranks are in their run number `run` (0 = first) and have done step `step`."""
    for rank in (0, 1):
        rs = runs(st, rank)
        if len(rs) <= run or last_step(rs[run]) != step:
            return False
    return True


def preempt(st: Stack) -> str:
    """A job of the higher tier that needs the whole node: Slurm preempts ours."""
    return st.slurm.cmd(
        "sbatch",
        "--parsable",
        "--partition=high",
        "--ntasks=1",
        "--exclusive",
        f"--output={st.work}/high-%j.out",
        "--wrap",
        "true",
    ).strip()


def wait_committed_at_first(st: Stack, job: str) -> int:
    """Once both ranks wait at step FIRST, a periodic generation committed after that
    holds exactly step FIRST for both; its number."""
    wait_for(lambda: at_step(st, 0, FIRST), 120, f"both ranks at step {FIRST}")
    seen = set(st.committed(job))
    return int(
        wait_for(
            lambda: max(set(st.committed(job)) - seen, default=0),
            60,
            "a periodic generation with both ranks at step 40",
        )
    )


def finish(st: Stack, job_id: str) -> dict[str, str]:
    """Once both ranks started again, let them run to the end; the job's final state."""
    wait_for(lambda: all(len(runs(st, r)) > 1 for r in (0, 1)), 120, "both ranks restarted")
    set_budget(st, TOTAL)
    return st.slurm.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=180)


def check_result(st: Stack, restored_step: int, restored_gen: int) -> None:
    """Every rank ran twice: steps 1..PREEMPT_AT, killed, restored at `restored_step` from
    `restored_gen`, then the rest; its result is the uninterrupted one."""
    for rank in (0, 1):
        first, second = runs(st, rank)
        assert first.start == {"restart": "0", "generation": "0", "step": "0"}
        assert first.steps == list(range(1, PREEMPT_AT + 1))
        assert second.start == {
            "restart": "1",
            "generation": str(restored_gen),
            "step": str(restored_step),
        }
        assert second.steps == list(range(restored_step + 1, TOTAL + 1))
        assert second.result == {
            "step": str(TOTAL),
            "digest": str(slurm_rank.uninterrupted(TOTAL, rank)),
        }
        # Work done twice: the steps after the generation it restored.
        redone = len(first.steps) + len(second.steps) - TOTAL
        assert redone == PREEMPT_AT - restored_step
        assert redone <= PREEMPT_AT - FIRST  # at most one interval of work


# -- preemption -------------------------------------------------------------------------------


def test_preempted_job_checkpoints_requeues_restores_and_finishes(stack: Stack) -> None:
    st = stack
    job_id, job, out = submit(st, timeout_s=60)
    try:
        periodic = wait_committed_at_first(st, job)
        set_budget(st, PREEMPT_AT)
        wait_for(lambda: at_step(st, 0, PREEMPT_AT), 60, f"both ranks at step {PREEMPT_AT}")
        preempt(st)
        wait_for(lambda: "requeued" in out.read_text(), 120, "the requeue")
        text = out.read_text()
        m = re.search(r"checkpoint before requeue committed: generation (\d+)", text)
        assert m, text
        final = int(m.group(1))
        assert final > periodic
        job_state = finish(st, job_id)
    except BaseException:
        print(st.logs())
        raise
    print(out.read_text())  # the job's log, shown with -s
    assert job_state["JobState"] == "COMPLETED", st.logs()
    assert job_state["Restarts"] == "1"
    check_result(st, restored_step=PREEMPT_AT, restored_gen=final)
    # The job finished: its generations were released.
    assert st.committed(job) == [], st.logs()
    assert "generations released" in out.read_text()


# -- a failed checkpoint -----------------------------------------------------------------------


def test_coordinator_unreachable_at_preemption_requeues_from_previous_generation(
    stack: Stack,
) -> None:
    st = stack
    job_id, job, out = submit(st, timeout_s=5)
    coord = st.cluster.coordinator
    assert coord is not None
    try:
        seen = wait_committed_at_first(st, job)
        # The helper has had the answer too: it knows a good generation when it hangs.
        wait_for(lambda: f"generation={seen} " in out.read_text(), 60, "the helper's commit")
        assert coord.proc is not None
        coord.proc.send_signal(signal.SIGSTOP)  # hung: connects, never answers
        set_budget(st, PREEMPT_AT)
        wait_for(lambda: at_step(st, 0, PREEMPT_AT), 120, f"both ranks at step {PREEMPT_AT}")
        preempt(st)
        wait_for(lambda: "requeued" in out.read_text(), 120, "the requeue")
        text = out.read_text()
        m = re.search(
            r"checkpoint before requeue FAILED: requeueing anyway; the job restarts from "
            r"generation (\d+)",
            text,
        )
        assert m, text
        previous = int(m.group(1))
        assert previous >= seen
        # The coordinator comes back (killed while hung, started again on its port).
        coord.kill()
        st.cluster.start_coordinator()
        job_state = finish(st, job_id)
    except BaseException:
        print(st.logs())
        raise
    print(out.read_text())  # the job's log, shown with -s
    assert job_state["JobState"] == "COMPLETED", st.logs()
    assert job_state["Restarts"] == "1"
    # The ranks restore the generation the restarted helper chose, at step FIRST: the
    # one the message named, or one that committed as the coordinator hung (the helper
    # could not know; every generation taken with the ranks at FIRST holds the same).
    m = re.search(r"restart: ranks restore generation (\d+)", out.read_text())
    assert m, out.read_text()
    restored = int(m.group(1))
    assert restored >= previous
    check_result(st, restored_step=FIRST, restored_gen=restored)
    assert st.committed(job) == [], st.logs()


# -- retention: a job that ended for good --------------------------------------------------


def test_cancelled_job_generations_released_by_the_epilog(stack: Stack) -> None:
    """A cancelled job never runs again: its batch helper is terminated (it releases
    nothing), and the shipped EpilogSlurmctld releases the job's generations once Slurm
    says the job ended (a requeue's epilog keeps them: the tests above restore)."""
    st = stack
    job_id, job, out = submit(st, timeout_s=30)
    epilog = st.work / "epilog.log"
    try:
        wait_committed_at_first(st, job)
        st.slurm.cmd("scancel", job_id)
        st.slurm.wait_state(job_id, {"CANCELLED"})
        wait_for(
            lambda: epilog.exists() and f"generations of {job}" in epilog.read_text(),
            120,
            "the epilog's release",
        )
    except BaseException:
        print(st.logs())
        print(st.slurm.cmd("scontrol", "show", "job", "-o", job_id, check=False))
        raise
    said = epilog.read_text()
    m = re.search(rf"released (\d+) generations of {job}\b", said)
    assert m and int(m.group(1)) >= 1, said
    assert st.committed(job) == []
    assert "generations released" not in out.read_text()  # not by the batch helper
