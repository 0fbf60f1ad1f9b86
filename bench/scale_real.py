"""Coordinator overhead with real agent processes .

    python -m bench.scale_real [--agents 1,4,16,64] [--reps 3] [--size-mib 2] [--quick] [--tiny]

(bench/scale.py measures thousands of agents with the simulator, bench/agent_sim.py; this
one runs every agent as a real `cpcoord agent` process with a real member to freeze.)

A real coordinator and N real `cpcoord agent` processes on loopback (bench/scale_fleet.py),
each agent holding one member: a small target process with SIZE MiB of random bytes
(new bytes before every repetition, so each checkpoint uploads SIZE per member). For each
N, one warm-up checkpoint, then REPS full checkpoints of the job, each measured as:

- commit: the Checkpoint call to its COMMITTED event (client side);
- each member's own work: its agent's freeze (staging + seize, agent log "frozen"), its
  copy and thaw (agent log "staged", copy_ms: the barrier wait excluded) and its upload
  (hash, MissingChunks, UploadPages: the agent's cpcoord_agent_upload_seconds, scraped
  from its /metrics before and after);
- overhead = commit - the slowest member's own work: what coordination adds (fan-out of
  Freeze and Capture, the barrier, progress, the commit of manifest and catalog, and
  whatever the members' work loses to sharing the machine with N agents);
- frozen: the generation's longest member downtime (freeze + barrier + own copy).

In the same run: the raw gRPC limits on loopback (a generic-handler server in its own
process, bench/end_to_end.py): a trivial unary round trip and a stream of SIZE MiB; and the
coordinator's own health-check round trip with N agents attached. The load average is
recorded at the start, per N and at the end (the machine may be shared).
Writes bench/results/scale_real.{json,md,png}.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import Stats, load_note, publish, repeat
from bench.end_to_end import RAW_METHOD, raw_grpc
from bench.scale_fleet import (
    REPO,
    Fleet,
    log_fields,
    run_extra,
    scale_parser,
    scale_plan,
    scrape,
    seeded_bytes,
)
from cpcoord.gen.v1 import common_pb2, coordinator_pb2
from cpcoord.grpcopts import channel_options
from cpcoord.pagedata import read_members

MIB = 1 << 20
MODES = {"full": ("1,4,16,64", 3), "quick": ("1,4,16", 2), "tiny": ("1,2", 2)}
UPLOAD_SUM = "cpcoord_agent_upload_seconds_sum"
UPLOAD_COUNT = "cpcoord_agent_upload_seconds_count"


def unary_rtt(address: str, reps: int, health: bool = False) -> Stats:
    """A trivial unary round trip: the raw sink with one 8-byte message, or Health.Check."""
    with grpc.insecure_channel(address, options=channel_options()) as ch:
        check = health_pb2_grpc.HealthStub(ch).Check
        sink = ch.stream_unary(RAW_METHOD, None, None)

        def once() -> None:
            if health:
                check(health_pb2.HealthCheckRequest(), timeout=30)
            else:
                sink(iter([b"12345678"]), timeout=30)

        return repeat(once, reps, 5)


def raw_limits(size: int, reps: int, tmp: Path) -> dict[str, Any]:
    port_file = tmp / "raw.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.end_to_end", "--raw-server", str(port_file)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("raw gRPC server did not start")
            time.sleep(0.05)
        rtt = unary_rtt(f"127.0.0.1:{port_file.read_text().strip()}", 200)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stream = raw_grpc(size, min(size, MIB), reps, tmp)
    trimmed = {k: v for k, v in rtt.as_dict().items() if k != "samples"}  # 200 of them
    return {"unary_rtt": trimmed, "stream": stream.as_dict(), "stream_bytes": size}


def checkpoint(fleet: Fleet, job: str) -> dict[str, Any]:
    marks: dict[str, float] = {}
    t0 = time.perf_counter()
    last = None
    req = coordinator_pb2.CheckpointRequest(job=job, full=True, lease_ms=60_000)
    for ev in fleet.stub.Checkpoint(req, timeout=600):
        kind = common_pb2.ProgressKind.Name(ev.kind).removeprefix("PROGRESS_KIND_").lower()
        marks.setdefault(kind, ev.elapsed_seconds)
        last = ev
    dt = time.perf_counter() - t0
    if last is None or last.kind != common_pb2.PROGRESS_KIND_COMMITTED:
        raise RuntimeError(f"checkpoint of {job} did not commit: {last}")
    return {"commit_s": dt, "info": last.info, "marks": marks}


def member_work(
    fleet: Fleet, job: str, n: int, generation: int, before: list[dict[str, float]]
) -> list[float]:
    """Each member's own seconds in `generation`: freeze + copy + upload."""
    with ThreadPoolExecutor(8) as pool:
        after = list(pool.map(lambda a: scrape(a[2]), fleet.agents[:n]))
    out = []
    for (node, _, _), b, a in zip(fleet.agents[:n], before, after, strict=True):
        log = fleet.agent_log(node)
        g = str(generation)
        frozen = [
            f for f in log_fields(log, "frozen") if (f.get("job"), f.get("generation")) == (job, g)
        ]
        staged = [
            f for f in log_fields(log, "staged") if (f.get("job"), f.get("generation")) == (job, g)
        ]
        if len(frozen) != 1 or len(staged) != 1 or "copy_ms" not in staged[0]:
            raise RuntimeError(f"{node}: no frozen/staged (copy_ms) log of {job} generation {g}")
        if a[UPLOAD_COUNT] - b[UPLOAD_COUNT] != 1:
            raise RuntimeError(f"{node}: {a[UPLOAD_COUNT] - b[UPLOAD_COUNT]} uploads counted")
        up = a[UPLOAD_SUM] - b[UPLOAD_SUM]
        out.append(float(frozen[0]["ms"]) / 1e3 + float(staged[0]["copy_ms"]) / 1e3 + up)
    return out


def seed(n: int, rep: int, i: int) -> int:
    """Member i's bytes in repetition rep (0 = warm-up) of the n-agent step."""
    return 1_000_000 * n + 1000 * (rep + 1) + i


def verify(fleet: Fleet, job: str, gen: int, size: int, seeds: dict[int, int]) -> int:
    """The stored pages of these members are the bytes they held (ReadGeneration, every
    chunk re-hashed on arrival). Returns how many members were compared."""
    names = {f"m{i:03d}": s for i, s in seeds.items()}
    req = coordinator_pb2.ReadGenerationRequest(job=job, generation=gen, members=sorted(names))
    got = 0
    for mp in read_members(fleet.stub.ReadGeneration(req, timeout=300)):
        (r,) = mp.regions
        want = np.frombuffer(seeded_bytes(names[mp.header.member], size), np.uint8)
        if len(r.pages) != size // 4096 or not np.array_equal(r.data.reshape(-1), want):
            raise RuntimeError(f"{job} generation {gen}: {mp.header.member} stored wrong bytes")
        got += 1
    if got != len(names):
        raise RuntimeError(f"{job} generation {gen}: read {got} of {len(names)} members")
    return got


def run_size(fleet: Fleet, n: int, size: int, reps: int) -> dict[str, Any]:
    """Attach n fresh members (one per agent), one warm-up, then reps measured checkpoints."""
    job = f"scale-{n}"
    fleet.drop_targets()
    for i in range(n):
        t = fleet.add_target(size, seed=1_000_000 * n + i)
        fleet.attach(job, f"m{i:03d}", fleet.agents[i][0], t)
    samples: list[dict[str, Any]] = []
    for rep in range(reps + 1):
        for i, t in enumerate(fleet.targets):
            t.refill(seed(n, rep, i))
        with ThreadPoolExecutor(8) as pool:
            snaps = list(pool.map(lambda a: scrape(a[2]), fleet.agents[:n]))
        cp = checkpoint(fleet, job)
        info = cp["info"]
        if info.members != n or info.pages_captured != n * (size // 4096):
            raise RuntimeError(f"{job}: {info.members} members, {info.pages_captured} pages")
        own = member_work(fleet, job, n, info.number, snaps)
        m = cp["marks"]
        if rep == 0:
            continue  # warm-up: the first generation of the job
        samples.append(
            {
                "commit_s": cp["commit_s"],
                "slowest_own_s": max(own),
                "median_own_s": statistics.median(own),
                "overhead_s": cp["commit_s"] - max(own),
                "frozen_s": info.frozen_seconds,
                # Since Begin: every member frozen; every member uploaded; then the
                # manifest and catalog; and what came before Begin (call, job checks).
                "barrier_s": m.get("barrier", 0.0),
                "captured_s": m.get("captured", 0.0),
                "commit_phase_s": m["committed"] - m.get("captured", m["committed"]),
                "before_begin_s": cp["commit_s"] - m["committed"],
                "bytes_new": info.bytes_new,
            }
        )
    checked = verify(fleet, job, info.number, size, {i: seed(n, reps, i) for i in {0, n - 1}})
    for i in range(n):
        fleet.detach(job, f"m{i:03d}")
    hc = unary_rtt(fleet.address, 50, health=True)

    def st(k: str) -> dict[str, Any]:
        return Stats.of([s[k] for s in samples]).as_dict()

    keys = (
        "overhead_s",
        "commit_s",
        "slowest_own_s",
        "median_own_s",
        "frozen_s",
        "barrier_s",
        "captured_s",
        "commit_phase_s",
        "before_begin_s",
    )
    return {
        "agents": n,
        **{k: st(k) for k in keys},
        "health_rtt": hc.as_dict(),
        "verified_members": checked,
        "load_avg": os.getloadavg(),
        "rss": fleet.rss(),
        "samples": samples,
    }


def plot(points: list[dict[str, Any]], raw: dict[str, Any]) -> Any:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        xs = [p["agents"] for p in points]
        series = (
            ("overhead_s", "o-", "coordinator overhead (commit - slowest member's own work)"),
            ("commit_s", "s--", "request to COMMITTED"),
            ("slowest_own_s", "^:", "slowest member's own freeze + copy + upload"),
            ("frozen_s", "D:", "frozen (longest member downtime)"),
        )
        for key, style, label in series:
            med = [p[key]["median"] * 1e3 for p in points]
            lo = [m - p[key]["min"] * 1e3 for m, p in zip(med, points, strict=True)]
            hi = [p[key]["max"] * 1e3 - m for m, p in zip(med, points, strict=True)]
            ax.errorbar(xs, med, yerr=[lo, hi], fmt=style, capsize=3, label=label)
        rtt = raw["unary_rtt"]["median"] * 1e3
        ax.axhline(
            rtt, color="#888", lw=1, ls="-.", label=f"raw gRPC unary round trip {rtt:.2f} ms"
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("agents (one member each, separate processes, loopback)")
        ax.set_ylabel("ms (median of repetitions; bars: min-max)")
        ax.set_title("Coordinator overhead vs agents")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)

    return draw


def main(argv: list[str] | None = None) -> int:
    ap = scale_parser(__doc__, "scale_real", MODES, "1,4,16,64")
    ap.add_argument("--size-mib", type=float, default=2.0, help="memory per member")
    a = ap.parse_args(argv)
    mode, counts, reps = scale_plan(a, MODES)
    size = int(a.size_mib * MIB) // 4096 * 4096
    if not counts or counts[0] < 1 or reps < 1 or size < 4096:
        raise SystemExit("--agents must be >= 1, --reps >= 1, --size-mib >= 1 page")
    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="cpcoord-scale-", dir=a.store_dir))
    fleet = Fleet(tmp)
    points: list[dict[str, Any]] = []
    try:
        raw = raw_limits(size, 3, tmp)
        fleet.start_coordinator()  # its defaults: what a user runs
        for n in counts:
            t0 = time.monotonic()
            fleet.grow(n)
            start_s = time.monotonic() - t0
            p = run_size(fleet, n, size, reps)
            p["agents_started_s"] = start_s
            points.append(p)
            print(
                f"{n:3d} agents: overhead {p['overhead_s']['median'] * 1e3:.0f} ms, commit "
                f"{p['commit_s']['median'] * 1e3:.0f} ms, load {p['load_avg'][0]:.2f}",
                flush=True,
            )
    finally:
        fleet.close()
        shutil.rmtree(tmp, ignore_errors=True)
    rtt = raw["unary_rtt"]["median"]
    rows = [
        {
            "agents": p["agents"],
            "overhead ms": p["overhead_s"]["median"] * 1e3,
            "min": p["overhead_s"]["min"] * 1e3,
            "max": p["overhead_s"]["max"] * 1e3,
            "overhead / unary RTT": p["overhead_s"]["median"] / rtt,
            "commit ms": p["commit_s"]["median"] * 1e3,
            "slowest own ms": p["slowest_own_s"]["median"] * 1e3,
            "frozen ms": p["frozen_s"]["median"] * 1e3,
            "barrier ms": p["barrier_s"]["median"] * 1e3,
            "manifest+catalog ms": p["commit_phase_s"]["median"] * 1e3,
            "health RTT ms": p["health_rtt"]["median"] * 1e3,
            "load 1m": p["load_avg"][0],
        }
        for p in points
    ]
    last = points[-1]
    mib = size / MIB
    notes = [
        f"Each agent holds one member of {mib:g} MiB of random bytes, refilled before every "
        f"checkpoint (full, so every member uploads {mib:g} MiB); {reps} measured "
        "checkpoints per count after one warm-up; median, min, max.",
        "Checked: every checkpoint committed with every member's pages; the stored bytes "
        "of the first and last member of the last checkpoint at each count were read back "
        "(ReadGeneration) and equal what they held.",
        "overhead = request to COMMITTED minus the slowest member's own work (its agent's "
        "freeze, copy and thaw, and upload: hash, MissingChunks, UploadPages).",
        f"Raw gRPC on loopback, same run: unary round trip {rtt * 1e3:.3f} ms (median of "
        f"200), a {mib:g} MiB stream {raw['stream']['median'] * 1e3:.1f} ms.",
        load_note(load_start, "the coordinator, every agent and every target"),
        f"Resident memory at {last['agents']} agents: agents "
        f"{last['rss']['agents'] / MIB:.0f} MiB in all, coordinator "
        f"{last['rss']['coordinator'] / MIB:.0f} MiB.",
    ]
    extra = {
        "size_bytes": size,
        **run_extra(reps, mode, raw, points, load_start),
    }
    return publish(
        a.name,
        "Coordinator overhead vs real agent processes",
        rows,
        notes=notes,
        extra=extra,
        plot=plot(points, raw),
    )


if __name__ == "__main__":
    sys.exit(main())
