"""tests/helpers/c/detach_target.c driven from Python, for the "leaves no trace" tests: the
program checks its own memory, registers and signal state while it runs; from outside we
read what a tracker could have left (userfaultfds in /proc/PID/fd, `uw` in smaps
VmFlags, the signal masks in /proc/PID/status of every thread) and its progress counter.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from nodeagent.trackers import uffd_avail
from tests.conftest import require
from tests.helpers.restore_c import C_DIR, build_c, read_mem

UFFD_LINK = "anon_inode:[userfaultfd]"
SIG_FIELDS = ("SigBlk", "SigIgn", "SigCgt")
PAGE = 4096


def build(out_dir: Path) -> Path:
    avail = uffd_avail.availability()
    require(avail.available, f"uffd-wp: {avail.reason}")
    return build_c(C_DIR / "detach_target.c", out_dir)


def userfaultfds(pid: int) -> list[int]:
    """Every fd of `pid` that is a userfaultfd (readlink of each)."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == UFFD_LINK:
                out.append(int(name))
        except FileNotFoundError:
            continue
    return sorted(out)


class Traceless:
    """A running detach_target with `npages` pages of memory it checks itself."""

    def __init__(self, exe: Path, npages: int = 256) -> None:
        self.proc = subprocess.Popen(
            [str(exe), str(npages)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        words = self.proc.stdout.readline().split()
        assert words and words[0] == "ready", words
        self.addr, self.npages, self.state = int(words[1], 16), int(words[2]), int(words[3], 16)
        # Until its nap and wait threads have stepped: a thread glibc is still starting
        # has every signal blocked, which is no state to compare with.
        end = time.monotonic() + 10
        while not (self._field(4) and self._field(6)):
            assert time.monotonic() < end, "its threads never stepped"
            time.sleep(0.01)

    def _field(self, i: int) -> int:
        """The i-th 8-byte field of its struct spin_state (cpt_spin.h: main, main_sum,
        fp, fp_n, naps, naps_sum, waits, waits_sum)."""
        return int.from_bytes(read_mem(self.pid, self.state + 8 * i, 8), "little")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def span(self) -> tuple[int, int]:
        return self.addr, self.addr + self.npages * PAGE

    def uffds(self) -> list[int]:
        return userfaultfds(self.pid)

    def signal_state(self) -> dict[int, dict[str, str]]:
        """SigBlk/SigIgn/SigCgt of every thread."""
        out: dict[int, dict[str, str]] = {}
        for tid in sorted(int(t) for t in os.listdir(f"/proc/{self.pid}/task")):
            with open(f"/proc/{self.pid}/task/{tid}/status") as f:
                kv = dict(line.split(":", 1) for line in f if ":" in line)
            out[tid] = {k: kv[k].strip() for k in SIG_FIELDS}
        return out

    def uw_mappings(self) -> int:
        """Mappings still carrying VM_UFFD_WP (`uw` in VmFlags)."""
        with open(f"/proc/{self.pid}/smaps") as f:
            return sum(1 for line in f if line.startswith("VmFlags:") and " uw" in line)

    def steps(self) -> int:
        """The main loop's counter (first field of its struct spin_state)."""
        return self._field(0)

    def progresses(self, timeout: float = 10.0) -> bool:
        a = self.steps()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            time.sleep(0.05)
            if self.steps() > a + 1000:
                return True
        return False

    def finish(self) -> int:
        """Stop it (SIGTERM): its last checks must hold; the steps it made."""
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, (self.proc.returncode, out, err)
        words = out.split()
        assert words[:1] == ["ok"], out
        return int(words[1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)
