"""The benchmark suite keeps running: `python -m bench --quick
--tiny` runs every landed benchmark module on tiny sizes into a temporary results
directory, exits 0, writes each module's JSON and the plots, with numbers that make sense
(limits measured, ratios in range, the workloads' zero/dedup/compression where their
memory puts them), and leaves the committed bench/results untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.common import RESULTS, RESULTS_ENV
from bench.run_all import PLANS, entries, landed

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600  # ~1-2 min on tiny sizes when idle, 4+ under load; hard cap
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in d.glob("*") if p.is_file()}


def _png(path: Path) -> None:
    assert path.exists(), f"{path.name} not written"
    head = path.read_bytes()[:8]
    assert head == PNG_MAGIC and path.stat().st_size > 10_000, f"{path.name} is not a plot"


def test_quick_tiny_suite(tmp_path: Path) -> None:
    out = tmp_path / "results"
    before = _snapshot(RESULTS)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop(RESULTS_ENV, None)  # the flag alone must redirect every module
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--tiny", "--results-dir", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    took = time.monotonic() - t0
    assert res.returncode == 0, f"suite failed:\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
    assert took < TIMEOUT_S

    # Every landed module ran and wrote its results; the others are reported as skipped.
    summary = json.loads((out / "summary.json").read_text())
    status = {o["name"]: o["status"] for o in summary["extra"]["outcomes"]}
    for e in entries(PLANS["tiny"], out):
        if landed(e.module):
            assert status[e.name] == "ok", (e.name, status)
            for name in e.expected():
                assert (out / name).exists(), f"{e.name} did not write {name}"
        else:
            assert status[e.name] == "skipped", (e.name, status)
    assert summary["rows"], "no headline read back from the modules' results"

    for name in ("limits", "capture", "restore", "workloads", "downtime", "throughput"):
        _png(out / f"{name}.png")

    # The limits were measured, in the same run, at plausible rates.
    limits = {r["limit"]: r for r in json.loads((out / "limits.json").read_text())["rows"]}
    assert set(limits) == {"readv", "writev", "memcpy", "grpc-1MiB", "grpc-4MiB"}
    for r in limits.values():
        assert 0.01 < r["GB/s"] < 200, r
        assert r["min s"] <= r["median s"] <= r["max s"], r

    # Workloads: each kind of memory lands where it should.
    rows = {r["workload"]: r for r in json.loads((out / "workloads.json").read_text())["rows"]}
    assert set(rows) == {"stencil", "dict-heap", "sparse", "ranks"}
    assert rows["sparse"]["zero %"] > 85  # 15/16 of its pages are zero
    assert rows["sparse"]["reduction"] > 10
    assert 1.6 < rows["ranks"]["dedup"] < 2.0  # 90% of two members is one copy
    assert rows["ranks"]["members"] == 2
    assert rows["dict-heap"]["compression"] > 2  # pointers, refcounts, small ints
    assert rows["stencil"]["compression"] < 1.3  # float64 state barely compresses
    assert rows["stencil"]["gen2 new %"] > 80  # a stencil step rewrites every page
    assert rows["sparse"]["gen2 new %"] < 5  # fill-in of 1/256 of the pages
    for r in rows.values():
        assert 0 < r["% of raw"] < 200, r
        assert r["stored MiB"] <= r["logical MiB"] * 1.01, r

    # The control plane vs agents (bench/scale.py, simulated agents): counts 1 and 2, each
    # measured from real checkpoints that committed, threads and memory beside them.
    if landed("scale"):
        _png(out / "scale.png")
        sc = json.loads((out / "scale.json").read_text())["extra"]
        assert [pt["agents"] for pt in sc["points"]] == [1, 2]
        rtt = sc["raw"]["unary_rtt"]["median"]
        assert 0 < rtt < 1.0, sc["raw"]
        assert len(sc["load_avg_start"]) == 3 and len(sc["load_avg_end"]) == 3
        for pt in sc["points"]:
            assert len(pt["samples"]) == 2, pt  # --reps 2, each a committed checkpoint
            for smp in pt["samples"]:
                # Every member uploaded its changed page (one new 4 KiB chunk each).
                assert smp["bytes_new"] >= pt["agents"] * 4096 * 0.5, smp
                assert 0 < smp["barrier_s"] <= smp["captured_s"] <= smp["commit_s"] < 120, smp
                assert 0 < smp["frozen_s"] < smp["commit_s"], smp
                assert smp["coordinator_cpu_s"] >= 0, smp
            for k in ("commit_s", "barrier_s", "captured_s"):
                assert pt[k]["min"] <= pt[k]["median"] <= pt[k]["max"], (k, pt[k])
            assert pt["threads"]["busy"] > 0 and pt["rss"]["busy"] > 0 and pt["rss"]["sim"] > 0
            assert pt["health_rtt"]["median"] > 0
            # The stored bytes of the first and last member were read back and compared.
            assert pt["verified_members"] == len({0, pt["agents"] - 1}), pt
        assert any(r["benchmark"] == "scale" for r in summary["rows"]), summary["rows"]

    # The data-volume axis (bench/scale.py --volume): 1 and 2 real agents x 8 MiB, each
    # count on both data paths, every checkpoint committed with all its bytes new, every
    # member read back exact, the raw durable write of the same bytes beside it.
    if landed("scale"):
        _png(out / "scale_volume.png")
        vol = json.loads((out / "scale_volume.json").read_text())
        pts = vol["extra"]["points"]
        assert [(pt["agents"], pt["path"]) for pt in pts] == [
            (n, path) for n in (1, 2) for path in ("direct", "coordinator")
        ]
        size = vol["extra"]["size_bytes"]
        for pt in pts:
            assert pt["verified_members"] == pt["agents"], pt
            assert pt["bytes_committed"] >= 0.95 * pt["agents"] * size, pt
            assert 0 < pt["raw_write"]["min"] <= pt["raw_write"]["max"], pt
            for smp in pt["samples"]:
                assert 0 < smp["frozen_s"] < smp["commit_s"] < 120, smp
                assert smp["coordinator_cpu_s"] >= 0 and smp["agents_cpu_s"] > 0, smp
        assert all(r["exact"] for r in vol["rows"]), vol["rows"]
        assert any(r["benchmark"] == "scale_volume" for r in summary["rows"]), summary["rows"]

    # A redirected run never overwrites the committed results (the files it wrote).
    after = _snapshot(RESULTS)
    written = {p.name for p in out.glob("*")}
    assert {n: after.get(n) for n in written} == {n: before.get(n) for n in written}
