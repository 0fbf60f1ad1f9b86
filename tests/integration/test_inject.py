"""Syscall injection into real processes that know nothing of cpcoord.

A plain C program and a plain Python program, each with threads blocked in read() on a
pipe, in nanosleep, in a futex wait and (C) one spinning in user space, are frozen, made to
run system calls on our behalf, thawed — and must carry on exactly as if nothing happened:
same registers on every thread, the pipe read returns the bytes written after the
injection, the sleep lasts as long as asked, the program exits with its own status.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.proc.freeze import frozen
from nodeagent.proc.inject import Injector
from nodeagent.proc.procfs import ProcessIdentity, read_maps, task_states
from nodeagent.proc.ptrace_abi import get_regs, regs_dict
from tests.conftest import require

pytestmark = pytest.mark.integration

C_SOURCE = Path(__file__).resolve().parents[1] / "helpers" / "c" / "uffd_target.c"
ERESTARTSYS, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 514, 516
NR_READ, NR_GETPID, NR_CLOCK_NANOSLEEP, NR_FUTEX = 0, 39, 230, 202
NO_SYSCALL = (1 << 64) - 1  # orig_rax of a thread stopped in user space


@pytest.fixture(scope="session")
def c_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(shutil.which("gcc") is not None, "gcc is needed to build the C test target")
    out = tmp_path_factory.mktemp("c") / "uffd_target"
    subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", str(out), str(C_SOURCE)], check=True)
    return out


def _signed(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


def _code_heads(pid: int) -> dict[int, bytes]:
    """The first bytes of every executable mapping (where a poked syscall would go)."""
    out = {}
    with open(f"/proc/{pid}/mem", "rb") as mem:
        for m in read_maps(pid):
            if "x" in m.perms and m.readable:
                mem.seek(m.start)
                out[m.start] = mem.read(16)
    return out


def _wait_blocked(pid: int, tids: list[int]) -> None:
    """Until every listed thread sleeps in the kernel (state S)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = task_states(pid)
        if all(states.get(t) == "S" for t in tids):
            return
        time.sleep(0.01)
    raise AssertionError(f"threads never blocked: {task_states(pid)}")


class CThreads:
    """The C target in `threads` mode, with the write end of its pipe."""

    def __init__(self, exe: Path, sleep_ms: int) -> None:
        self.rfd, self.wfd = os.pipe()
        self.proc = subprocess.Popen(
            [str(exe), "threads", str(self.rfd), str(sleep_ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            pass_fds=(self.rfd,),
        )
        os.close(self.rfd)
        assert self.proc.stdout is not None
        words = self.proc.stdout.readline().split()
        assert words[0] == "ready", words
        self.reader, self.sleeper, self.waiter, self.spinner = map(int, words[1:])
        self.ident = ProcessIdentity.of(self.proc.pid)
        _wait_blocked(self.proc.pid, [self.reader, self.sleeper, self.waiter])

    def finish(self, data: bytes) -> tuple[int, str]:
        os.write(self.wfd, data)
        os.close(self.wfd)
        out, _ = self.proc.communicate("go\n", timeout=30)
        return self.proc.returncode, out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def cthreads(c_target: Path) -> Iterator[CThreads]:
    t = CThreads(c_target, sleep_ms=1500)
    yield t
    t.kill()


def _inject_some(inj: Injector, pid: int) -> None:
    """A representative session: a plain call, scratch memory both ways, an fd opened
    and closed in the target."""
    assert inj.check("getpid", NR_GETPID) == pid
    addr = inj.scratch()
    inj.write(addr, b"cpcoord!")
    assert inj.read(addr, 8) == b"cpcoord!"
    fd = inj.check("userfaultfd", 323, os.O_CLOEXEC | os.O_NONBLOCK | 1)
    assert os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[userfaultfd]"
    inj.check("close", 3, fd)
    assert not os.path.exists(f"/proc/{pid}/fd/{fd}")


@pytest.mark.parametrize("site", ["vdso", "poke"])
def test_c_threads_carry_on_after_injection(cthreads: CThreads, site: str) -> None:
    t = cthreads
    pid = t.proc.pid
    maps_before = [m.format() for m in read_maps(pid)]
    code_before = _code_heads(pid)
    with frozen(t.ident) as fp:
        before = {tid: regs_dict(get_regs(tid)) for tid in fp.tids}
        # The freeze interrupted each blocked call; the kernel will restart it on resume.
        r, s, w = before[t.reader], before[t.sleeper], before[t.waiter]
        assert (r["orig_rax"], _signed(r["rax"])) == (NR_READ, -ERESTARTSYS)
        assert s["orig_rax"] == NR_CLOCK_NANOSLEEP
        assert -_signed(s["rax"]) in (ERESTART_RESTARTBLOCK, ERESTARTNOHAND)
        assert w["orig_rax"] == NR_FUTEX
        assert before[t.spinner]["orig_rax"] == NO_SYSCALL
        with Injector(fp, site=site) as inj:
            assert inj.tid == pid  # the leader, blocked in fgets() -> read(0)
            if site == "poke":
                assert _code_heads(pid)[inj.site] != code_before[inj.site]
            _inject_some(inj, pid)
        after = {tid: regs_dict(get_regs(tid)) for tid in fp.tids}
    assert after == before
    assert _code_heads(pid) == code_before, "the poked instruction was not put back"
    assert [m.format() for m in read_maps(pid)] == maps_before, "scratch page left behind"
    rc, out = t.finish(b"hello")
    assert rc == 7, out
    lines = out.splitlines()
    assert lines[0] == "read 5 hello"
    slept = float(lines[1].split()[1])
    assert 1500 <= slept < 4000, lines
    assert lines[2] == "spins yes"


def test_many_injections_while_sleeping(cthreads: CThreads) -> None:
    """Twenty freeze/inject/thaw rounds inside one nanosleep: the restart_block machinery
    must resume the remaining time every time, never restart from zero or cut short."""
    t = cthreads
    for _ in range(20):
        with frozen(t.ident) as fp, Injector(fp, tid=t.sleeper) as inj:
            assert inj.check("getpid", NR_GETPID) == t.proc.pid
        time.sleep(0.02)
    rc, out = t.finish(b"abc")
    assert rc == 7
    lines = out.splitlines()
    assert lines[0] == "read 3 abc"
    assert 1500 <= float(lines[1].split()[1]) < 4000, lines


def test_registers_restored_on_a_thread_in_user_space(cthreads: CThreads) -> None:
    t = cthreads
    with frozen(t.ident) as fp:
        before = regs_dict(get_regs(t.spinner))
        assert before["orig_rax"] == NO_SYSCALL
        with Injector(fp, tid=t.spinner) as inj:
            _inject_some(inj, t.proc.pid)
            assert inj.calls >= 4
        assert regs_dict(get_regs(t.spinner)) == before
    rc, out = t.finish(b"xyz")
    assert rc == 7 and out.splitlines()[2] == "spins yes"


PY_TARGET = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    r = int(sys.argv[1])
    got, slept, hits = [], [], []
    ev = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *a: hits.append("usr1"))
    signal.signal(signal.SIGUSR2, lambda *a: hits.append("usr2"))
    def sleeper():
        t0 = time.monotonic(); time.sleep(1.5); slept.append(time.monotonic() - t0)
    ts = [threading.Thread(target=lambda: got.append(os.read(r, 100))),
          threading.Thread(target=sleeper), threading.Thread(target=ev.wait)]
    for t in ts: t.start()
    print("ready", flush=True)
    line = sys.stdin.readline()
    ev.set()
    for t in ts: t.join()
    print(got[0].decode(), round(slept[0], 1) >= 1.5, sorted(hits), flush=True)
    sys.exit(9)
    """
)


def _sig_status(pid: int, tid: int) -> dict[str, int]:
    """SigPnd (the thread's), ShdPnd (the process's), SigBlk, SigIgn, SigCgt."""
    out = {}
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"):
                out[key] = int(val, 16)
    return out


def test_python_program_carries_on_and_keeps_its_signals(tmp_path: Path) -> None:
    """Signals sent while the target is frozen stay queued: the thread we run calls on
    has every signal blocked meanwhile, so it dequeues none; they reach the program's
    handlers after the thaw, once each, and every thread's mask is as before."""
    rfd, wfd = os.pipe()
    script = tmp_path / "target.py"
    script.write_text(PY_TARGET)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(rfd)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=(rfd,),
    )
    os.close(rfd)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        ident = ProcessIdentity.of(proc.pid)
        _wait_blocked(proc.pid, [t for t in task_states(proc.pid) if t != proc.pid])
        with frozen(ident) as fp:
            before = {tid: regs_dict(get_regs(tid)) for tid in fp.tids}
            os.kill(proc.pid, signal.SIGUSR1)
            os.kill(proc.pid, signal.SIGUSR2)
            masks = {tid: _sig_status(proc.pid, tid) for tid in fp.tids}
            with Injector(fp) as inj:
                _inject_some(inj, proc.pid)
                assert inj.held == []
            assert {tid: regs_dict(get_regs(tid)) for tid in fp.tids} == before
            usr = (1 << (signal.SIGUSR1 - 1)) | (1 << (signal.SIGUSR2 - 1))
            for tid in fp.tids:
                now = _sig_status(proc.pid, tid)
                assert now["ShdPnd"] & usr == usr, "a signal was taken off the queue"
                assert {k: now[k] for k in ("SigBlk", "SigIgn", "SigCgt")} == {
                    k: masks[tid][k] for k in ("SigBlk", "SigIgn", "SigCgt")
                }
        os.write(wfd, b"through the pipe")
        out, _ = proc.communicate("go\n", timeout=30)
        assert proc.returncode == 9, out
        assert out.strip() == "through the pipe True ['usr1', 'usr2']"
    finally:
        os.close(wfd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_injection_survives_a_seccomp_filter_that_would_kill(c_target: Path) -> None:
    """The target dies on userfaultfd() by its own seccomp filter; the injector suspends
    seccomp for the injected calls only (PTRACE_O_SUSPEND_SECCOMP)."""
    proc = subprocess.Popen(
        [str(c_target), "mem-seccomp", "4"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        while proc.stdout.readline().split()[0] != "ready":
            pass
        ident = ProcessIdentity.of(proc.pid)
        with frozen(ident) as fp, Injector(fp) as inj:
            _inject_some(inj, proc.pid)
        proc.communicate("q\n", timeout=10)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_stopped_process_stays_stopped(c_target: Path) -> None:
    """Stepping a thread out of its group stop must not resume the process: after the
    thaw it is stopped again (state T) until SIGCONT, as before the freeze."""
    proc = subprocess.Popen(
        [str(c_target), "mem", "4"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        while proc.stdout.readline().split()[0] != "ready":
            pass
        os.kill(proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while task_states(proc.pid)[proc.pid] != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        with frozen(ProcessIdentity.of(proc.pid)) as fp, Injector(fp) as inj:
            _inject_some(inj, proc.pid)
        time.sleep(0.2)
        assert task_states(proc.pid)[proc.pid] == "T"
        os.kill(proc.pid, signal.SIGCONT)
        proc.communicate("q\n", timeout=10)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
