"""Restore in place puts a whole-memory member's layout back as it was at the cut.

A real coordinator and agent (subprocesses) and `cpcoord restore`. Each member is a C
program (tests/helpers/c/layout_*.c, cpt_layout.h) that changes its own layout in a
loop and checks at every step that its mappings, protections, brk and the bytes in them
agree with what its memory says they are: map/unmap, mremap grow/shrink/move, brk
growth and shrink, mprotect (with split mappings), a stack that grew since the cut. Each
is checkpointed, runs on (its layout moves on), is rolled back in place, and must go on
passing its checks and end with exit 0. `poke` (a word only the test writes, after the
cut) proves the memory was rolled back.

A file mapping removed since the cut is mapped again from the unchanged file; when the
file changed since, the restore is refused with the reason and the process is untouched.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed.cluster import Cluster, attach_args
from tests.helpers.restore_c import C_DIR, CProcess, build_c

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ABORTED = 59  # RestoreAborted: the CLI's exit code for a restore that did not happen
KINDS = ("mapunmap", "mremap", "brk", "mprotect", "stack", "file")


class LayoutTarget(CProcess):
    """A layout_*.c program: `steps`, `mark` and `poke` of its struct cpt_run."""

    def __init__(self, argv: list[str], stopfile: Path) -> None:
        super().__init__(argv)
        self.run = int(self.first[1], 16)
        self.stopfile = stopfile

    def word(self, i: int) -> int:
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as f:
            f.seek(self.run + 8 * i)
            return int(struct.unpack("<Q", f.read(8))[0])

    def poke(self, value: int) -> None:
        with open(f"/proc/{self.pid}/mem", "r+b", buffering=0) as f:
            f.seek(self.run + 16)
            f.write(struct.pack("<Q", value))

    def wait(self, i: int, at_least: int, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.alive()
            if (v := self.word(i)) >= at_least:
                return v
            time.sleep(0.01)
        raise AssertionError(f"word {i} of pid {self.pid} stays below {at_least}")

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"exited {self.proc.returncode}: {self.stderr()}")

    def finish(self, timeout: float = 30) -> int:
        self.stopfile.touch()
        return self.proc.wait(timeout)


@pytest.fixture(scope="module")
def exes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("c")
    return {k: build_c(C_DIR / f"layout_{k}.c", d) for k in KINDS}


@pytest.fixture
def spawn(exes: dict[str, Path], tmp_path: Path) -> Iterator[Callable[..., LayoutTarget]]:
    made: list[LayoutTarget] = []

    def make(kind: str, *extra: Path) -> LayoutTarget:
        stop = tmp_path / f"stop-{len(made)}"
        t = LayoutTarget([str(exes[kind]), str(stop), *map(str, extra)], stop)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def _checkpoint(c: Cluster, job: str) -> int:
    r = c.cli_json("checkpoint", "--job", job)
    assert r["state"] == "committed", f"{r}\n{c.logs(80)}"
    return int(r["generation"])


def _restore(c: Cluster, job: str, gen: int) -> tuple[int, str]:
    r = c.cli("restore", "--job", job, "--generation", str(gen), check=False)
    return r.returncode, r.stdout + r.stderr


def _rolled_back_and_running(c: Cluster, t: LayoutTarget, gen: int) -> None:
    code, out = _restore(c, "lay", gen)
    assert code == 0, f"the restore failed:\n{out}\n{t.stderr()}\n{c.logs(80)}"
    t.alive()
    assert t.word(2) == 0, "the memory was not rolled back (poke survived)"
    steps = t.word(0)
    t.wait(0, steps + 300)  # it goes on, passing its checks at every step
    assert t.finish() == 0, t.stderr()


@pytest.mark.parametrize("kind", KINDS[:4])
def test_layout_changed_since_the_cut_is_put_back(
    cluster_factory: Callable[..., Cluster], spawn: Callable[..., LayoutTarget], kind: str
) -> None:
    c = cluster_factory(nodes=("node-a",))
    t = spawn(kind)
    c.cli(*attach_args("lay", "m", t.pid, "node-a"))
    t.wait(0, 50)
    gen = _checkpoint(c, "lay")
    t.poke(1)
    t.wait(0, t.word(0) + 200)  # every step changed the layout
    _rolled_back_and_running(c, t, gen)


def test_a_stack_grown_since_the_cut(
    cluster_factory: Callable[..., Cluster], spawn: Callable[..., LayoutTarget]
) -> None:
    c = cluster_factory(nodes=("node-a",))
    t = spawn("stack")
    c.cli(*attach_args("lay", "m", t.pid, "node-a"))
    gen = _checkpoint(c, "lay")
    cut_depth = t.word(1)
    t.poke(1)
    assert cut_depth < 8
    t.wait(1, cut_depth + 24)  # 24 frames of 32 KiB deeper than at the cut, at least
    _rolled_back_and_running(c, t, gen)


def _file_target(spawn: Callable[..., LayoutTarget], tmp_path: Path) -> tuple[LayoutTarget, Path]:
    data = tmp_path / "mapped"
    data.write_bytes(os.urandom(4 * 4096))
    go = tmp_path / "go"
    return spawn("file", go, data), data


def test_a_file_mapping_removed_since_the_cut_is_mapped_again(
    cluster_factory: Callable[..., Cluster], spawn: Callable[..., LayoutTarget], tmp_path: Path
) -> None:
    c = cluster_factory(nodes=("node-a",))
    t, _ = _file_target(spawn, tmp_path)
    c.cli(*attach_args("lay", "m", t.pid, "node-a"))
    gen = _checkpoint(c, "lay")
    t.poke(1)
    (tmp_path / "go").touch()
    t.wait(1, 1)  # unmapped
    (tmp_path / "go").unlink()
    _rolled_back_and_running(c, t, gen)


def test_a_changed_file_is_refused_and_the_process_left_alone(
    cluster_factory: Callable[..., Cluster], spawn: Callable[..., LayoutTarget], tmp_path: Path
) -> None:
    c = cluster_factory(nodes=("node-a",))
    t, data = _file_target(spawn, tmp_path)
    c.cli(*attach_args("lay", "m", t.pid, "node-a"))
    gen = _checkpoint(c, "lay")
    t.poke(1)
    (tmp_path / "go").touch()
    t.wait(1, 1)  # unmapped
    with data.open("ab") as f:  # the file changes: size and mtime
        f.write(b"x" * 4096)
    code, out = _restore(c, "lay", gen)
    assert code == ABORTED, f"the restore was not refused:\n{out}\n{c.logs(80)}"
    assert "member m" in out and str(data) in out and "changed since the cut" in out, out
    assert t.word(2) == 1 and t.word(1) == 1, "a refused restore changed the process"
    t.wait(0, t.word(0) + 300)
    with contextlib.suppress(FileNotFoundError):
        (tmp_path / "go").unlink()
    assert t.finish() == 0, t.stderr()


@pytest.mark.parametrize("kind", [*KINDS[:4], "file"])
def test_a_restore_that_fails_after_the_layout_changed_puts_the_layout_back(
    cluster_factory: Callable[..., Cluster],
    spawn: Callable[..., LayoutTarget],
    tmp_path: Path,
    kind: str,
) -> None:
    """The page write fails (fault point) after the layout was put back to the cut's:
    the bytes and then the layout are put back as they were before the restore (parked
    mappings moved back with their pages, re-created ones unmapped, brk and protections
    back), and the program goes on as if nothing happened; the next restore works."""
    c = cluster_factory(nodes=("node-a",))
    c.restart_agent("node-a", fail=["agent.restore.write@1"])
    c.wait_agents(["node-a"])
    t = _file_target(spawn, tmp_path)[0] if kind == "file" else spawn(kind)
    c.cli(*attach_args("lay", "m", t.pid, "node-a"))
    t.wait(0, 50)
    gen = _checkpoint(c, "lay")
    t.poke(1)
    if kind == "file":
        (tmp_path / "go").touch()
        t.wait(1, 1)  # unmapped
        (tmp_path / "go").unlink()
    t.wait(0, t.word(0) + 200)
    code, out = _restore(c, "lay", gen)
    assert code == ABORTED, f"the restore did not fail:\n{out}\n{c.logs(80)}"
    assert "fault point agent.restore.write" in out and "undone" in out, f"{out}\n{c.logs(80)}"
    assert t.word(2) == 1, "a failed restore left the memory rolled back"
    t.wait(0, t.word(0) + 300)  # it goes on, passing its checks
    _rolled_back_and_running(c, t, gen)  # the point fails once: this one works
