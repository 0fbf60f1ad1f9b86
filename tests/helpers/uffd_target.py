"""The C program tests/helpers/c/uffd_target.c in `mem` mode, for the uffd-wp tests: it
maps private anonymous regions (4 KiB pages, THP off), writes every page, then writes
exactly the pages a test names. `c_target` (a session fixture, registered in
tests/conftest.py) builds it; `MemTarget` runs it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from nodeagent.proc.procfs import Mapping, ProcessIdentity, read_maps
from nodeagent.trackers import uffd_avail
from tests.conftest import require

C_SOURCE = Path(__file__).resolve().parent / "c" / "uffd_target.c"
PAGE = 4096


@pytest.fixture(scope="session")
def c_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(shutil.which("gcc") is not None, "gcc is needed to build the C test target")
    avail = uffd_avail.availability()
    require(avail.available, f"uffd-wp: {avail.reason}")
    out = tmp_path_factory.mktemp("c") / "uffd_target"
    subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", str(out), str(C_SOURCE)], check=True)
    return out


class MemTarget:
    """The C target in `mem` mode: regions, commands, and the mappings they occupy."""

    def __init__(self, exe: Path, *npages: int, mode: str = "mem") -> None:
        self.proc = subprocess.Popen(
            [str(exe), mode, *map(str, npages)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.regions: list[tuple[int, int]] = []  # (start, length)
        assert self.proc.stdout is not None
        while True:
            words = self.proc.stdout.readline().split()
            if words[0] == "ready":
                break
            self.regions.append((int(words[1], 16), int(words[2])))
        self.ident = ProcessIdentity.of(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cmd(self, line: str) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        words = self.proc.stdout.readline().split()
        assert words and words[0] == "ok", (line, words)
        return words[1:]

    def write(self, pages: list[int]) -> None:
        for p in pages:
            self.cmd(f"w {p * PAGE:x} 1 1")

    def mappings(self) -> list[Mapping]:
        """The current VMAs that overlap the test's regions (adjacent regions may merge)."""
        return [
            m
            for m in read_maps(self.pid)
            if any(m.start < s + n and m.end > s for s, n in self.regions)
        ]

    def pages(self, i: int) -> list[int]:
        s, n = self.regions[i]
        return list(range(s // PAGE, (s + n) // PAGE))

    def close(self) -> int:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("q\n")
            self.proc.stdin.flush()
            return self.proc.wait(timeout=10)
        return self.proc.returncode
