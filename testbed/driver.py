"""Test-side driver of the target program (testbed/target.py).

    with Target(maps=["hot:64", "cold:32:anon:zero"], writers=["hot:4"]) as t:
        t.mapping("hot").addr            # where it lives
        t.cmd("dontneed", name="cold", page=0, count=8)
        t.assert_running()               # not stopped, answers commands

Targets are real processes (children of the test), killed on close. Commands and their
arguments are listed in testbed/target.py; a command that fails in the target raises
TargetError here with the target's message.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from testbed import patterns

REPO = Path(__file__).resolve().parents[1]
PAGE = patterns.PAGE


class TargetError(RuntimeError):
    pass


@dataclass(frozen=True)
class MappingInfo:
    name: str
    id: int
    kind: str
    addr: int
    pages: int
    path: str

    @property
    def end(self) -> int:
        return self.addr + self.pages * PAGE

    def page(self, i: int) -> int:
        return self.addr + i * PAGE


def proc_state(pid: int, tid: int | None = None) -> str:
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(path) as f:
        return f.read().rpartition(")")[2].split()[0]


def task_states(pid: int) -> dict[int, str]:
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(t)] = proc_state(pid, int(t))
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return out


def dirty_mib(pid: int) -> dict[str, float]:
    """Shared_Dirty and Private_Dirty of a process (smaps_rollup), in MiB."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Shared_Dirty", "Private_Dirty"):
                out[key] = int(rest.split()[0]) / 1024
    return out


class Target:
    """A running target process and a line-JSON channel to it."""

    def __init__(
        self,
        maps: Sequence[str] = ("data:64",),
        writers: Sequence[str] = (),
        *,
        thp: bool = False,
        tmpdir: str | Path | None = None,
        timeout: float = 60.0,
    ) -> None:
        argv = [sys.executable, "-m", "testbed.target"]
        for m in maps:
            argv += ["--map", m]
        for w in writers:
            argv += ["--writers", w]
        if thp:
            argv.append("--thp")
        if tmpdir is not None:
            argv += ["--tmpdir", str(tmpdir)]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.timeout = timeout
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self.pid = self.proc.pid
        self._buf = b""
        self._info = self._reply()
        self.mappings = self._parse(self._info)

    # -- channel --------------------------------------------------------------------

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TargetError(f"target {self.pid} did not answer in {self.timeout}s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise TargetError(f"target {self.pid} exited ({self.proc.poll()})")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise TargetError(reply.get("error", "unknown error"))
        return reply

    def cmd(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one command and return its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        reply = self._reply()
        if op in ("mmap", "munmap", "grow", "info"):
            self.mappings = self._parse(self.cmd("info") if op != "info" else reply)
        return reply

    @staticmethod
    def _parse(info: dict[str, Any]) -> dict[str, MappingInfo]:
        return {n: MappingInfo(name=n, **m) for n, m in info["mappings"].items()}

    # -- facts ----------------------------------------------------------------------

    def mapping(self, name: str) -> MappingInfo:
        return self.mappings[name]

    def info(self) -> dict[str, Any]:
        return self.cmd("info")

    def state(self) -> str:
        return proc_state(self.pid)

    def assert_running(self) -> None:
        """No thread is stopped (t/T) and the target still answers."""
        states = task_states(self.pid)
        stopped = {t: s for t, s in states.items() if s in "tT"}
        assert not stopped, f"target {self.pid} left stopped: {stopped}"
        self.cmd("ping")

    def expected(self, name: str, first: int, count: int, counter: int = 0) -> npt.NDArray:
        """Bytes `(count, PAGE)` of stamped pages of mapping `name` (counter as given)."""
        m = self.mapping(name)
        return patterns.stamped(m.id, first, count, counter).view(np.uint8).reshape(count, PAGE)

    def read(self, name: str, page: int = 0, count: int | None = None) -> npt.NDArray:
        """What the target holds now, `(count, PAGE)` bytes (via a file for size)."""
        m = self.mapping(name)
        count = m.pages - page if count is None else count
        path = f"/dev/shm/cpt-dump-{self.pid}-{time.monotonic_ns()}"
        try:
            self.cmd("dump", name=name, page=page, count=count, path=path)
            return np.fromfile(path, dtype=np.uint8).reshape(count, PAGE)
        finally:
            if os.path.exists(path):
                os.unlink(path)

    # -- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        if self.proc.poll() is None:
            # SIGKILL works on a stopped process too, so a failed test never hangs here.
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
