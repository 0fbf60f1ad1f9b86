"""A private one-node Slurm (Debian's 22.05 packages: munge, slurmctld, slurmd) for
integration tests, all under one tmp dir, on free loopback ports, stopped by pid.

- munged with its own key and socket (in a 0755 directory under /tmp: job processes and
  the daemons must reach it; pytest's tmp_path is 0700);
- slurmctld -D and slurmd -D -N localhost with the settings known to work on a machine
  without systemd or cgroup delegation (proctrack/linuxproc, task/none, root as
  SlurmUser), the real CPU layout (`slurmd -C`), `cred_expire=5` and `sched_interval=1`
  so a requeued job runs again within seconds;
- two partitions for preemption: `low` (PreemptMode=REQUEUE, GraceTime) and `high`
  (a higher PriorityTier); `preempt_send_user_signal` makes the preemption deliver the
  job's --signal (B:USR1) to its batch shell at once.

`Slurm.close()` cancels every job, stops the daemons, then kills by pid any process
left whose environment names this instance's slurm.conf (slurmstepd daemonizes, so it is
not a child of slurmd; job processes inherit SLURM_CONF).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.daemons import public_tmpdir, wait_for
from tests.conftest import require

BINARIES = (
    "munged",
    "slurmctld",
    "slurmd",
    "sbatch",
    "srun",
    "scontrol",
    "squeue",
    "scancel",
    "sinfo",
)
NODE = "localhost"
GRACE_S = 60  # preemption grace: the job's handler requeues itself well before


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_slurm() -> None:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    require(
        not missing,
        f"Slurm/munge ({', '.join(missing)}): apt-get install slurmctld slurmd slurm-client munge",
    )


def _node_line() -> str:
    """`slurmd -C`'s first line, for node `localhost` on 127.0.0.1."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    line = out.splitlines()[0]
    words = [w for w in line.split() if not w.startswith(("NodeName=", "RealMemory="))]
    return f"NodeName={NODE} NodeAddr=127.0.0.1 {' '.join(words)} RealMemory=1000 State=UNKNOWN"


@dataclass
class Slurm:
    root: Path
    cluster: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def epilog(self) -> Path:
        """EpilogSlurmctld: does nothing until a test writes its own."""
        return self.root / "epilog.sh"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.sock"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        env.update(extra or {})
        return env

    # -- start ---------------------------------------------------------------------------

    def start(self) -> Slurm:
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(mode=0o755, exist_ok=True)
        self.epilog.write_text("#!/bin/sh\nexit 0\n")
        self.epilog.chmod(0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        self._spawn(
            "munged",
            [
                "munged",
                "-F",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={self.root / 'munge' / 'seed'}",
            ],
        )
        wait_for(self.munge_socket.exists, 20, "munged's socket")
        ctld, slurmd = free_port(), free_port()
        host = socket.gethostname().split(".")[0]
        r = self.root
        part = f"Nodes={NODE} MaxTime=INFINITE State=UP"
        self.conf.write_text(
            f"""\
ClusterName={self.cluster}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={slurmd}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
EpilogSlurmctld={self.epilog}
{_node_line()}
PartitionName=low {part} Default=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime={GRACE_S}
PartitionName=high {part} PriorityTier=10 PreemptMode=OFF
"""
        )
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(self.conf)])
        wait_for(self._node_idle, 60, "the Slurm node to be idle")
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 - owned by the child
        self.procs[name] = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
        )
        out.close()

    def _node_idle(self) -> bool:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise AssertionError(f"{name} exited {p.returncode}:\n{self.logs()}")
        r = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%t"],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        return r.returncode == 0 and set(r.stdout.split()) == {"idle"}  # one line per partition

    # -- use -------------------------------------------------------------------------------

    def cmd(self, *argv: str, check: bool = True, env: dict[str, str] | None = None) -> str:
        r = subprocess.run(
            list(argv), env=self.env(env), capture_output=True, text=True, timeout=60
        )
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr}")
        return r.stdout

    def sbatch(self, script: Path, *args: str, env: dict[str, str] | None = None) -> str:
        return self.cmd("sbatch", "--parsable", *args, str(script), env=env).strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ...)."""
        out = self.cmd("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_state(self, job_id: str, states: set[str], timeout: float = 120) -> dict[str, str]:
        def reached() -> dict[str, str] | None:
            j = self.job(job_id)
            return j if j.get("JobState") in states else None

        return wait_for(reached, timeout, f"Slurm job {job_id} in {sorted(states)}")

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-30:]
            parts.append(f"== {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- stop ------------------------------------------------------------------------------

    def close(self) -> None:
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self.cmd("scancel", "--full", "--state=RUNNING", check=False)
                self.cmd("scancel", "--state=PENDING", check=False)
                self.cmd("scancel", "-u", "root", check=False)
                wait_for(lambda: not self.cmd("squeue", "-h", check=False).strip(), 30, "no jobs")
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=15)
        for pid in self._leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _leftovers(self) -> Iterator[int]:
        mark = f"SLURM_CONF={self.conf}".encode()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                environ = (d / "environ").read_bytes()
            except OSError:
                continue
            if mark in environ.split(b"\0"):
                yield int(d.name)


@pytest.fixture
def slurm() -> Iterator[Slurm]:
    require_slurm()
    root = public_tmpdir("cpcoord-slurm-")
    s = Slurm(root, cluster=f"t{os.getpid()}x{os.urandom(2).hex()}")
    try:
        s.start()
        yield s
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)
