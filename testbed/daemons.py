"""Processes that tests and benchmarks start and always tear down: `Daemon` (a
subprocess in its own session, its output appended to a log file), `daemon_env` (the
environment every daemon and CLI run of ours gets), `wait_for` (poll a condition) and
`public_tmpdir` (a directory other users can reach).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def public_tmpdir(prefix: str) -> Path:
    """A new directory under /tmp, mode 0755, named with `prefix` and this pid: daemons
    and users other than ours can reach what it holds (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir="/tmp"))
    d.chmod(0o755)
    return d


def default_signals() -> None:
    """In a child before exec: SIGINT and SIGQUIT back to their defaults. A shell runs its
    background jobs with both ignored, and an ignored signal stays ignored across exec, so
    a test run from such a job (CI scripts, `cmd &`) would see Ctrl-C do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def daemon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # CPCOORD_CONFIG=/dev/null: a developer's own config file never leaks into a cluster.
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", CPCOORD_CONFIG="/dev/null")
    for k in ("CPCOORD_FAULT_PAUSE", "CPCOORD_FAULT_HOLD", "CPCOORD_COORDINATOR"):
        env.pop(k, None)
    env.update(extra or {})
    return env


@dataclass
class Daemon:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - owned by the child
        out.write(f"--- start {' '.join(self.argv)}\n".encode())
        out.flush()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def wait_port(self, port_file: Path, timeout: float = 30) -> int:
        """The port the daemon wrote to `port_file` once it listens (`--port-file`); fails
        with its log's tail if it dies or takes longer than `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if not self.alive() or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not start:\n{self.tail()}")
            time.sleep(0.05)
        return int(port_file.read_text())

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
