"""Every error of `cpcoord capture`: one clear line on stderr, a
distinct exit code, nothing left behind, and the target never left stopped (no thread in
state t/T, and it still answers commands)."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from cpcoord.errors import NoSuchProcess, PidReused, ProcessExited, RangeUnmapped
from cpcoord.ranges import PAGE_SIZE, AddressRange
from nodeagent.capture.process import capture
from nodeagent.proc.freeze import FrozenProcess
from nodeagent.proc.procfs import Mapping, ProcessIdentity, read_stat
from nodeagent.trackers.base import ChangedSet
from testbed.daemons import daemon_env
from testbed.driver import REPO, Target, proc_state
from tests.conftest import require

pytestmark = pytest.mark.integration
MakeTarget = Callable[..., Target]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def cli(*args: str, user: int | None = None, wait: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cpcoord", "capture", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
        timeout=120,
        user=user,
    )


def assert_error(res: subprocess.CompletedProcess, code: int, text: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code, (res.returncode, res.stderr)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("cpcoord: error: "), lines[0]
    assert text in lines[0], lines[0]
    assert "Traceback" not in res.stderr


# -- processes ----------------------------------------------------------------------


@pytest.mark.parametrize("pid", ["2147483647", "0", "-7"])
def test_no_such_pid(tmp_path: Path, pid: str) -> None:
    res = cli("--pid", pid, "--out", str(tmp_path / "img"))
    assert_error(res, 10, f"no such process: pid {pid}")
    assert not (tmp_path / "img").exists()
    with pytest.raises(NoSuchProcess):
        ProcessIdentity.of(2147483647)


@contextlib.contextmanager
def _ns_last_pid() -> Iterator[int]:
    """The pid-allocation knob, locked against other users as CRIU does."""
    fd = os.open("/proc/sys/kernel/ns_last_pid", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])


def _reuse_pid() -> tuple[int, int, subprocess.Popen] | None:
    """Start a process, let it die, and start another one *with the same pid* (via
    ns_last_pid). Returns (pid, start time of the dead one, the new process)."""
    for _ in range(30):
        old = _sleeper()
        pid = old.pid
        started = read_stat(pid).start_time
        old.kill()
        old.wait()
        time.sleep(0.05)  # start times count clock ticks: make sure the next one differs
        with _ns_last_pid() as fd:
            os.pwrite(fd, str(pid - 1).encode(), 0)
            new = _sleeper()
        if new.pid == pid:
            return pid, started, new
        new.kill()
        new.wait()
    return None


def test_pid_reused_for_real(tmp_path: Path) -> None:
    got = _reuse_pid() if os.access("/proc/sys/kernel/ns_last_pid", os.W_OK) else None
    require(got is not None, "cannot force pid reuse through /proc/sys/kernel/ns_last_pid")
    assert got is not None
    pid, old_start, new = got
    try:
        new_start = read_stat(pid).start_time
        assert new_start != old_start
        with pytest.raises(PidReused) as e:
            capture(ProcessIdentity(pid, old_start), None)
        assert str(e.value) == (
            f"pid {pid} was reused: expected start time {old_start}, found {new_start}"
        )
        res = cli("--pid", str(pid), "--start-time", str(old_start), "--out", str(tmp_path / "i"))
        assert_error(res, 11, f"pid {pid} was reused: expected start time {old_start}")
        assert not (tmp_path / "i").exists()
        assert proc_state(pid) not in "tT" and new.poll() is None
        # The right start time captures the new process.
        ok = cli("--pid", str(pid), "--start-time", str(new_start), "--out", str(tmp_path / "j"))
        assert ok.returncode == 0, ok.stderr
    finally:
        new.kill()
        new.wait()


def test_permission_denied_when_already_traced(target_factory: MakeTarget, tmp_path: Path) -> None:
    t = target_factory(maps=["a:8"])
    libc = ctypes.CDLL(None, use_errno=True)
    # Another tracer holds the target (seized, still running).
    assert libc.ptrace(0x4206, t.pid, None, None) == 0, ctypes.get_errno()
    res = cli("--pid", str(t.pid), "--out", str(tmp_path / "img"))
    assert_error(
        res,
        12,
        f"permission denied: cannot freeze pid {t.pid} (already traced by pid {os.getpid()})",
    )
    assert not (tmp_path / "img").exists()
    t.assert_running()


# Runs in a fresh interpreter started as root: everything the CLI needs is imported (the
# interpreter lives where nobody cannot read it), then root is dropped (user nobody, no
# groups, no capabilities) and the CLI runs.
_AS_NOBODY = """
import importlib, os, pkgutil, sys
from cpcoord import cli
cli.build_parser()
for top in ("cpcoord", "nodeagent", "storecore"):  # every module, as a parent had them
    for m in pkgutil.walk_packages(importlib.import_module(top).__path__, top + "."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
sys.exit(cli.main(sys.argv[1:]))
"""


def _cli_as_nobody(argv: list[str]) -> tuple[int, str]:
    """Run the CLI as user nobody. Returns (exit code, stderr). A fresh interpreter, not
    a fork of this one: forking a process with threads (grpc's, pools of earlier tests)
    can leave the child spinning on a lock another thread held."""
    r = subprocess.run(
        [sys.executable, "-c", _AS_NOBODY, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=daemon_env(),
    )
    return r.returncode, r.stderr


def test_permission_denied_for_unprivileged_user(target_factory: MakeTarget) -> None:
    t = target_factory(maps=["a:8"])
    out = Path(tempfile.mkdtemp(prefix="cpt-nobody-"))
    try:
        os.chmod(out, 0o777)
        code, err = _cli_as_nobody(["capture", "--pid", str(t.pid), "--out", str(out / "img")])
        res = subprocess.CompletedProcess([], code, "", err)
        assert_error(res, 12, f"permission denied: cannot read pagemap of pid {t.pid}")
        assert not (out / "img").exists()
        t.assert_running()
    finally:
        shutil.rmtree(out)


class KillWhileFrozen:
    """Kills the target from inside the frozen window, then lets the capture go on."""

    def changed(self, fp: FrozenProcess, maps: Sequence[Mapping]) -> ChangedSet | None:
        os.kill(fp.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while proc_state(fp.pid) not in ("Z", "X") and time.monotonic() < deadline:
            time.sleep(0.001)
        return None

    def after_copy(self, fp: FrozenProcess, maps: Sequence[Mapping]) -> None:
        raise AssertionError("the copy of a dead process must not succeed")


def test_process_exits_mid_capture_library(target_factory: MakeTarget) -> None:
    t = target_factory(maps=["a:64"], writers=["a:2"])
    with pytest.raises(ProcessExited) as e:
        capture(ProcessIdentity.of(t.pid), None, hooks=KillWhileFrozen())
    assert str(e.value) == f"process {t.pid} exited during capture"
    assert t.proc.wait(timeout=10) == -signal.SIGKILL


def test_process_exits_mid_capture_cli(target_factory: MakeTarget, tmp_path: Path) -> None:
    """SIGKILL the target the moment the CLI has it stopped (96 MiB to copy leaves tens of
    milliseconds). A kill that lands after the copy is a legitimate success: retry."""
    outcomes = []
    for attempt in range(4):
        t = target_factory(maps=["big:24576"], writers=["big:2"])
        out = tmp_path / f"img{attempt}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "cpcoord", "capture", "--pid", str(t.pid), "--out", str(out)],
            cwd=REPO,
            env=ENV,
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if proc_state(t.pid) == "t":
                os.kill(t.pid, signal.SIGKILL)
                break
        _, err = proc.communicate(timeout=120)
        outcomes.append(proc.returncode)
        if proc.returncode == 13:
            assert_error(
                subprocess.CompletedProcess(proc.args, 13, "", err),
                13,
                f"process {t.pid} exited during",
            )
            assert not out.exists()  # the half-made output is removed
            break
        assert proc.returncode == 0, err
    assert 13 in outcomes, outcomes


# -- ranges ---------------------------------------------------------------------------


def test_range_errors(target_factory: MakeTarget, tmp_path: Path) -> None:
    t = target_factory(maps=["a:16"])
    a = t.mapping("a")
    pid = str(t.pid)
    out = str(tmp_path / "img")
    cases = [
        ("0x10-zz", 21, "bad range '0x10-zz': expected START-END"),
        (f"{a.addr + 1}-{a.addr + 100}", 22, "holds no whole page"),
        (f"0x{a.addr + PAGE_SIZE:x}-0x{a.addr:x}", 23, "is inverted: end is before start"),
        ("0x10000-0x20000", 24, f"range 0x10000-0x20000 is not mapped in pid {pid}"),
        ("0x7fff00000000-0x900000000000", 25, "lies beyond the user address space"),
    ]
    for rng, code, text in cases:
        assert_error(cli("--pid", pid, "--range", rng, "--out", out), code, text)
        assert not Path(out).exists()
        t.assert_running()
    both = [
        f"0x{a.addr:x}-0x{a.addr + 3 * PAGE_SIZE:x}",
        f"0x{a.addr + 2 * PAGE_SIZE:x}-0x{a.end:x}",
    ]
    res = cli("--pid", pid, "--range", both[0], "--range", both[1], "--out", out)
    assert_error(res, 27, "overlap")
    t.assert_running()


def test_range_in_a_hole_between_mappings(target_factory: MakeTarget) -> None:
    t = target_factory(maps=["a:16"])
    a = t.mapping("a")
    t.cmd("munmap", name="a", page=4, count=8)
    hole = AddressRange(a.addr + 5 * PAGE_SIZE, a.addr + 9 * PAGE_SIZE)
    with pytest.raises(RangeUnmapped) as e:
        capture(ProcessIdentity.of(t.pid), [hole])
    assert str(e.value) == f"range {hole.format()} is not mapped in pid {t.pid}"
    t.assert_running()


# -- output ---------------------------------------------------------------------------


def test_output_errors(target_factory: MakeTarget, tmp_path: Path) -> None:
    t = target_factory(maps=["a:8"])
    pid = str(t.pid)
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = cli("--pid", pid, "--out", str(afile / "img"))
    assert_error(res, 30, f"cannot write output directory {afile / 'img'}: Not a directory")
    res = cli("--pid", pid, "--out", "/proc/cpcoord-img")
    assert_error(res, 30, "cannot write output directory /proc/cpcoord-img")
    full = tmp_path / "full"
    full.mkdir()
    (full / "precious").write_text("keep")
    res = cli("--pid", pid, "--out", str(full))
    assert_error(res, 33, f"output directory {full} is not empty")
    assert (full / "precious").read_text() == "keep"
    t.assert_running()


def test_output_full_mid_write(target_factory: MakeTarget, tmp_path: Path) -> None:
    """A filesystem that fills up while the image is written: exit 30, our files gone."""
    t = target_factory(maps=["a:2048"])  # 8 MiB of non-zero pages into a 1 MiB tmpfs
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)])
    require(r.returncode == 0, "cannot mount a small tmpfs")
    try:
        res = cli("--pid", str(t.pid), "--out", str(mnt))
        assert_error(res, 30, f"cannot write output directory {mnt}: No space left on device")
        assert list(mnt.iterdir()) == []
        t.assert_running()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
