"""Freeze under churn: a bounded stress run through the real
coordinator and agent, and `cpcoord capture`, against processes that make freezing hard
(tests/helpers/c/freeze_target.c, each checking its own memory and threads):

- `churn`: threads created and exiting in a tight loop;
- `vfork`: a thread that vforks over and over, every tenth child sleeping longer than
  the agent's freeze may take (those checkpoints abort with freeze_timeout);
- `leader`: its main thread called pthread_exit;
- `stopped`: SIGSTOP'd by the test before it all starts; it must stay stopped;
- `racer`: the test sends it SIGSTOP and SIGCONT at random all along;
- `traced`: held by strace, in a job of its own: refused with a clear message, untouched.

Between the operations (checkpoints, some aborted; the agent killed, and once stopped
with SIGTERM, mid-checkpoint and restarted; local captures) every process that was
running runs again within the lease + 1 s (no thread in a stop), and the stopped one is
in group-stop (T), never left in a ptrace stop (t). At the end every target is let go
and must exit 0 (its self-checks).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cpcoord.api import Client, Generation
from testbed.cluster import Cluster
from testbed.daemons import REPO, daemon_env, wait_for
from tests.conftest import require
from tests.helpers.freeze_c import FreezeTarget, build_freeze_target, states

# Its subject is the process, not the store: the S3 pass does not rerun it (stores.py).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.not_about_store]
LEASE_MS = 2000  # the agent's freeze gives up after min(5 s, lease): 2 s
BUDGET_S = 30.0  # the loop stops starting operations after this long
JOB = "stress"


def ptrace_stopped(pid: int) -> bool:
    return any(s == "t" for s in states(pid).values())


def group_stopped(pid: int) -> bool:
    """Every thread in group-stop (T), none in a ptrace stop."""
    st = [s for s in states(pid).values() if s not in "ZX"]
    return bool(st) and all(s == "T" for s in st)


def running(pid: int) -> bool:
    return not any(s in "tT" for s in states(pid).values())


class Racer:
    """SIGSTOP / SIGCONT at random intervals to one process, on its own thread."""

    def __init__(self, pid: int, seed: int) -> None:
        self.pid, self.rng = pid, random.Random(seed)
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            os.kill(self.pid, signal.SIGSTOP)
            time.sleep(self.rng.uniform(0, 0.05))
            os.kill(self.pid, signal.SIGCONT)
            self.sent += 2
            self.stop.wait(self.rng.uniform(0, 0.1))

    def end(self) -> None:
        self.stop.set()
        self.thread.join(10)
        os.kill(self.pid, signal.SIGCONT)


@pytest.fixture
def exe(tmp_path: Path) -> Path:
    return build_freeze_target(tmp_path)


@pytest.fixture
def targets(exe: Path) -> Iterator[dict[str, FreezeTarget]]:
    made: dict[str, FreezeTarget] = {}
    try:
        made["churn"] = FreezeTarget(exe, "churn", 16, 4)
        # Children of 0..100 ms, and one in 100 of 2.5 s: ~30% of the time in a long one.
        made["vfork"] = FreezeTarget(exe, "vfork-loop", 16, 100, 2500, 100)
        made["leader"] = FreezeTarget(exe, "leader-exit", 16)
        made["stopped"] = FreezeTarget(exe, "spin", 16)
        made["racer"] = FreezeTarget(exe, "spin", 16)
        made["traced"] = FreezeTarget(exe, "spin", 16)
        yield made
    finally:
        for t in made.values():
            if t.proc.poll() is None:
                os.kill(t.pid, signal.SIGCONT)
            t.close()


class Stress:
    """The operations, through the scheduler API (cpcoord.api.Client, real gRPC) and the
    `cpcoord capture` command, and the check that follows each."""

    def __init__(self, c: Cluster, ts: dict[str, FreezeTarget], tmp: Path) -> None:
        self.c, self.ts, self.tmp = c, ts, tmp
        self.api = Client(c.address, insecure=True, timeout=60)
        self.outcomes: Counter[str] = Counter()
        self.captures = 0

    def attach(self, name: str, job: str = JOB) -> None:
        t = self.ts[name]
        self.api.attach(job, name, t.pid, node="node-a", regions=[(name, t.addr, t.end)])

    def checkpoint(self, job: str = JOB) -> Generation:
        g = self.api.checkpoint(job, lease_ms=LEASE_MS, check=False)
        self.outcomes[f"{job}:{g.state.value}:{g.reason.value}"] += 1
        return g

    def settled(self, what: str) -> None:
        """Within the lease + 1 s: every running target runs, the stopped one is in
        group-stop; the racer is never left in a ptrace stop."""
        ts = self.ts

        def ok() -> bool:
            return (
                all(running(ts[n].pid) for n in ("churn", "vfork", "leader"))
                and group_stopped(ts["stopped"].pid)
                and not ptrace_stopped(ts["racer"].pid)
            )

        try:
            wait_for(ok, LEASE_MS / 1000 + 1, f"every target released after {what}")
        except AssertionError:
            raise AssertionError(
                f"after {what}: " + ", ".join(f"{n}={states(t.pid)}" for n, t in ts.items())
            ) from None
        for n in ("churn", "vfork", "leader"):
            assert ts[n].proc.poll() is None, (n, ts[n].stderr())

    def capture(self, name: str) -> None:
        t = self.ts[name]
        out = self.tmp / f"cap-{self.captures}"
        self.captures += 1
        argv = [sys.executable, "-m", "cpcoord", "capture", "--pid", str(t.pid)]
        r = subprocess.run(
            [*argv, "--out", str(out), "--tracker", "none", "--json"],
            cwd=REPO,
            env=daemon_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, (name, r.stderr)
        self.outcomes[f"capture:{name}"] += 1

    def kill_agent_mid_checkpoint(self, rng: random.Random, graceful: bool) -> None:
        """SIGKILL (the kernel releases its tracees), or SIGTERM (the agent thaws and
        disarms, and its ptrace thread's end releases whatever it still holds)."""
        got: list[Generation | BaseException] = []

        def run() -> None:
            try:
                got.append(self.api.checkpoint(JOB, lease_ms=LEASE_MS, check=False))
            except BaseException as e:
                got.append(e)

        th = threading.Thread(target=run)
        th.start()
        # Once the agent is freezing (a member in a ptrace stop), somewhere in it.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and th.is_alive():
            if any(ptrace_stopped(self.ts[n].pid) for n in ("churn", "leader", "stopped")):
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.02))
        agent = self.c.agents["node-a"]
        if graceful:
            agent.stop()
        else:
            agent.kill()
        self.settled("the agent was stopped" if graceful else "the agent was killed")
        th.join(120)
        g = got[0]
        state = g.state.value if isinstance(g, Generation) else type(g).__name__
        self.outcomes[f"agent-{'stopped' if graceful else 'killed'}:{state}"] += 1
        self.c.start_agent("node-a")
        self.c.wait_agents(["node-a"])
        wait_for(lambda: self.c.members_running(JOB), 60, "members attached again")


def test_freeze_under_churn(
    cluster_factory: Callable[..., Cluster], targets: dict[str, FreezeTarget], tmp_path: Path
) -> None:
    require(shutil.which("strace") is not None, "strace")
    c = cluster_factory(nodes=("node-a",))
    s = Stress(c, targets, tmp_path)
    for name in ("churn", "vfork", "leader", "stopped", "racer"):
        s.attach(name)
    s.attach("traced", job="traced")
    stopped = targets["stopped"]
    os.kill(stopped.pid, signal.SIGSTOP)
    wait_for(lambda: group_stopped(stopped.pid), 10, "the stopped target in group-stop")
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=none", "-p", str(targets["traced"].pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    racer = Racer(targets["racer"].pid, seed=os.getpid())
    rng = random.Random(os.getpid())
    killed = 0
    try:
        t_end = time.monotonic() + BUDGET_S
        i = 0
        while time.monotonic() < t_end:
            i += 1
            if i in (5, 15):
                s.kill_agent_mid_checkpoint(rng, graceful=i == 15)
                killed += 1
            elif i % 7 == 3:
                s.capture(rng.choice(["churn", "leader", "racer"]))
                s.settled("a local capture")
            elif i % 7 == 6:  # a vfork child that outlasts the freeze: an abort
                targets["vfork"].send("V 1500")  # > the 1 s freeze deadline
                targets["vfork"].expect("ok")
                g = s.checkpoint()
                assert (g.state.value, g.reason.value) == ("aborted", "freeze_timeout"), g
                s.settled(f"checkpoint {g.number} aborted")
            elif i % 5 == 2:
                g = s.checkpoint("traced")
                assert g.state.value == "aborted", g
                assert f"already traced by pid {tracer.pid}" in g.detail, g
                targets["traced"].ping()
            else:
                g = s.checkpoint()
                if g.state.value == "aborted":  # only the vfork member may stall a freeze
                    assert g.reason.value in ("freeze_timeout", "freeze_failed"), g
                else:
                    assert g.state.value == "committed", g
                s.settled(f"checkpoint {g.number} {g.state.value}")
        # The run did what it meant to: commits, vfork aborts, captures, agent kills.
        assert killed == 2 and i > 12, s.outcomes
        assert any(k.startswith(f"{JOB}:committed") for k in s.outcomes), s.outcomes
    finally:
        racer.end()
        tracer.terminate()
        tracer.wait(10)
        s.api.close()
    print(dict(s.outcomes), "signals to the racer:", racer.sent)
    wait_for(lambda: running(targets["racer"].pid), LEASE_MS / 1000 + 1, "the racer running")
    assert group_stopped(stopped.pid), states(stopped.pid)
    os.kill(stopped.pid, signal.SIGCONT)
    wait_for(lambda: running(stopped.pid), 5, "the stopped target continued")
    for name, t in targets.items():
        t.check()
        t.quit()  # its own checks: memory, every thread created finished, vfork statuses
        del name
