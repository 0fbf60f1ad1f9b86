"""Incremental chains through the library.

For every backend available here (uffd-wp, hash, none = full), the property of
tests/helpers/chains.py: random writes, mappings that appear, vanish, move, grow and
change protection between captures, writer threads running throughout; after each
committed capture the flattened chain equals a full capture taken in the same frozen
window, byte for byte; aborted captures (dropped, or failed after the tracker re-armed)
never make a later one miss a page. Deterministic cases pin the pieces one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpcoord.errors import ReadFailed
from cpcoord.image_chain import materialize
from nodeagent.capture.incremental import TrackedCapture, TrackedResult
from nodeagent.capture.process import Capture, capture
from nodeagent.proc import uffd
from nodeagent.proc.freeze import frozen
from nodeagent.proc.procfs import ProcessIdentity
from nodeagent.trackers import registry
from testbed.driver import Target
from tests.conftest import require
from tests.helpers.chains import assert_same, failing_readv, run_chain, write_link

pytestmark = pytest.mark.integration
MakeTarget = Callable[..., Target]
BACKENDS = ["uffd-wp", "hash", "none"]


def _require(backend: str) -> None:
    avail = registry.availability(backend)
    require(avail.available, f"{backend}: {avail.reason}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_chain_equals_full_capture_at_the_same_freeze(backend: str, data: st.DataObject) -> None:
    _require(backend)
    run_chain(backend, data, rounds=4)


def _round(tc: TrackedCapture, ident: ProcessIdentity) -> tuple[TrackedResult, Capture]:
    with frozen(ident) as fp:
        res = tc.capture(fp=fp)
        ref = capture(ident, None, fp=fp)
    return res, ref


@pytest.mark.parametrize("backend", ["uffd-wp", "hash"])
def test_abort_then_commit_is_exact(
    backend: str, target_factory: MakeTarget, tmp_path: Path
) -> None:
    """Must show 2, deterministically: pages written before an aborted capture (which
    re-armed the tracker) are still in the next one."""
    _require(backend)
    t = target_factory(maps=["a:64", "b:16"])
    ident = ProcessIdentity.of(t.pid)
    tc = TrackedCapture(ident, None, backend)
    res, _ = _round(tc, ident)
    assert res.full
    write_link(tmp_path / "1", None, res, 1, "m")
    tc.commit()
    a = t.mapping("a")
    t.cmd("write", name="a", page=5, count=3, counter=11)
    dropped, _ = _round(tc, ident)
    assert not dropped.full
    assert {5, 6, 7} <= _stored(dropped, a.addr)
    tc.abort()
    assert {a.addr // 4096 + p for p in (5, 6, 7)} <= set(tc.pending.tolist())
    t.cmd("write", name="b", page=1, count=1, counter=12)
    # And once more, failing after the collect this time.
    with frozen(ident) as fp, pytest.raises(ReadFailed):
        tc.capture(fp=fp, readv=failing_readv)
    t.cmd("write", name="a", page=40, count=1, counter=13)
    res, ref = _round(tc, ident)
    assert not res.full and res.counts.pending >= 4
    assert {5, 6, 7, 40} <= _stored(res, a.addr)
    write_link(tmp_path / "2", tmp_path / "1", res, 2, "m")
    tc.commit()
    assert tc.pending.size == 0
    assert_same(list(materialize(tmp_path / "2")), ref, "after abort + failure")
    t.assert_running()


def _stored(res: TrackedResult, addr: int) -> set[int]:
    """Page indices from `addr` (a mapping's start) that the capture copied."""
    r = res.capture.region(_name(res, addr))
    skip = (addr - r.start) // 4096
    return {p - skip for p in r.pages.tolist() if p >= skip}


def _name(res: TrackedResult, addr: int) -> str:
    for r in res.capture.regions:
        if r.start <= addr < r.end:
            return r.name
    raise AssertionError(f"no region at 0x{addr:x}")


def test_uffd_lost_falls_back_to_full_and_rearms(target_factory: MakeTarget) -> None:
    """The target closes our uffd: that capture is full, the next one incremental."""
    _require("uffd-wp")
    t = target_factory(maps=["a:32"])
    ident = ProcessIdentity.of(t.pid)
    tc = TrackedCapture(ident, None, "uffd-wp")
    tc.capture()
    tc.commit()
    fd = tc.tracker.fd  # type: ignore[union-attr]
    assert fd is not None
    _close_in_target(ident, fd)
    res, ref = _round(tc, ident)
    assert res.full and "lost" in res.reason
    assert res.capture.pages == ref.pages
    tc.commit()
    t.cmd("write", name="a", page=2, count=1, counter=3)
    res2, _ = _round(tc, ident)
    assert not res2.full
    assert 2 in _stored(res2, t.mapping("a").addr)
    t.assert_running()


def _close_in_target(ident: ProcessIdentity, fd: int) -> None:
    """close(fd) inside the target, as a program closing every fd would."""
    from nodeagent.proc.inject import Injector

    with frozen(ident) as fp, Injector(fp) as inj:
        assert inj.syscall(uffd.NR_CLOSE, fd) == 0


def test_new_mapping_and_vanished_pages(target_factory: MakeTarget) -> None:
    """Pages that vanish are dropped from all_pages; a new mapping is stored whole."""
    _require("uffd-wp")
    t = target_factory(maps=["a:32"])
    ident = ProcessIdentity.of(t.pid)
    tc = TrackedCapture(ident, None, "uffd-wp")
    tc.capture()
    tc.commit()
    t.cmd("dontneed", name="a", page=4, count=4)
    t.cmd("mmap", name="n", pages=8)
    res, _ = _round(tc, ident)
    a, n = t.mapping("a"), t.mapping("n")
    ra = res.capture.region(_name(res, a.addr))
    skip = (a.addr - ra.start) // 4096
    assert not {skip + p for p in range(4, 8)} & set(ra.all_pages.tolist())
    rn = res.capture.region(_name(res, n.addr))
    base = (n.addr - rn.start) // 4096
    new = [p for p in rn.pages.tolist() if base <= p < base + 8]
    assert new == list(range(base, base + 8))
    rows = rn.data[[rn.pages.tolist().index(p) for p in new]]
    assert np.array_equal(rows, t.expected("n", 0, 8))
    t.assert_running()
