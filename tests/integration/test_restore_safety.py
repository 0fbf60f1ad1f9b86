"""Restore in place never harms a process, through a real
coordinator and a real agent (subprocesses) and `cpcoord restore`.

The member is tests/helpers/c/remap_target.c: one region it rewrites and remaps on
command and checks itself (a hash it remembers). After a checkpoint it rewrites the
region and replaces its mapping by one with other permissions (RW -> R, RW -> RX) or
another backing (anonymous -> a file, one file -> another, private -> shared), at the
same address and size. A restore of the generation must then refuse with the reason
(member, region, what changed) and write nothing: the memory hashes the same before
and after, and the program goes on and passes its own check. (Before the fit check
compared mappings, the restore succeeded and wrote the cut's bytes into the new
mapping: the program's check failed.)

A restore that fails part-way (the agent's failure point `agent.restore.write` before
the third of three steps) must put back every byte it wrote: memory hashes the same,
the program passes its check, the CLI says the restore was undone; the next restore
(the point fails once) then writes the generation exactly.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cpcoord import faults
from nodeagent.restore.undo import STEP
from testbed.cluster import Cluster
from tests.helpers.restore_c import REMAP_TARGET, RemapTarget, build_c

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PAGE = 4096
ABORTED = 59  # RestoreAborted: the CLI's exit code for a restore that did not happen


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(REMAP_TARGET, tmp_path_factory.mktemp("c"))


@pytest.fixture
def spawn(exe: Path, tmp_path: Path) -> Iterator[Callable[..., RemapTarget]]:
    made: list[RemapTarget] = []

    def make(pages: int, start: str = "anon", files: bool = True) -> RemapTarget:
        paths = []
        for name in ("a", "b"):  # the files it maps in place of its region, on command
            f = tmp_path / f"file-{name}-{len(made)}"
            f.write_bytes(os.urandom(pages * PAGE) if files else b"")
            paths.append(f)
        t = RemapTarget(exe, pages, start, paths[0], paths[1])
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def _setup(c: Cluster, job: str, t: RemapTarget) -> int:
    c.cli("attach", "--job", job, "--member", "m", "--pid", str(t.pid), "--node", "node-a",
          "--range", f"{t.addr:#x}-{t.end:#x}")  # fmt: skip
    r = c.cli_json("checkpoint", "--job", job)
    assert r["state"] == "committed", r
    return int(r["generation"])


def _restore(c: Cluster, job: str, gen: int) -> tuple[int, str]:
    r = c.cli("restore", "--job", job, "--generation", str(gen), check=False)
    return r.returncode, r.stdout + r.stderr


CASES = [
    # (mapping at the cut, how it is replaced, what the refusal must say)
    ("anon", "ro", "permissions rw- -> r--"),
    ("anon", "rx", "permissions rw- -> r-x"),
    ("anon", "file", "anonymous memory -> "),
    ("file", "file2", "inode"),
    ("anon", "shared", "private -> shared"),
]


@pytest.mark.parametrize(("start", "how", "says"), CASES, ids=[c[1] for c in CASES])
def test_a_remapped_region_is_refused_and_left_alone(
    cluster_factory: Callable[..., Cluster],
    spawn: Callable[..., RemapTarget],
    start: str,
    how: str,
    says: str,
) -> None:
    c = cluster_factory(nodes=("node-a",))
    t = spawn(64, start)
    gen = _setup(c, "remap", t)
    t.send("fill 2")  # the memory moves on after the cut ...
    t.send(f"remap {how}")  # ... and its mapping is replaced, same address and size
    before = t.digest()
    code, out = _restore(c, "remap", gen)
    assert code == ABORTED, f"the restore was not refused:\n{out}"
    assert "mismatch" in out, out
    region = f"range-{t.addr:x}-{t.end:x}"
    assert "member m " in out and region in out, out
    assert says in out, out
    assert t.digest() == before, "a refused restore wrote into the process"
    t.check()  # the program agrees: its memory is what it left there
    assert t.quit() == 0


def test_a_restore_that_fails_part_way_puts_every_byte_back(
    cluster_factory: Callable[..., Cluster], spawn: Callable[..., RemapTarget]
) -> None:
    c = cluster_factory(nodes=("node-a",))
    c.restart_agent("node-a", fail=["agent.restore.write@3"])
    c.wait_agents(["node-a"])
    pages = 3 * STEP // PAGE  # three steps: the third one fails
    t = spawn(pages, files=False)
    gen = _setup(c, "undo", t)
    at_cut = t.digest()
    t.send("fill 2")
    before = t.digest()
    assert before != at_cut
    code, out = _restore(c, "undo", gen)
    assert code == ABORTED, f"the restore did not fail:\n{out}"
    assert "restore_failed" in out, out
    assert f"failed and was undone ({2 * STEP} bytes written were put back)" in out, out
    assert "fault point agent.restore.write" in out, out
    assert t.digest() == before, "bytes the failed restore wrote were not put back"
    t.check()  # the program agrees: its memory is as it left it
    # The failure point fails once: the next restore writes the generation, exactly.
    code, out = _restore(c, "undo", gen)
    assert code == 0, out
    assert t.digest() == at_cut
    assert t.quit() == 0


def test_pages_written_after_the_live_backup_are_put_back_as_they_are_now(
    cluster_factory: Callable[..., Cluster], spawn: Callable[..., RemapTarget]
) -> None:
    """A large rollback backs up live, before the freeze (nodeagent/daemon/restore_live.py).
    The program rewrites every page after that backup and before the freeze; the write
    then fails part-way: what is put back must be the bytes of that last rewrite, not the
    live copy's (the tracker reports them written since, so they are read frozen)."""
    c = cluster_factory(nodes=("node-a",))
    c.agent_env["node-a"] = {"CPCOORD_FAULT_HOLD": "agent.restore.live"}
    c.restart_agent("node-a", fail=["agent.restore.write@3"])
    c.wait_agents(["node-a"])
    pages = 3 * STEP // PAGE  # three steps: the third one fails
    t = spawn(pages, files=False)
    gen = _setup(c, "live", t)
    at_cut = t.digest()
    t.send("fill 2")  # every page written since the cut: a scope for the live backup
    got: list[tuple[int, str]] = []
    th = threading.Thread(target=lambda: got.append(_restore(c, "live", gen)))
    th.start()
    try:
        c.wait_fault("agent.restore.live")
        t.send("fill 3")  # after the live backup (which read fill 2), before the freeze
        now = t.digest()
    finally:
        faults.release_file("agent.restore.live", c.faults).touch()
        th.join(120)
    code, out = got[0]
    assert code == ABORTED, f"the restore did not fail:\n{out}"
    assert f"failed and was undone ({2 * STEP} bytes written were put back)" in out, out
    assert t.digest() == now, "the undo put back bytes older than the process's own"
    t.check()  # the program agrees: its memory is what it last put there (fill 3)
    log = (c.root / "agent-node-a.log").read_text()
    assert "restore live backup taken" in log, "the live backup was not used"
    # The failure point fails once: the next restore writes the generation, exactly.
    code, out = _restore(c, "live", gen)
    assert code == 0, out
    assert t.digest() == at_cut
    assert t.quit() == 0
