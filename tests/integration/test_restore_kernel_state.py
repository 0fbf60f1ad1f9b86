"""A rollback in place that would leave memory and kernel side disagreeing is refused.

A real coordinator and agent (subprocesses); the member is tests/helpers/c/pipe_target.c,
a whole-memory C program that writes N bytes into a pipe it reads later and checks on
command that what its memory says about the pipe agrees with what the kernel holds. Each
checkpoint records its kernel side (fd table, offsets, queues); `cpcoord restore` compares
it with the kernel side now and refuses, naming the fd and what differs, unless --force.
A refusal writes nothing: the process runs on untouched.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.store import manifest_io
from testbed.cluster import Cluster, attach_args
from tests.helpers.restore_c import C_DIR, CProcess, build_c

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PIPE_TARGET = C_DIR / "pipe_target.c"
N = 12
REFUSED_EXIT = 146  # RestoreRefusedKernelState: the agent refused for the kernel side


class PipeTarget(CProcess):
    def __init__(self, exe: Path, n: int = N) -> None:
        super().__init__([str(exe), str(n)])
        self.rfd, self.wfd = int(self.first[1]), int(self.first[2])

    def send(self, text: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()
        return self.line()

    def running(self) -> None:
        assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.stderr()}"


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(PIPE_TARGET, tmp_path_factory.mktemp("c"))


@pytest.fixture
def target(exe: Path) -> Iterator[PipeTarget]:
    t = PipeTarget(exe)
    try:
        yield t
    finally:
        with contextlib.suppress(Exception):
            os.kill(t.pid, signal.SIGCONT)
        t.close()


def _checkpoint(c: Cluster, job: str) -> int:
    r = c.cli_json("checkpoint", "--job", job)
    assert r["state"] == "committed", r
    return int(r["generation"])


def _pipe_ino(pid: int, fd: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")


def test_pipe_drained_since_the_cut_refused_unless_forced(
    cluster_factory: Callable[..., Cluster], target: PipeTarget
) -> None:
    c = cluster_factory(nodes=("node-a",))
    c.cli(*attach_args("k", "p", target.pid, "node-a"))
    assert target.send("check") == f"ok drained=0 unread={N}"
    g = _checkpoint(c, "k")
    # The manifest keeps the kernel side: the pipe's read end with N bytes unread.
    (man,) = [manifest_io.decode(d, n) for n, d in c.store_objects() if n.startswith("manifests/")]
    kernel = man.member("p").kernel
    assert kernel is not None
    rec = kernel.by_fd()
    assert rec[target.rfd].kind == "pipe" and rec[target.rfd].unread == N, rec
    assert rec[target.rfd].target == _pipe_ino(target.pid, target.rfd)

    assert target.send("drain") == "drained"
    r = c.cli("restore", "--job", "k", "--generation", str(g), check=False)
    assert r.returncode == REFUSED_EXIT, (r.returncode, r.stdout, r.stderr)
    pipe = _pipe_ino(target.pid, target.rfd)
    want = f"fd {target.rfd} ({pipe}): {N} bytes unread at the cut, 0 now"
    assert want in r.stderr, r.stderr
    assert "--force" in r.stderr, r.stderr
    # Nothing written, nothing frozen: it answers from its own (drained) memory.
    target.running()
    assert target.send("check") == "ok drained=1 unread=0"

    # Forced, the rollback happens: memory is back at the cut (not drained), and the
    # kernel still holds the drained pipe, which is the disagreement the refusal named.
    r = c.cli("restore", "--job", "k", "--generation", str(g), "--force")
    target.running()
    assert target.send("check") == "disagree drained=0 unread=0"
    # The CLI names what the forced rollback left disagreeing (text and --json).
    assert f"warning: member p: kernel side differs from the cut: {want}" in r.stdout, r.stdout
    j = c.cli_json("restore", "--job", "k", "--generation", str(g), "--force")
    assert j["state"] == "restored", j
    (m,) = j["members"]
    assert want in m["kernel_warnings"], m
    target.running()
    assert target.proc.stdin is not None
    target.proc.stdin.write(b"quit\n")
    target.proc.stdin.flush()
    assert target.proc.wait(30) == 0


def test_fd_opened_since_the_cut_refused(
    cluster_factory: Callable[..., Cluster], target: PipeTarget
) -> None:
    c = cluster_factory(nodes=("node-a",))
    c.cli(*attach_args("k", "p", target.pid, "node-a"))
    g = _checkpoint(c, "k")
    words = target.send("open").split()
    assert words[0] == "opened", words
    fd = int(words[1])
    r = c.cli("restore", "--job", "k", "--generation", str(g), check=False)
    assert r.returncode == REFUSED_EXIT, (r.returncode, r.stdout, r.stderr)
    assert f"fd {fd} (/dev/null) was opened since the cut" in r.stderr, r.stderr
    target.running()
    assert target.send("check") == f"ok drained=0 unread={N}"


def test_unchanged_kernel_side_rolls_back(
    cluster_factory: Callable[..., Cluster], target: PipeTarget
) -> None:
    """No false refusal: commands over stdin/stdout after the cut change no fd, offset
    or input queue, and the rollback goes through without --force."""
    c = cluster_factory(nodes=("node-a",))
    c.cli(*attach_args("k", "p", target.pid, "node-a"))
    g = _checkpoint(c, "k")
    for _ in range(3):
        assert target.send("check") == f"ok drained=0 unread={N}"
    c.cli("restore", "--job", "k", "--generation", str(g))
    target.running()
    assert target.send("check") == f"ok drained=0 unread={N}"
    assert target.send("drain") == "drained"
