"""Rollback in place through the cluster: a real coordinator and agent (testbed), one
member of SIZE MiB, default options.

    python -m bench.restore_cluster [--size-mib 1024] [--dirty 0.01] [--reps 3] [--chain 20]

Generation N is taken once (full). Then, each measured with the member's own report
(Restored: frozen_seconds, pages_written, bytes_prefetched) and the call's wall time
(Restore RPC sent -> COMMITTED event, on this side):

- after DIRTY of the pages written since N: rollback to N (goal: frozen <= 30 ms, call
  -> restored <= 0.5 s);
- after every page rewritten: rollback to N (goal: frozen <= 1.3 x raw
  process_vm_writev of the SIZE, best of REPS, measured in the same run);
- CHAIN rollbacks in a row, every page rewritten before each (goal: none aborts).

Writes bench/results/restore_cluster.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import raw_writev, write_results
from bench.end_to_end import checkpoint, dirty
from cpcoord.gen.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from cpcoord.grpcopts import channel_options
from nodeagent.proc.staging import Staging
from testbed.cluster import Cluster, attach_args
from testbed.driver import Target

GOAL_FROZEN_SMALL_S = 0.030
GOAL_CALL_SMALL_S = 0.5
GOAL_RATIO_FULL = 1.3


def rollback(address: str, job: str, gen: int) -> dict[str, Any]:
    """One restore through the API: the outcome, the member's numbers, the wall time."""
    with grpc.insecure_channel(address, options=channel_options()) as ch:
        stub = coordinator_pb2_grpc.CoordinatorStub(ch)
        t0 = time.perf_counter()
        last, member = None, None
        req = coordinator_pb2.RestoreRequest(job=job, generation=gen)
        for ev in stub.Restore(req, timeout=900):
            if ev.kind == common_pb2.PROGRESS_KIND_MEMBER_RESTORED:
                member = ev.stats
            last = ev
        dt = time.perf_counter() - t0
    assert last is not None
    ok = last.kind == common_pb2.PROGRESS_KIND_COMMITTED
    out: dict[str, Any] = {"ok": ok, "call_s": dt, "reason": "" if ok else last.detail}
    if member is not None:
        out.update(
            frozen_s=member.frozen_seconds,
            pages_written=member.pages_written,
            bytes_prefetched=member.bytes_prefetched,
        )
    return out


def _first_checkpoint(address: str) -> int:
    """Generation N. The agent prefaults the member's staging right after the attach;
    a checkpoint that meets that still under way may time out freezing: once more."""
    for attempt in range(3):
        try:
            return int(checkpoint(address, "bench")["generation"])
        except AssertionError:
            if attempt == 2:
                raise
            time.sleep(5)
    raise AssertionError("unreachable")


def _row(what: str, got: list[dict[str, Any]], goal: str, met: bool) -> dict[str, Any]:
    frozen = [g["frozen_s"] for g in got if "frozen_s" in g]
    return {
        "what": what,
        "runs": len(got),
        "aborted": sum(not g["ok"] for g in got),
        "frozen ms (median)": 1e3 * float(np.median(frozen)) if frozen else None,
        "frozen ms (max)": 1e3 * max(frozen) if frozen else None,
        "call s (median)": float(np.median([g["call_s"] for g in got])),
        "pages written": int(np.median([g.get("pages_written", 0) for g in got])),
        "MiB prefetched": float(np.median([g.get("bytes_prefetched", 0) for g in got])) / 2**20,
        "goal": goal,
        "met": "yes" if met else "NO",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dirty", type=float, default=0.01)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chain", type=int, default=20)
    args = ap.parse_args(argv)
    size = args.size_mib << 20
    pages = size // 4096
    tmp = Path(tempfile.mkdtemp(prefix=f"cpcoord-restore-{os.getpid()}-"))
    t = Target(maps=[f"data:{pages}:anon:random:11"], tmpdir=tmp, timeout=600)
    cluster = Cluster(tmp / "cluster", nodes=("node-a",), heartbeat_ms=1000)
    src = Staging(size)
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"size_bytes": size, "dirty_fraction": args.dirty}
    try:
        m = t.mapping("data")
        runs = np.array([[m.addr, size]], dtype=np.uint64)
        (tmp / "cluster").mkdir()
        cluster.start()
        cluster.cli(*attach_args("bench", "m", t.pid, "node-a", [(m.addr, m.end)]))
        gen = _first_checkpoint(cluster.address)
        small = []
        for _ in range(args.reps):
            dirty(t, pages, args.dirty)
            small.append(rollback(cluster.address, "bench", gen))
        full, raw = [], []
        for k in range(args.reps):
            t.cmd("write", name="data", page=0, count=pages, counter=100 + k)
            full.append(rollback(cluster.address, "bench", gen))
            raw.append(raw_writev(t.pid, runs, src, 1).min)  # the same load, right after
        best_raw = min(raw)
        chain = []
        for k in range(args.chain):
            t.cmd("write", name="data", page=0, count=pages, counter=200 + k)
            chain.append(rollback(cluster.address, "bench", gen))
        fs = [g["frozen_s"] for g in small if "frozen_s" in g]
        met_small = (
            bool(fs)
            and max(fs) <= GOAL_FROZEN_SMALL_S
            and max(g["call_s"] for g in small) <= GOAL_CALL_SMALL_S
        )
        ff = [g["frozen_s"] for g in full if "frozen_s" in g]
        met_full = bool(ff) and min(ff) <= GOAL_RATIO_FULL * best_raw
        rows.append(
            _row(
                f"{args.dirty:.0%} written since N",
                small,
                f"frozen <= {GOAL_FROZEN_SMALL_S * 1e3:.0f} ms, call <= {GOAL_CALL_SMALL_S} s",
                met_small,
            )
        )
        rows.append(
            _row(
                "every page rewritten",
                full,
                f"frozen <= {GOAL_RATIO_FULL} x raw writev ({best_raw * 1e3:.0f} ms)",
                met_full,
            )
        )
        aborted = sum(not g["ok"] for g in chain)
        what = f"{args.chain} in a row, all rewritten"
        rows.append(_row(what, chain, "none aborts", not aborted))
        extra.update(
            raw_writev_best_s=best_raw,
            raw_writev_s=raw,
            small=small,
            full=full,
            chain=chain,
            load_average=os.getloadavg(),
        )
    finally:
        src.close()
        cluster.close()
        t.close()

    def plot(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        for name, got in (("1% written", small), ("all rewritten", full), ("chain", chain)):
            ax.plot([1e3 * g.get("frozen_s", 0) for g in got], "o-", label=name)
        ax.axhline(1e3 * GOAL_RATIO_FULL * best_raw, ls="--", c="gray", label="1.3 x raw writev")
        ax.axhline(1e3 * GOAL_FROZEN_SMALL_S, ls=":", c="gray", label="30 ms")
        ax.set_xlabel("rollback")
        ax.set_ylabel("frozen (ms)")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title(f"Rollback in place through the cluster, {args.size_mib} MiB")

    notes = [
        f"Raw process_vm_writev of the {args.size_mib} MiB, best of {args.reps}, each right "
        f"after a rollback: {best_raw * 1e3:.0f} ms.",
        "frozen: the member's downtime as its agent reports it (freeze, fit check, the "
        "pages written since the prefetch fetched, write, until Restored); call: Restore "
        "RPC sent until its COMMITTED event (prefetch included, thaw included).",
        f"Load average at the end: {os.getloadavg()[0]:.1f} (a shared machine).",
    ]
    cols = list(rows[0])
    for p in write_results(
        "restore_cluster",
        "Rollback in place through the cluster",
        cols,
        rows,
        notes=notes,
        extra=extra,
        plot=plot,
    ):
        print(p)
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
