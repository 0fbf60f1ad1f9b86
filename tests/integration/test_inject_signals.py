"""A checkpoint never changes a process's signals or its fd numbers: self-checking C
programs (tests/helpers/c/sigstate_target.c) that own their signal state are armed with
uffd-wp (syscall injection), checkpointed several times, and must end by their own checks
with exit 0, their /proc signal masks as before.

- `sigtrap`: blocks and handles SIGTRAP. A single-stepped injected call ends in a trap
  the kernel *forces* (force_sig), which unblocks SIGTRAP and resets its handler: the
  program was then killed by its next SIGTRAP.
- `ebadf`: closed fd 3 and expects EBADF from it, and open() to give 3 again. The
  tracker's userfaultfd took the lowest free number (3).
- `siginfo`: a signal sent while the process is frozen reaches it with the sender's pid.
- `sigsuspend`: a thread interrupted in sigsuspend keeps its mask.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nodeagent.proc.freeze import frozen
from nodeagent.proc.inject import Injector
from nodeagent.proc.procfs import ProcessIdentity, read_maps
from nodeagent.trackers import uffd_avail
from nodeagent.trackers.uffd_open import HIGH_FD_CEILING
from nodeagent.trackers.uffdwp import UffdWpTracker
from testbed.cluster import Cluster
from tests.conftest import require
from tests.helpers.restore_c import C_DIR, build_c

pytestmark = pytest.mark.integration

SIGNAL_FIELDS = ("SigBlk", "SigIgn", "SigCgt")


@pytest.fixture(scope="module")
def sigstate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(C_DIR / "sigstate_target.c", tmp_path_factory.mktemp("c"))


@pytest.fixture
def uffd_ok() -> None:
    avail = uffd_avail.availability()
    require(avail.available, f"uffd-wp: {avail.reason}")


class Prog:
    def __init__(self, exe: Path, mode: str, ms: int) -> None:
        self.proc = subprocess.Popen(
            [str(exe), mode, str(ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().split()
        assert first and first[0] == "ready", (first, self.stderr())
        self.pid = self.proc.pid
        self.ident = ProcessIdentity.of(self.pid)

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()

    def signals(self) -> dict[int, dict[str, str]]:
        """Per thread: SigBlk, SigIgn, SigCgt from /proc (SigIgn, SigCgt are per process)."""
        out = {}
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            with open(f"/proc/{self.pid}/task/{tid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            out[int(tid)] = {k: fields[k].strip() for k in SIGNAL_FIELDS}
        return out

    def finish(self, timeout: float = 60, quit: bool = False) -> tuple[int, str, str]:
        """Its exit status and output; with `quit`, told to end now (a line on stdin)."""
        out, err = self.proc.communicate("q\n" if quit else None, timeout=timeout)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def progs(sigstate: Path) -> Iterator[Callable[[str, int], Prog]]:
    made: list[Prog] = []

    def start(mode: str, ms: int) -> Prog:
        p = Prog(sigstate, mode, ms)
        made.append(p)
        return p

    yield start
    for p in made:
        p.kill()


def _checkpoints(p: Prog, tr: UffdWpTracker, n: int) -> None:
    with frozen(p.ident) as fp:
        tr.arm(fp, [m for m in read_maps(p.pid) if m.writable])
    for _ in range(n):
        time.sleep(0.15)
        with frozen(p.ident) as fp:
            tr.collect(fp, [m for m in read_maps(p.pid) if m.writable])
    with frozen(p.ident) as fp:
        tr.forget(fp)


@pytest.mark.usefixtures("uffd_ok")
def test_sigtrap_blocked_and_handled_survives_uffd_wp(progs: Callable[[str, int], Prog]) -> None:
    p = progs("sigtrap", 2500)
    before = p.signals()
    assert all(s["SigBlk"].endswith("810") for s in before.values()), before  # TRAP, USR2
    tr = UffdWpTracker()
    with frozen(p.ident) as fp:
        tr.arm(fp, [m for m in read_maps(p.pid) if m.writable])
    assert p.signals() == before, "arming changed the signal state"
    for _ in range(4):
        time.sleep(0.15)
        with frozen(p.ident) as fp:
            tr.collect(fp, [m for m in read_maps(p.pid) if m.writable])
        assert p.signals() == before
    with frozen(p.ident) as fp:
        tr.forget(fp)
    assert p.signals() == before
    rc, out, err = p.finish()
    assert rc == 0, (rc, out, err)
    assert int(out.split()[1]) > 3  # it kept taking its own SIGTRAPs all along


@pytest.mark.usefixtures("uffd_ok")
def test_the_tracker_fd_leaves_the_programs_numbers_alone(
    progs: Callable[[str, int], Prog],
) -> None:
    p = progs("ebadf", 2000)
    tr = UffdWpTracker()
    with frozen(p.ident) as fp:
        tr.arm(fp, [m for m in read_maps(p.pid) if m.writable])
    assert tr.fd is not None and tr.fd >= min(1024, HIGH_FD_CEILING) - 16, tr.fd
    assert not os.path.exists(f"/proc/{p.pid}/fd/3")
    assert os.readlink(f"/proc/{p.pid}/fd/{tr.fd}") == "anon_inode:[userfaultfd]"
    assert os.readlink(f"/proc/{p.pid}/fd/{tr.fd}") and tr.fd > 4
    flags = Path(f"/proc/{p.pid}/fdinfo/{tr.fd}").read_text()
    assert int(flags.split("flags:")[1].split()[0], 8) & os.O_CLOEXEC
    for _ in range(4):
        time.sleep(0.15)
        with frozen(p.ident) as fp:
            tr.collect(fp, [m for m in read_maps(p.pid) if m.writable])
    rc, out, err = p.finish()
    assert rc == 0, (rc, out, err)


def test_a_signal_sent_while_frozen_keeps_its_sender(progs: Callable[[str, int], Prog]) -> None:
    """The stepped thread dequeues nothing: the signal is delivered after the thaw as it
    was sent (si_pid of the sender, SI_USER), not sent again by the agent."""
    p = progs("siginfo", 1500)
    with frozen(p.ident) as fp:
        sender = subprocess.run(["kill", "-USR1", str(p.pid)], check=True)
        del sender
        with Injector(fp) as inj:
            assert inj.check("getpid", 39) == p.pid
            assert inj.held == []
    rc, out, err = p.finish()
    assert rc == 0, (rc, out, err)
    got = [line.split() for line in out.splitlines() if line.startswith("got")]
    assert len(got) == 1, out
    assert int(got[0][1]) != os.getpid(), "the signal was sent again by the agent"
    assert int(got[0][2]) == 0  # SI_USER, from kill(1)


def test_a_thread_in_sigsuspend_keeps_its_mask(progs: Callable[[str, int], Prog]) -> None:
    """Interrupted in sigsuspend, the thread's real mask is put back by the kernel on
    its way to our first call (not at the thaw, as after a freeze alone); sigsuspend then
    restarts with its temporary mask, and the program checks its mask after each return."""
    p = progs("sigsuspend", 1500)
    _in_sigsuspend(p)
    before = p.signals()
    assert before[p.pid]["SigBlk"] == "0000000000000000"  # the temporary mask
    for i in range(6):
        with frozen(p.ident) as fp:
            if i % 2:
                os.kill(p.pid, signal.SIGUSR1)  # pending while frozen
            with Injector(fp) as inj:
                assert inj.check("getpid", 39) == p.pid
        _in_sigsuspend(p)
        assert p.signals() == before
        os.kill(p.pid, signal.SIGUSR1)
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while p.proc.poll() is None and time.monotonic() < deadline:
        os.kill(p.pid, signal.SIGUSR1)  # it leaves its loop on a signal after 1.5 s
        time.sleep(0.05)
    rc, out, err = p.finish()
    assert rc == 0, (rc, out, err)
    assert int(out.split()[-1]) >= 9


def _in_sigsuspend(p: Prog) -> None:
    """Until its thread sleeps in rt_sigsuspend (130) again."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{p.pid}/syscall") as f:
            if f.read().split()[0] == "130" and p.signals()[p.pid]["SigBlk"] == "0" * 16:
                return
        time.sleep(0.005)
    raise AssertionError("the program never went back to sigsuspend")


@pytest.mark.slow
@pytest.mark.usefixtures("uffd_ok")
def test_checkpoints_through_the_agent_leave_signals_and_fds_alone(
    cluster_factory: Callable[..., Cluster], progs: Callable[[str, int], Prog]
) -> None:
    """The same programs as members of a job: the real agent arms uffd-wp on them
    (auto) and takes several generations; both end by their own checks."""
    c = cluster_factory(nodes=("node-a",))
    members = {"trap": progs("sigtrap", 600_000), "fds": progs("ebadf", 600_000)}
    before = {name: p.signals() for name, p in members.items()}
    for name, p in members.items():
        c.cli("attach", "--job", "sig", "--member", name, "--pid", str(p.pid), "--node", "node-a")
    for _ in range(3):
        r = c.cli_json("checkpoint", "--job", "sig")
        assert r["state"] == "committed", r
        assert {name: p.signals() for name, p in members.items()} == before
    assert "uffd-wp armed" in c.agents["node-a"].tail(400)
    for name, p in members.items():
        rc, out, err = p.finish(timeout=60, quit=True)
        assert rc == 0, (name, rc, out, err)
