"""The incremental-chain property, shared by the host tests
(tests/integration/test_incremental.py) and the soft-dirty run inside the qemu guest
(tests/kernel/guest/test_incremental_softdirty.py).

A target (testbed/target.py) runs writer threads over one mapping while the test
applies random operations between captures: writes, zero fills, MADV_DONTNEED, mprotect,
new mappings of several kinds, munmap of whole mappings or pieces, heap-like growth by
mremap. Each round freezes the target once and, in that one frozen window, takes the
incremental capture (TrackedCapture) and a full reference capture. The round is then
committed (its image joins the chain, whose flattening must equal the reference byte for
byte) or aborted (dropped, or failed half-way after the tracker re-armed); the next
committed round must still be exact.
"""

from __future__ import annotations

import ctypes
import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from cpcoord.errors import ReadFailed
from cpcoord.image import load_image, region_bytes, stored_offsets
from cpcoord.image_chain import FlatRegion, flatten, materialize, parent_link
from cpcoord.image_writer import ImageWriter
from cpcoord.ranges import PAGE_SIZE
from nodeagent.capture.incremental import TrackedCapture, TrackedResult
from nodeagent.capture.process import Capture, capture
from nodeagent.proc.freeze import frozen
from nodeagent.proc.procfs import ProcessIdentity
from testbed.driver import Target
from tests.helpers.sparse import data_extents

WRITERS = "w"
START_MAPS = ("w:48", "a:64", "s:24:shared", "m:16:memfd", "f:16:file", "y:8:sysv")
SHARED_KINDS = ("shared", "memfd", "sysv")


@dataclass
class Mapped:
    """The test's model of one target mapping: which pages exist and may be written."""

    kind: str
    mapped: np.ndarray  # bool per page
    writable: np.ndarray  # bool per page
    intact: bool = True  # one VMA, never split: mremap may grow it

    @classmethod
    def new(cls, kind: str, pages: int) -> Mapped:
        return cls(kind, np.ones(pages, dtype=bool), np.ones(pages, dtype=bool))


@dataclass
class Model:
    maps: dict[str, Mapped] = field(default_factory=dict)
    made: int = 0

    def spans(self, name: str, need: np.ndarray, longest: int = 8) -> list[tuple[int, int]]:
        """(page, count) runs of pages where `need` holds, each at most `longest`."""
        out: list[tuple[int, int]] = []
        idx = np.flatnonzero(need)
        if idx.size == 0:
            return out
        brk = np.flatnonzero(np.diff(idx) != 1) + 1
        for run in np.split(idx, brk):
            for i in range(0, run.size, longest):
                out.append((int(run[i]), int(min(longest, run.size - i))))
        return out


def _pick_span(data: st.DataObject, spans: list[tuple[int, int]]) -> tuple[int, int]:
    page, count = data.draw(st.sampled_from(spans))
    first = data.draw(st.integers(0, count - 1))
    n = data.draw(st.integers(1, count - first))
    return page + first, n


def _shared_writable(model: Model, names: list[str]) -> list[str]:
    """Shared mappings with pages a forked child may write (it inherits the protections)."""
    return [
        n
        for n in names
        if model.maps[n].kind in SHARED_KINDS
        and (model.maps[n].mapped & model.maps[n].writable).any()
    ]


def apply_random_ops(t: Target, model: Model, data: st.DataObject) -> list[str]:
    """1-6 random operations the model allows; returns them for the failure report."""
    done: list[str] = []
    for _ in range(data.draw(st.integers(1, 6), label="ops")):
        names = sorted(model.maps)
        structural = [n for n in names if n != WRITERS]
        ops = ["write", "zero", "dontneed", "mmap"]
        if _shared_writable(model, names):
            ops.append("child-write")  # another process writes a shared mapping
        if structural:
            ops += ["mprotect", "munmap", "munmap-part"]
        if any(model.maps[n].kind == "anon" and model.maps[n].intact for n in structural):
            ops.append("grow")
        op = data.draw(st.sampled_from(ops), label="op")
        if op in ("write", "zero"):
            cands = [n for n in names if (model.maps[n].mapped & model.maps[n].writable).any()]
            if not cands:
                continue
            name = data.draw(st.sampled_from(cands))
            m = model.maps[name]
            page, count = _pick_span(data, model.spans(name, m.mapped & m.writable))
            extra = {"counter": data.draw(st.integers(1, 10**6))} if op == "write" else {}
            t.cmd(op, name=name, page=page, count=count, **extra)
        elif op == "child-write":
            name = data.draw(st.sampled_from(_shared_writable(model, names)))
            m = model.maps[name]
            page, count = _pick_span(data, model.spans(name, m.mapped & m.writable))
            counter = data.draw(st.integers(1, 10**6))
            t.cmd("child_write", name=name, page=page, count=count, counter=counter)
        elif op == "dontneed":
            cands = [n for n in names if model.maps[n].mapped.any()]
            name = data.draw(st.sampled_from(cands))
            page, count = _pick_span(data, model.spans(name, model.maps[name].mapped))
            t.cmd("dontneed", name=name, page=page, count=count)
        elif op == "mmap":
            model.made += 1
            name = f"n{model.made}"
            kind = data.draw(st.sampled_from(["anon", "anon", "shared", "memfd", "sysv"]))
            pages = data.draw(st.integers(1, 40))
            fill = data.draw(st.sampled_from(["stamp", "zero", f"random:{model.made}"]))
            t.cmd("mmap", name=name, pages=pages, kind=kind, fill=fill)
            model.maps[name] = Mapped.new(kind, pages)
        elif op == "mprotect":
            name = data.draw(st.sampled_from(structural))
            m = model.maps[name]
            page, count = _pick_span(data, model.spans(name, m.mapped))
            prot = data.draw(st.sampled_from(["r", "rw", "none"]))
            t.cmd("mprotect", name=name, page=page, count=count, prot=prot)
            m.writable[page : page + count] = prot == "rw"
            m.intact = False
        elif op == "munmap":
            name = data.draw(st.sampled_from(structural))
            m = model.maps.pop(name)
            t.cmd("munmap", name=name, page=0, count=m.mapped.size)  # holes included
        elif op == "munmap-part":
            name = data.draw(st.sampled_from(structural))
            m = model.maps[name]
            if m.mapped.size < 3 or not m.mapped[1:-1].any():
                continue
            page, count = _pick_span(data, model.spans(name, np.r_[False, m.mapped[1:-1], False]))
            t.cmd("munmap", name=name, page=page, count=count)
            m.mapped[page : page + count] = False
            m.writable[page : page + count] = False
            m.intact = False
        elif op == "grow":
            cands = [n for n in structural if model.maps[n].kind == "anon" and model.maps[n].intact]
            name = data.draw(st.sampled_from(cands))
            m = model.maps[name]
            more = data.draw(st.integers(1, 96))
            t.cmd("grow", name=name, pages=m.mapped.size + more)
            model.maps[name] = Mapped(
                m.kind, np.r_[m.mapped, np.ones(more, bool)], np.r_[m.writable, np.ones(more, bool)]
            )
        else:
            continue
        done.append(op)
    return done


def assert_same(flat: list[FlatRegion], ref: Capture, what: str) -> None:
    """The flattened chain equals the reference full capture, byte for byte."""
    got = {r.name: r for r in flat}
    want = {r.name: r for r in ref.regions}
    assert sorted(got) == sorted(want), f"{what}: regions differ: {sorted(set(got) ^ set(want))}"
    for name, w in want.items():
        g = got[name]
        assert (g.start, g.end) == (w.start, w.end), f"{what}: {name} bounds differ"
        diff = sorted(set(g.pages.tolist()) ^ set(w.all_pages.tolist()))
        assert not diff, f"{what}: {name}: page sets differ at offsets {diff[:8]}"
        bad = np.flatnonzero((g.data != w.data).any(axis=1))
        assert bad.size == 0, (
            f"{what}: {name}: {bad.size} pages differ, first at offset {int(w.all_pages[bad[0]])}"
        )


def assert_image_equals(path: Path, ref: Capture, member: str) -> None:
    """An image directory (a flattened chain) equals the reference, byte for byte: the
    same regions and pages, the same bytes for them, and no data anywhere else in the
    region files (checked on the files' data extents, so big sparse regions stay cheap)."""
    img = load_image(path)
    assert img.parent is None and img.tracker is None
    regions = {r.name: r for r in img.member(member).regions}
    assert sorted(regions) == sorted(r.name for r in ref.regions)
    for w in ref.regions:
        r = regions[w.name]
        assert r.all_pages is None and (r.start, r.end) == (w.start, w.end)
        assert np.array_equal(stored_offsets(r.pages), w.all_pages), w.name
        rows = region_bytes(img, member, w.name)
        assert np.array_equal(rows[w.all_pages.astype(np.int64)], w.data), w.name
        for a, b in data_extents(path / f"{member}/{w.name}.raw"):
            pages = np.arange(a // PAGE_SIZE, -(-b // PAGE_SIZE), dtype=np.uint64)
            outside = pages[~np.isin(pages, w.all_pages)]
            assert not rows[outside.astype(np.int64)].any(), f"{w.name}: data outside its pages"


def write_link(out: Path, parent: Path | None, res: TrackedResult, gen: int, member: str) -> None:
    """Write one capture of the chain (full when there is no parent)."""
    cap = res.capture
    w = ImageWriter(
        out,
        generation=gen,
        parent=parent_link(out, parent) if parent is not None else None,
        tracker=res.tracker if parent is not None else None,
    )
    w.add_member(member, cap.ident.pid, cap.ident.start_time)
    for r in cap.regions:
        w.add_region(
            member,
            cap.ident.pid,
            cap.ident.start_time,
            r.name,
            r.start,
            r.end,
            r.pages,
            r.data,
            r.zero,
            all_pages=r.all_pages if parent is not None else None,
        )
    w.commit()


def failing_readv(pid: int, local: int, nlocal: int, remote: int, nremote: int) -> int:
    """A copy that fails after the tracker has re-armed (an abort by error)."""
    ctypes.set_errno(errno.EIO)
    raise ReadFailed(pid, "test", "injected failure after collect")


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """Images go to tmpfs where there is one (fsync is free there)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="cpt-chain-", dir=base) as d:
        yield Path(d)


def run_chain(
    backend: str, data: st.DataObject, rounds: int = 4, tmpdir: Path | None = None
) -> None:
    """The property, for one tracker backend (see the module docstring)."""
    member = "m0"
    with (
        scratch_dir() as d,
        Target(maps=START_MAPS, writers=[f"{WRITERS}:3"], tmpdir=tmpdir or d) as t,
    ):
        model = Model()
        for spec in START_MAPS:
            name, pages, *kind = spec.split(":")
            model.maps[name] = Mapped.new(kind[0] if kind else "anon", int(pages))
        ident = ProcessIdentity.of(t.pid)
        tc = TrackedCapture(ident, None, backend)
        chain: list[Path] = []
        history: list[str] = []
        for rnd in range(rounds):
            if rnd:
                history += apply_random_ops(t, model, data)
            fate = data.draw(st.sampled_from(["commit", "commit", "abort", "fail"]), label="fate")
            if rnd == rounds - 1:
                fate = "commit"
            want_full = not chain or backend in ("none", "full")
            if fate == "fail":
                with frozen(ident) as fp:
                    try:
                        tc.capture(fp=fp, readv=failing_readv)
                    except ReadFailed:
                        history.append("capture failed")
                    else:  # nothing to copy, so nothing failed: drop it instead
                        tc.abort()
                        history.append("capture aborted")
                t.assert_running()
                continue
            with frozen(ident) as fp:
                res = tc.capture(fp=fp)
                ref = capture(ident, None, fp=fp)
            t.assert_running()
            what = f"{backend} round {rnd} after {history}"
            assert res.full == want_full, f"{what}: full={res.full} ({res.reason})"
            if fate == "abort":
                tc.abort()
                history.append("capture aborted")
                continue
            out = d / f"gen{len(chain) + 1}"
            write_link(out, chain[-1] if chain else None, res, len(chain) + 1, member)
            tc.commit()
            chain.append(out)
            history.append("committed")
            assert_same(list(materialize(out)), ref, what)
            if rnd == rounds - 1:
                flatten(out, d / "flat")
                assert_image_equals(d / "flat", ref, member)
        tc.forget()
        t.cmd("stop_writers")
        t.assert_running()
