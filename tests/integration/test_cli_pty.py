"""Progress display of checkpoint, restore, export, verify and gc against a real cluster
(a coordinator and an agent as processes, a target process with known memory): under a
pseudo-terminal a bar redrawn in place (carriage returns, ESC[K) with phase, members or
chunks done, bytes and rate, then the final line; through pipes plain lines with neither
carriage returns nor escapes, and the same final line on stdout."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.cluster import Cluster
from testbed.daemons import REPO
from testbed.driver import Target

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PAGES = 64
RATE = re.compile(r"\d+(\.\d)? (B|KiB|MiB|GiB|TiB)/s")
ANSI = re.compile(r"\x1b\[")


def env() -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", TERM="xterm")
    for k in ("CPCOORD_COORDINATOR", "CPCOORD_FAULT_PAUSE", "CPCOORD_TOKEN", "CPCOORD_INSECURE"):
        e.pop(k, None)
    e["CPCOORD_CONFIG"] = os.devnull  # no user or system config file leaks in
    return e


@dataclass(frozen=True)
class Run:
    rc: int
    out: str  # pty: everything the terminal got; pipes: stdout
    err: str = ""  # pipes only


def run_pty(argv: list[str], timeout: float = 180) -> Run:
    """Run with stdout and stderr on a pseudo-terminal 200 columns wide; all it printed."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env(), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{argv} still running after {timeout}s: {chunks!r}")
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the last slave end closed, the child is gone
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    rc = proc.wait(timeout=30)
    return Run(rc, b"".join(chunks).decode(errors="replace"))


def run_pipe(argv: list[str], timeout: float = 180) -> Run:
    r = subprocess.run(argv, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    return Run(r.returncode, r.stdout, r.stderr)


def cpcoord(c: Cluster, *args: str) -> list[str]:
    return [sys.executable, "-m", "cpcoord", *args, "--coordinator", c.address]


def check_bar(
    r: Run, phases: list[str], counts: str, nbytes: str, final: str, rate: bool = True
) -> None:
    """The terminal got redraws of one bar line (each `\\r`...`ESC[K`) through `phases`,
    the last draw with `counts`, `nbytes` and a rate, then `final` as the last line."""
    assert r.rc == 0, r.out
    assert "Traceback" not in r.out, r.out
    lines = [ln.rstrip("\r") for ln in r.out.replace("\r\n", "\n").split("\n") if ln.strip()]
    assert lines[-1].startswith(final), f"last line {lines[-1]!r}, want {final!r}:\n{r.out!r}"
    bar = "\n".join(lines[:-1])
    draws = [d.removesuffix("\x1b[K") for d in bar.split("\r") if d]
    assert len(draws) >= 2, f"the bar is redrawn in place: {r.out!r}"
    assert all(d.endswith("\x1b[K") for d in bar.split("\r") if d), r.out
    seen = [p for p in phases if any(f" {p} " in d for d in draws)]
    assert seen == phases, f"phases {seen}, want {phases}: {draws}"
    last = draws[-1]
    assert counts in last and nbytes in last, f"{last!r} lacks {counts!r} / {nbytes!r}"
    assert not rate or RATE.search(last), f"no rate in {last!r}"
    assert "[####################]" in last or not counts, f"a full bar at the end: {last!r}"


def check_plain(r: Run, phases: list[str], counts: str, final: str, rate: bool = True) -> None:
    """Through pipes: plain progress lines on stderr, the final line on stdout."""
    assert r.rc == 0, r.out + r.err
    for text in (r.out, r.err):
        assert "\r" not in text and not ANSI.search(text), repr(text)
    assert r.out.strip().splitlines()[-1].startswith(final), r.out
    err = r.err.strip().splitlines()
    for p in phases:
        assert any(f": {p}, " in ln for ln in err), f"no line for phase {p}: {err}"
    assert counts in err[-1] and (not rate or RATE.search(err[-1])), err


def test_progress_on_a_terminal_and_plain_lines_through_pipes(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    c = cluster_factory(nodes=("node-a",))
    t = target_factory(maps=[f"data:{PAGES}"])
    m = t.mapping("data")
    c.cli("attach", "--job", "tty", "--member", "m0", "--pid", str(t.pid), "--node", "node-a",
          "--range", f"{m.addr:#x}-{m.end:#x}")  # fmt: skip
    size = f"{PAGES * 4096 // 1024}.0 KiB"

    # checkpoint: full, every page of the member captured
    r = run_pty(cpcoord(c, "checkpoint", "--job", "tty", "--full"))
    check_bar(r, ["freezing", "uploading", "committed"], "1/1 members", size,
              "generation 1 of tty committed")  # fmt: skip
    t.assert_running()
    r = run_pipe(cpcoord(c, "checkpoint", "--job", "tty", "--full"))
    check_plain(r, ["freezing", "committed"], "1/1 members", "generation 2 of tty committed")

    # restore in place: every page rewritten since is written back (only those: the
    # tracker knows what changed), the member running again
    t.cmd("write", name="data", page=0, count=PAGES, counter=9)
    r = run_pty(cpcoord(c, "restore", "--job", "tty"))
    check_bar(r, ["freezing", "writing", "committed"], "1/1 members", size,
              "generation 2 of tty restored")  # fmt: skip
    t.assert_running()
    t.cmd("write", name="data", page=0, count=PAGES, counter=10)
    r = run_pipe(cpcoord(c, "restore", "--job", "tty"))
    check_plain(r, ["freezing", "committed"], "1/1 members", "generation 2 of tty restored")
    t.assert_running()

    # export: members read, bytes of their pages
    r = run_pty(cpcoord(c, "export", "--job", "tty", "--out", str(tmp_path / "x1")))
    check_bar(r, ["reading", "done"], "1/1 members", size, "exported generation 2 of tty")
    r = run_pipe(cpcoord(c, "export", "--job", "tty", "--out", str(tmp_path / "x2")))
    check_plain(r, ["reading", "done"], "1/1 members", "exported generation 2 of tty")

    # verify: chunks checked of total, bytes read
    r = run_pty(cpcoord(c, "verify"))
    assert re.search(r"\d+/\d+ chunks", r.out), r.out
    check_bar(r, ["verifying", "done"], "chunks", "", "checked 2 generations")
    r = run_pipe(cpcoord(c, "verify"))
    check_plain(r, ["done"], "chunks", "checked 2 generations")

    # gc: its phases through to done
    r = run_pty(cpcoord(c, "gc", "--keep", "1"))
    check_bar(r, ["starting", "done"], "", "", "dropped 1 generation(s)", rate=False)
    r = run_pipe(cpcoord(c, "gc", "--keep", "1"))
    check_plain(r, ["done"], "", "dropped 0 generation(s)", rate=False)

    # --json: nothing but the JSON document, even on a terminal
    r = run_pty(cpcoord(c, "checkpoint", "--job", "tty", "--json"))
    assert r.rc == 0 and "\r\x1b" not in r.out and "\x1b[K" not in r.out, r.out
    assert r.out.lstrip().startswith("{"), r.out
    t.assert_running()
