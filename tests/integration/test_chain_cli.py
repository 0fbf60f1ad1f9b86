"""Incremental chains through the command line (the local chain): `cpcoord capture
--out DIR1`, `cpcoord capture --parent DIR1 --out DIR2` in separate processes, `cpcoord
image flatten`, and the refusals when the parent does not fit.

Exactness needs a reference taken at the same state as the last capture: the target is
stopped with SIGSTOP before that capture and stays stopped until the reference is taken
(a stopped process runs no user code, so the kernel writes nothing for it either: a
thread returning to user space may otherwise get its rseq area updated).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cpcoord import cli
from cpcoord.errors import OutputNotWritable
from cpcoord.image import load_image, stored_offsets
from cpcoord.image_writer import ImageWriter
from nodeagent.capture import chain
from nodeagent.capture.process import capture
from nodeagent.proc.procfs import ProcessIdentity
from nodeagent.trackers import registry
from testbed.driver import REPO, Target
from tests.conftest import require
from tests.helpers.chains import assert_image_equals

pytestmark = pytest.mark.integration
MakeTarget = Callable[..., Target]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cpcoord", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=300,
    )


def cap(*argv: str) -> dict[str, Any]:
    res = run("capture", *argv, "--json")
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


@contextmanager
def stopped(t: Target) -> Iterator[None]:
    os.kill(t.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(t.pid, signal.SIGCONT)


def _require(backend: str) -> None:
    avail = registry.availability(backend)
    require(avail.available, f"{backend}: {avail.reason}")


def _mutate(t: Target, step: int) -> None:
    t.cmd("write", name="a", page=3 + step, count=5, counter=100 + step)
    t.cmd("zero", name="a", page=20, count=2)
    t.cmd("dontneed", name="a", page=30 + step, count=3)
    t.cmd("mmap", name=f"n{step}", pages=12, kind="anon" if step % 2 else "shared")
    t.cmd("grow", name="g", pages=32 + 40 * (step + 1))  # mremap: grows, may move
    t.cmd("mprotect", name="a", page=50, count=2, prot="r" if step % 2 else "rw")


@pytest.mark.parametrize("backend", ["uffd-wp", "hash", "none"])
def test_cli_chain_flattens_to_the_full_capture(
    backend: str, target_factory: MakeTarget, tmp_path: Path
) -> None:
    _require(backend)
    t = target_factory(maps=["a:64", "b:32", "g:32"])
    pid = str(t.pid)
    s1 = cap("--pid", pid, "--tracker", backend, "--out", str(tmp_path / "1"))
    assert s1["tracker"] == backend and s1["generation"] == 1 and s1["parent"] is None
    img1 = load_image(tmp_path / "1")
    assert img1.parent is None and img1.tracker is None
    _mutate(t, 0)
    t.cmd("munmap", name="b", page=0, count=32)
    s2 = cap("--pid", pid, "--parent", str(tmp_path / "1"), "--out", str(tmp_path / "2"))
    assert s2["generation"] == 2 and s2["parent"] == "../1" and s2["tracker"] == backend
    assert s2["incremental"] == (backend != "none")
    if backend != "none":
        assert s2["pages"] < s2["all_pages"] / 2, s2
    img2 = load_image(tmp_path / "2")
    assert img2.parent == "../1" and img2.tracker == backend
    assert all(r.all_pages is not None for r in img2.member(pid).regions)
    _mutate(t, 1)
    with stopped(t):
        s3 = cap("--pid", pid, "--parent", str(tmp_path / "2"), "--out", str(tmp_path / "3"))
        ref = capture(ProcessIdentity.of(t.pid), None)
    assert s3["generation"] == 3
    res = run("image", "flatten", str(tmp_path / "3"), "--out", str(tmp_path / "full"))
    assert res.returncode == 0, res.stderr
    assert_image_equals(tmp_path / "full", ref, pid)
    t.assert_running()


def test_parent_mismatch_and_stale_parents(target_factory: MakeTarget, tmp_path: Path) -> None:
    _require("uffd-wp")
    a = target_factory(maps=["a:16"])
    b = target_factory(maps=["a:16"])
    d1 = str(tmp_path / "1")
    cap("--pid", str(a.pid), "--tracker", "uffd-wp", "--out", d1)

    def refused(code: int, text: str, *argv: str) -> None:
        out = tmp_path / f"x{len(os.listdir(tmp_path))}"
        res = run("capture", *argv, "--out", str(out))
        assert res.returncode == code, (res.returncode, res.stderr)
        assert text in res.stderr, res.stderr
        assert not out.exists()

    # another process: its own member name, or the parent's name on purpose
    refused(34, "has no member", "--pid", str(b.pid), "--parent", d1)
    refused(34, f"captured from pid {a.pid}", "--pid", str(b.pid), "--name", str(a.pid),
            "--parent", d1)  # fmt: skip
    # another tracker
    refused(34, "armed by tracker uffd-wp, not hash", "--pid", str(a.pid), "--tracker", "hash",
            "--parent", d1)  # fmt: skip
    # not an image, and an image without tracker state (a flattened one)
    refused(34, "not an image", "--pid", str(a.pid), "--parent", str(tmp_path))
    assert cli.main(["image", "flatten", d1, "--out", str(tmp_path / "flat")]) == 0
    refused(34, "no tracker state", "--pid", str(a.pid), "--parent", str(tmp_path / "flat"))
    # the chain moved on: DIR1 can be continued once
    cap("--pid", str(a.pid), "--parent", d1, "--out", str(tmp_path / "2"))
    refused(35, "captured again since", "--pid", str(a.pid), "--parent", d1)
    # a new chain re-arms the process: the old one is stale, the new one works
    cap("--pid", str(a.pid), "--out", str(tmp_path / "new"))
    refused(35, "captured again since", "--pid", str(a.pid), "--parent", str(tmp_path / "2"))
    s = cap("--pid", str(a.pid), "--parent", str(tmp_path / "new"), "--out", str(tmp_path / "n2"))
    assert s["incremental"] and s["full_reason"] == ""
    a.assert_running()
    b.assert_running()


def test_failed_capture_keeps_pages_pending(
    target_factory: MakeTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Must show 2 at the command level: a capture that fails after its tracker
    re-armed writes its pages back into the parent's state; retrying is exact."""
    _require("uffd-wp")
    t = target_factory(maps=["a:64"])
    pid = str(t.pid)
    d1 = tmp_path / "1"
    cap("--pid", pid, "--tracker", "uffd-wp", "--out", str(d1))
    t.cmd("write", name="a", page=7, count=4, counter=77)

    def broken(self: ImageWriter) -> None:
        raise OutputNotWritable(self.out, "disk full (test)")

    with monkeypatch.context() as mp:
        mp.setattr(ImageWriter, "commit", broken)
        code = cli.main(
            ["capture", "--pid", pid, "--parent", str(d1), "--out", str(tmp_path / "2")]
        )
    assert code == 30
    assert not (tmp_path / "2").exists()
    state, _ = chain.load_state(d1, pid)
    first = t.mapping("a").addr // 4096
    assert set(range(first + 7, first + 11)) <= set(state.pending.tolist())
    t.cmd("write", name="a", page=40, count=1, counter=78)
    with stopped(t):
        s = cap("--pid", pid, "--parent", str(d1), "--out", str(tmp_path / "2"))
        ref = capture(ProcessIdentity.of(t.pid), None)
    assert s["incremental"] and s["changed"]["pending"] >= 4
    img = load_image(tmp_path / "2")
    (ra,) = [r for r in img.member(pid).regions if r.start == t.mapping("a").addr]
    assert {7, 8, 9, 10, 40} <= set(stored_offsets(ra.pages).tolist())
    assert cli.main(["image", "flatten", str(tmp_path / "2"), "--out", str(tmp_path / "f")]) == 0
    assert_image_equals(tmp_path / "f", ref, pid)
    assert np.array_equal(
        t.read("a", 7, 4), t.expected("a", 7, 4, 77)
    )  # the target itself is untouched
    t.assert_running()
