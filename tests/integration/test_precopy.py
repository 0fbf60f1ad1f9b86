"""Pre-copy (nodeagent/capture/precopy.py) on real processes.

The property: a target runs writer threads while, between the live passes (the module's
`between` hook, driven by hypothesis data), the test writes, maps, grows (mremap),
unmaps, protects and zero-fills its mappings; the pre-copied full capture, taken in one
frozen window together with a plain full capture, equals it byte for byte. The chain
goes on incrementally from there and stays exact. Then `cpcoord capture` with pre-copy
on and off, and its bad-input errors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpcoord.image import load_image, region_bytes
from cpcoord.image_chain import materialize
from nodeagent.capture import copyout, precopy
from nodeagent.capture.incremental import TrackedCapture
from nodeagent.capture.process import Capture, capture
from nodeagent.proc.freeze import frozen
from nodeagent.proc.procfs import ProcessIdentity
from nodeagent.trackers import registry
from testbed import patterns
from testbed.driver import Target
from tests.conftest import require
from tests.helpers.chains import (
    START_MAPS,
    WRITERS,
    Mapped,
    Model,
    apply_random_ops,
    assert_same,
    scratch_dir,
    write_link,
)

pytestmark = pytest.mark.integration
MakeTarget = Callable[..., Target]
REPO = Path(__file__).resolve().parents[2]
# soft-dirty is not in this kernel; it shares every line above the tracker with uffd-wp.
BACKENDS = ["uffd-wp"]


def _require(backend: str) -> None:
    avail = registry.availability(backend)
    require(avail.available, f"{backend}: {avail.reason}")


def assert_equal_captures(got: Capture, want: Capture, what: str) -> None:
    g = {r.name: r for r in got.regions}
    w = {r.name: r for r in want.regions}
    assert sorted(g) == sorted(w), f"{what}: regions differ: {sorted(set(g) ^ set(w))}"
    for name, ref in w.items():
        r = g[name]
        assert (r.start, r.end) == (ref.start, ref.end), f"{what}: {name} bounds"
        assert np.array_equal(r.all_pages, ref.all_pages), f"{what}: {name} page sets differ"
        assert np.array_equal(r.pages, ref.pages), f"{what}: {name} copied pages differ"
        bad = np.flatnonzero((r.data != ref.data).any(axis=1))
        assert bad.size == 0, (
            f"{what}: {name}: {bad.size} pages differ, first at offset {int(ref.pages[bad[0]])}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_precopied_capture_equals_memory_at_the_freeze(backend: str, data: st.DataObject) -> None:
    _require(backend)
    member = "m0"
    with (
        scratch_dir() as d,
        Target(maps=(*START_MAPS, "big:1024"), writers=[f"{WRITERS}:3"], tmpdir=d) as t,
    ):
        model = Model()
        for spec in (*START_MAPS, "big:1024"):
            name, pages, *kind = spec.split(":")
            model.maps[name] = Mapped.new(kind[0] if kind else "anon", int(pages))
        ident = ProcessIdentity.of(t.pid)
        tc = TrackedCapture(ident, None, backend)
        history: list[str] = []
        acts = data.draw(st.lists(st.booleans(), min_size=8, max_size=8), label="acts")

        def between(tick: int) -> None:  # the target runs: mutate it between passes
            if tick < len(acts) and acts[tick]:
                history.extend(f"{op}@{tick}" for op in apply_random_ops(t, model, data))

        limits = precopy.Limits(
            rounds=data.draw(st.integers(1, 5), label="rounds"),
            target_bytes=data.draw(st.sampled_from([0, 64 << 10, 4 << 20]), label="target"),
        )
        live = tc.precopy(limits, between=between)
        assert live is not None, "the tracker could not be armed for pre-copy"
        if data.draw(st.booleans(), label="ops after the passes"):
            history += apply_random_ops(t, model, data)
        with frozen(ident) as fp:
            res = tc.capture(fp=fp)
            ref = capture(ident, None, fp=fp)
        t.assert_running()
        what = f"{backend} after {history}, {live.passes}"
        assert res.full and res.capture.precopy is not None, what
        assert res.capture.precopy.fallback == "", what
        assert_equal_captures(res.capture, ref, what)
        # The chain goes on from the pre-copied image, incrementally and exactly.
        gen1 = d / "gen1"
        write_link(gen1, None, res, 1, member)
        tc.commit()
        history += apply_random_ops(t, model, data)
        with frozen(ident) as fp:
            res2 = tc.capture(fp=fp)
            ref2 = capture(ident, None, fp=fp)
        assert not res2.full, f"{what}: {res2.reason}"
        write_link(d / "gen2", gen1, res2, 2, member)
        tc.commit()
        assert_same(list(materialize(d / "gen2")), ref2, f"{what}, then incremental")
        tc.forget()
        t.cmd("stop_writers")
        t.assert_running()


def test_pages_appearing_past_the_staging_fall_back_to_a_frozen_copy(
    target_factory: MakeTarget,
) -> None:
    """Pages that appear after the live passes and do not fit the rows kept free: the
    cut copies everything frozen (staging grows), still exact."""
    _require("uffd-wp")
    t = target_factory(maps=["a:64"], writers=["a:1"])
    ident = ProcessIdentity.of(t.pid)
    tc = TrackedCapture(ident, None, "uffd-wp")
    live = tc.precopy(precopy.Limits(rounds=1))
    assert live is not None
    free = live.capacity - live.used
    t.cmd("mmap", name="late", pages=free + 16, kind="anon", fill="stamp")
    with frozen(ident) as fp:
        res = tc.capture(fp=fp)
        ref = capture(ident, None, fp=fp)
    assert res.capture.precopy is not None and res.capture.precopy.fallback
    assert_equal_captures(res.capture, ref, "fallback")
    tc.forget()


def _cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "cpcoord", "capture", *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


@pytest.mark.parametrize("flag", ["--precopy", "--no-precopy"])
def test_cli_capture_with_and_without_precopy(
    target_factory: MakeTarget, tmp_path: Path, flag: str
) -> None:
    """Writers run throughout: every page of theirs in the image is whole (one write,
    never torn between a live copy and a later write); the still mapping is exact."""
    _require("uffd-wp")
    t = target_factory(maps=["a:2048", "b:64"], writers=["a:2"])
    t.cmd("zero", name="b", page=4, count=8)
    out = tmp_path / "img"
    res = _cli(["--pid", str(t.pid), "--name", "m0", "--out", str(out), "--json", flag])
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    t.assert_running()
    if flag == "--precopy":
        pc = summary["precopy"]
        assert pc["rounds"] >= 1 and pc["passes"][0]["pages"] >= 2048 + 56
        assert pc["reused_pages"] > 0 and pc["fallback"] == ""
        assert not pc["reordered"]  # nothing appeared: the rows were in place
        assert pc["live_bytes"] == sum(p["bytes"] for p in pc["passes"])
    else:
        assert summary["precopy"] is None
    img = load_image(out)
    regs = {(r.start, r.end): r.name for r in img.member("m0").regions}
    am, bm = t.mapping("a"), t.mapping("b")

    def rows(m: object) -> np.ndarray:
        (name,) = [n for (s, e), n in regs.items() if s <= m.addr and m.end <= e]  # type: ignore[attr-defined]
        start = next(s for (s, e), n in regs.items() if n == name)
        first = (m.addr - start) // 4096  # type: ignore[attr-defined]
        return region_bytes(img, "m0", name)[first : first + m.pages]  # type: ignore[attr-defined]

    words = np.array(rows(am)).view(np.uint64).reshape(2048, patterns.WORDS)
    patterns.check_writer(words[:1024], am.id, 0, 1024)
    patterns.check_writer(words[1024:], am.id, 1024, 1024)
    want = t.expected("b", 0, 64)
    want[4:12] = 0
    assert np.array_equal(rows(bm), want)


@pytest.mark.parametrize("tracker", ["hash", "none"])
def test_cli_precopy_needs_a_tracker_that_sees_writes(
    target_factory: MakeTarget, tmp_path: Path, tracker: str
) -> None:
    t = target_factory(maps=["a:8"])
    out = tmp_path / "img"
    res = _cli(["--pid", str(t.pid), "--out", str(out), "--tracker", tracker, "--precopy"])
    assert res.returncode != 0 and "--precopy" in res.stderr
    assert not out.exists() or not any(out.iterdir())
    t.assert_running()
    ok = _cli(["--pid", str(t.pid), "--out", str(out), "--tracker", tracker, "--json"])
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["precopy"] is None


def test_cli_default_precopy_except_an_image_on_tmpfs(
    target_factory: MakeTarget, tmp_path: Path
) -> None:
    """By default a full capture pre-copies, except into a tmpfs image (copied into in
    place frozen, where a pre-copy would cost a second copy of everything)."""
    _require("uffd-wp")
    shm = Path(tempfile.mkdtemp(prefix=f"cpcoord-precopy-{os.getpid()}-", dir="/dev/shm"))
    try:
        for out, pre in ((tmp_path / "disk", True), (shm / "img", False)):
            t = target_factory(maps=["a:64"])
            res = _cli(["--pid", str(t.pid), "--out", str(out), "--json"])
            assert res.returncode == 0, res.stderr
            got = json.loads(res.stdout)["precopy"]
            assert (got is not None) == pre, (out, got)
            t.assert_running()
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_staging_prepared_at_attach_is_not_grown_by_the_precopy(
    target_factory: MakeTarget,
) -> None:
    """The agent sizes and faults in a member's staging when it attaches
    (copyout.prepare); the pre-copy of its first checkpoint keeps it rather than map
    and fault in a bigger one inside the checkpoint (it did: its row slack was bigger
    than the estimate's), and the capture is still exact."""
    _require("uffd-wp")
    t = target_factory(maps=["a:8192:anon:random:5"])
    ident = ProcessIdentity.of(t.pid)
    tc = TrackedCapture(ident, None, "uffd-wp")
    copyout.prepare(tc.staging, t.pid, None)
    assert tc.staging.allocations == 1
    live = tc.precopy(precopy.Limits(rounds=1))
    assert live is not None
    assert tc.staging.allocations == 1, "the pre-copy grew staging prepared at attach"
    with frozen(ident) as fp:
        res = tc.capture(fp=fp)
        ref = capture(ident, None, fp=fp)
    assert_equal_captures(res.capture, ref, "prepared staging")
    tc.forget()
