"""examples/scheduler/checkpoint_loop.py against a real cluster: it checkpoints every
second, and on SIGTERM takes a final generation that holds the memory as it was at
preemption, then exits 0. A job that does not exist makes it exit with UnknownJob's code.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from cpcoord.api import Client
from cpcoord.errors import UnknownJob
from testbed.cluster import Cluster
from testbed.daemons import REPO, daemon_env, wait_for
from testbed.driver import PAGE, Target

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EXAMPLE = REPO / "examples" / "scheduler" / "checkpoint_loop.py"


def _loop(cl: Cluster, job: str, every: float) -> subprocess.Popen[str]:
    argv = [sys.executable, str(EXAMPLE), "--coordinator", cl.address, "--insecure"]
    argv += ["--job", job, "--every", str(every)]
    return subprocess.Popen(
        argv, cwd=REPO, env=daemon_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_loop_checkpoints_periodically_and_finally_on_sigterm(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target]
) -> None:
    cl = cluster_factory(nodes=("node-a",), keep=100)
    t = target_factory(maps=["data:32"])
    m = t.mapping("data")
    with Client(cl.address, insecure=True, timeout=60) as c:
        c.attach("sched", "rank-0", t.pid, node="node-a", regions=[("data", m.addr, m.end)])
        proc = _loop(cl, "sched", 1.0)
        try:
            wait_for(lambda: len(c.generations("sched")) >= 2, 120, "two periodic generations")
            # The state the preemption must save: written just before the SIGTERM.
            t.cmd("write", name="data", page=3, count=4, counter=42)
            want = t.read("data")
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
        assert proc.returncode == 0, (out, err)
        lines = _lines(out)
        assert lines[0]["event"] == "started" and lines[0]["members"] == ["rank-0"]
        assert lines[-1]["event"] == "final"
        final = lines[-1]["generation"]
        committed = [x["generation"] for x in lines if x["event"] == "committed"]
        assert len(committed) >= 3 and committed[-1] == final
        assert committed == sorted(committed)
        newest = c.generations("sched")[0]
        assert newest.number == final and newest.committed
        (mp,) = list(c.read_generation("sched", final))
        r = mp.region("data")
        assert np.array_equal(r.bytes_at(0, 32, PAGE), want)
    t.assert_running()


def test_loop_exits_with_the_error_code_for_an_unknown_job(
    cluster_factory: Callable[..., Cluster],
) -> None:
    cl = cluster_factory(nodes=())
    proc = _loop(cl, "no-such-job", 1.0)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == UnknownJob.exit_code, (out, err)
    assert _lines(out)[-1]["event"] == "error"
