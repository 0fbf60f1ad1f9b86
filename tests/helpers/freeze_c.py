"""Test-side driver of tests/helpers/c/freeze_target.c: processes that are hard to freeze
(blocked in vfork, threads churning, a leader that called pthread_exit).

    exe = build_freeze_target(tmp_dir)
    with FreezeTarget(exe, "vfork", 16, 6000) as t:
        child = t.child()          # the vfork child's pid ("child PID")
        t.expect("back", 10)       # vfork returned
        t.ping(); t.check()        # it runs, its region holds its pattern
        t.expected()               # the pattern's bytes, (pages, 4096) uint8

Each target is a child of the test, killed (with any vfork child it announced) on close.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt

from tests.helpers.restore_c import C_DIR, build_c

SOURCE = C_DIR / "freeze_target.c"
PAGE = 4096
WORDS = PAGE // 8


def build_freeze_target(out_dir: Path) -> Path:
    return build_c(SOURCE, out_dir)


def pattern(pages: int, seed: int = 1) -> npt.NDArray[np.uint8]:
    """The region's bytes as freeze_target stamps them (cpt_mix of a word counter)."""
    p = np.arange(pages, dtype=np.uint64)[:, None]
    i = np.arange(WORDS, dtype=np.uint64)[None, :]
    x = np.uint64(seed) * np.uint64(1000003) + p * np.uint64(512) + i
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xFF51AFD7ED558CCD)
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xC4CEB9FE1A85EC53)
        x ^= x >> np.uint64(33)
    return x.astype("<u8").view(np.uint8).reshape(pages, PAGE)


def states(pid: int) -> dict[int, str]:
    """State letter of each thread (a zombie leader included); {} once it is reaped."""
    out: dict[int, str] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                out[int(t)] = f.read().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
    return out


def stopped(pid: int) -> bool:
    """Some thread is in a stop: ptrace (t) or group (T)."""
    return any(s in "tT" for s in states(pid).values())


class FreezeTarget:
    def __init__(self, exe: Path, mode: str, pages: int, *args: int) -> None:
        self.pages = pages
        self.proc = subprocess.Popen(
            [str(exe), mode, str(pages), *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        self.children: list[int] = []
        self._buf = b""
        first = self.line(20).split()
        assert first[0] == "ready", first
        self.addr, self.end = int(first[1], 16), int(first[1], 16) + pages * PAGE

    def line(self, timeout: float = 10.0) -> str:
        """The next line the target printed; AssertionError after `timeout`."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"pid {self.pid} printed nothing in {timeout}s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"pid {self.pid} exited: {self.wait(5)} {self.stderr()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def expect(self, word: str, timeout: float = 10.0) -> str:
        got = self.line(timeout)
        assert got.split()[0] == word, f"expected {word!r}, got {got!r}"
        return got

    def child(self, timeout: float = 10.0) -> int:
        pid = int(self.expect("child", timeout).split()[1])
        self.children.append(pid)
        return pid

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def ping(self, timeout: float = 5.0) -> int:
        """The target's work counter: it answers only when it runs."""
        self.send("p")
        return int(self.expect("pong", timeout).split()[1])

    def check(self, timeout: float = 10.0) -> None:
        self.send("c")
        self.expect("ok", timeout)

    def quit(self, timeout: float = 20.0) -> str:
        self.send("q")
        got = self.expect("bye", timeout)
        assert self.wait(timeout) == 0, self.stderr()
        return got

    def expected(self, seed: int = 1) -> npt.NDArray[np.uint8]:
        return pattern(self.pages, seed)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")

    def close(self) -> None:
        for c in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            # A zombie someone else still traces would hang here: the test says why.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    def __enter__(self) -> FreezeTarget:
        return self

    def __exit__(
        self,
        t: type[BaseException] | None,
        v: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
