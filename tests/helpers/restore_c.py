"""Test-side drivers of the C restore target (tests/helpers/c/restore_target.c) and the C
example (examples/c/checkpoint_self.c): building them, and talking to running ones.

    exe = build_c(RESTORE_TARGET, tmp_dir)
    with CmdTarget(exe, pages=64) as t:       # explicit-region mode
        t.step(10); t.check(); t.stats()
    with SpinTarget(exe) as t:                # whole-memory mode
        t.counters()                          # {"main": ..., "fp_n": ..., ...}
    with SharedTarget(build_c(SHARED_TARGET, d), pages=64) as t:  # shared objects
        t.send("check 0")                     # "ok" or "bad OBJECT PAGE"
"""

from __future__ import annotations

import hashlib
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import numpy as np

from tests.conftest import require

REPO = Path(__file__).resolve().parents[2]
C_DIR = REPO / "tests" / "helpers" / "c"  # C targets; their shared header is cptest.h
RESTORE_TARGET = C_DIR / "restore_target.c"
SHARED_TARGET = C_DIR / "shared_target.c"
COW_TARGET = C_DIR / "cow_target.c"
REMAP_TARGET = C_DIR / "remap_target.c"
C_EXAMPLE = REPO / "examples" / "c" / "checkpoint_self.c"
SPIN_FIELDS = ("main", "main_sum", "fp", "fp_n", "naps", "naps_sum", "waits", "waits_sum")


def build_c(source: Path, out_dir: Path) -> Path:
    require(shutil.which("gcc") is not None, "gcc is needed to build the C test programs")
    out = out_dir / source.stem
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-pthread", f"-I{C_DIR}", "-o", str(out), str(source)],
        check=True,
    )
    return out


def read_mem(pid: int, addr: int, n: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(n)


def digest(pid: int, spans: list[tuple[int, int]]) -> str:
    """BLAKE2 of the bytes of `[start, end)` spans of a process (through /proc/PID/mem)."""
    h = hashlib.blake2b()
    for a, b in spans:
        h.update(read_mem(pid, a, b - a))
    return h.hexdigest()


class CProcess:
    """A C test target run as a child process: the base of the targets below."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.pid = self.proc.pid
        self.first = self.line().split()

    def line(self, timeout: float = 20.0) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"pid {self.pid} did not answer in {timeout}s")
        out = self.proc.stdout.readline().decode().strip()
        if not out:
            raise AssertionError(f"pid {self.pid} exited: {self.proc.wait()} {self.stderr()}")
        return out

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class CmdTarget(CProcess):
    """`restore_target cmd PAGES`: a state region changed only on command."""

    def __init__(self, exe: Path, pages: int = 64) -> None:
        super().__init__([str(exe), "cmd", str(pages)])
        self.addr = int(self.first[1], 16)
        self.pages = pages
        self.end = self.addr + pages * 4096

    def __enter__(self) -> CmdTarget:
        return self

    def send(self, text: str) -> dict[str, str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()
        words = self.line().split()
        out = dict(w.split("=", 1) for w in words[1:])
        out["status"] = words[0]
        return out

    def step(self, k: int) -> dict[str, str]:
        return self.send(f"step {k}")

    def check(self) -> dict[str, str]:
        return self.send("check")

    def stats(self) -> dict[str, str]:
        return self.send("stats")

    def region(self) -> np.ndarray:
        return np.frombuffer(read_mem(self.pid, self.addr, self.end - self.addr), np.uint8)


class SpinTarget(CProcess):
    """`restore_target spin`: threads whose registers must agree with their memory."""

    def __init__(self, exe: Path) -> None:
        super().__init__([str(exe), "spin"])
        self.state = int(self.first[1], 16)

    def __enter__(self) -> SpinTarget:
        return self

    def counters(self, raw: bytes | None = None) -> dict[str, float]:
        data = raw if raw is not None else read_mem(self.pid, self.state, 64)
        words = np.frombuffer(data[:64], dtype=np.uint64)
        out: dict[str, float] = {k: int(v) for k, v in zip(SPIN_FIELDS, words, strict=True)}
        out["fp"] = float(np.frombuffer(data[16:24], dtype=np.float64)[0])
        return out

    def wait_exit(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return self.proc.returncode
            time.sleep(0.02)
        return None


class SharedTarget(CProcess):
    """`shared_target PAGES [keep]` (tests/helpers/c/shared_target.c): four shared
    objects (memfd, shared anonymous, SysV, /dev/shm file) it never touched itself."""

    OBJECTS = ("memfd", "anon", "sysv", "shm")

    def __init__(self, exe: Path, pages: int = 64, keep: bool = False) -> None:
        super().__init__([str(exe), str(pages), *(["keep"] if keep else [])])
        f = self.first
        self.addrs = {n: int(a, 16) for n, a in zip(self.OBJECTS, f[1:5], strict=True)}
        self.pages = int(f[5])
        self.path = f[6] if f[6] != "-" else ""

    def __enter__(self) -> SharedTarget:
        return self

    def send(self, text: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()
        return self.line()

    def span(self, name: str) -> tuple[int, int]:
        a = self.addrs[name]
        return a, a + self.pages * 4096

    def present(self, name: str) -> int:
        """How many pages of the object are mapped in this process's page tables."""
        a, b = self.span(name)
        with open(f"/proc/{self.pid}/pagemap", "rb", buffering=0) as f:
            f.seek(a // 4096 * 8)
            words = np.frombuffer(f.read((b - a) // 4096 * 8), dtype=np.uint64)
        return int(np.count_nonzero(words >> np.uint64(63)))


class CowTarget(CProcess):
    """`cow_target MIB` (tests/helpers/c/cow_target.c): MIB MiB filled, then forked; the
    child shares them copy-on-write and checks its copy when the parent is asked."""

    def __init__(self, exe: Path, mib: int) -> None:
        super().__init__([str(exe), str(mib)])
        self.addr = int(self.first[1], 16)
        self.mib = int(self.first[2])
        self.child = int(self.first[3])
        self.end = self.addr + (self.mib << 20)

    def __enter__(self) -> CowTarget:
        return self

    def check(self) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"check\n")
        self.proc.stdin.flush()
        return self.line()

    def expected(self) -> np.ndarray:
        """The pattern `(pages, 4096)` both hold."""
        pages = self.mib * 256
        page = np.arange(pages, dtype=np.uint64)[:, None]
        i = np.arange(512, dtype=np.uint64)[None, :]
        with np.errstate(over="ignore"):
            words = cpt_mix((page << np.uint64(12)) ^ i ^ np.uint64(0xC0 << 56))
        return words.view(np.uint8).reshape(pages, 4096)


def cpt_mix(x: np.ndarray) -> np.ndarray:
    """cptest.h's cpt_mix over a uint64 array."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(33))
        x = x * np.uint64(0xFF51AFD7ED558CCD)
        x = x ^ (x >> np.uint64(33))
        x = x * np.uint64(0xC4CEB9FE1A85EC53)
        return x ^ (x >> np.uint64(33))


class RemapTarget(CProcess):
    """`remap_target PAGES START FILE_A FILE_B` (tests/helpers/c/remap_target.c): one
    region the test rewrites and remaps on command; `check()` is its own verdict."""

    def __init__(self, exe: Path, pages: int, start: str, file_a: Path, file_b: Path) -> None:
        super().__init__([str(exe), str(pages), start, str(file_a), str(file_b)])
        self.addr = int(self.first[1], 16)
        self.end = self.addr + pages * 4096

    def __enter__(self) -> RemapTarget:
        return self

    def send(self, text: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()
        words = self.line().split()
        assert words[0] == "ok", f"{text!r} answered {words}"
        return words[1]

    def check(self) -> str:
        """The region still holds what the program last put there (else it exits 3)."""
        return self.send("check")

    def quit(self, timeout: float = 10) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"quit\n")
        self.proc.stdin.flush()
        return self.proc.wait(timeout)

    def digest(self) -> str:
        return digest(self.pid, [(self.addr, self.end)])
