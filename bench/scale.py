"""Control-plane scale: commit overhead, threads and memory of the coordinator as the
number of agents grows to thousands.

    python -m bench.scale [--agents 1,100,1000,2000] [--reps 3] [--pages 2] [--quick] [--tiny]

A real coordinator daemon (`cpcoord coordinator`, its defaults, a directory store) and,
per agent count N, one simulator process (bench/agent_sim.py) holding N real control
streams: real gRPC on loopback, one TCP connection per agent, the real protocol and
upload format, one member per agent backed by `--pages` pages of real memory. A job of N
members gets one full warm-up checkpoint, then REPS measured checkpoints, each
incremental: every member's first page changed (one new 4 KiB chunk per member).

Measured per checkpoint, client side: request to COMMITTED (the commit overhead: the
simulated agents' own work is a 2-page copy and one BLAKE3 per member, microseconds),
the core's phase marks (barrier, every member uploaded, committed), and the
coordinator's CPU seconds (utime + stime from /proc). Per N: coordinator threads and
resident memory idle with N agents connected and after the checkpoints, the simulator's
memory, the time to connect and attach N agents, and a Health.Check round trip with N
agents attached. The stored bytes of the first and last member of the last checkpoint
are read back (ReadGeneration) and checked. Writes bench/results/scale.{json,md,png}.
(bench/scale_real.py is the same question with real agent processes, up to 64.)

    python -m bench.scale --volume [--agents 1,2,4] [--size-mib 256] [--quick] [--tiny]

is the other axis, data volume: a few real agents with hundreds of MiB each, on the direct
and the coordinator data path (bench/scale_volume.py, bench/results/scale_volume.*).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.agent_sim import PAGE, page_bytes
from bench.common import Stats, load_note, publish
from bench.scale_fleet import Fleet, kill, run_extra, scale_parser, scale_plan, spawn, tail
from bench.scale_real import raw_limits, unary_rtt
from cpcoord.gen.v1 import common_pb2, coordinator_pb2, types_pb2
from cpcoord.pagedata import read_members

MODES = {"full": ("1,100,1000,2000", 3), "quick": ("1,10,100", 2), "tiny": ("1,2", 2)}
ATTACH_THREADS = 16


def proc_status(pid: int) -> dict[str, int]:
    """Threads and VmRSS (bytes) of a process."""
    out = {"threads": 0, "rss": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sim:
    """One simulator process with N agents."""

    def __init__(self, fleet: Fleet, n: int, pages: int, prefix: str) -> None:
        self.n, self.prefix = n, prefix
        ready = fleet.root / f"{prefix}.ready"
        self.log = fleet.root / f"{prefix}.log"
        argv = [sys.executable, "-m", "bench.agent_sim", "--coordinator", fleet.address]
        argv += ["--agents", str(n), "--pages", str(pages), "--prefix", prefix]
        argv += ["--ready-file", str(ready)]
        t0 = time.monotonic()
        self.proc = spawn(argv, self.log, stdin=True)
        deadline = t0 + 120 + 0.1 * n
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                kill(self.proc)
                raise RuntimeError(f"simulator did not connect {n} agents:\n{tail(self.log)}")
            time.sleep(0.05)
        self.connect_s = time.monotonic() - t0

    def node(self, i: int) -> str:
        return f"{self.prefix}-{i:05d}"

    def close(self) -> None:
        kill(self.proc, term_first=True)


def checkpoint(fleet: Fleet, job: str, full: bool = False) -> dict[str, Any]:
    marks: dict[str, float] = {}
    events = 0
    last = None
    req = coordinator_pb2.CheckpointRequest(job=job, full=full, lease_ms=60_000)
    assert fleet.coordinator is not None
    cpu0 = cpu_seconds(fleet.coordinator.pid)
    t0 = time.perf_counter()
    for ev in fleet.stub.Checkpoint(req, timeout=600):
        kind = common_pb2.ProgressKind.Name(ev.kind).removeprefix("PROGRESS_KIND_").lower()
        marks.setdefault(kind, ev.elapsed_seconds)
        events += 1
        last = ev
    dt = time.perf_counter() - t0
    cpu = cpu_seconds(fleet.coordinator.pid) - cpu0
    if last is None or last.kind != common_pb2.PROGRESS_KIND_COMMITTED:
        raise RuntimeError(f"checkpoint of {job} did not commit: {last}")
    return {"commit_s": dt, "info": last.info, "marks": marks, "events": events, "cpu_s": cpu}


def verify(fleet: Fleet, job: str, gen: int, names: list[str], pages: int) -> int:
    """The stored pages of these members are what the simulator held at the cut."""
    req = coordinator_pb2.ReadGenerationRequest(job=job, generation=gen, members=names)
    got = 0
    for mp in read_members(fleet.stub.ReadGeneration(req, timeout=300)):
        (r,) = mp.regions
        want = np.zeros(pages * PAGE, np.uint8)
        want[:PAGE] = np.frombuffer(page_bytes(mp.header.member, gen), np.uint8)
        if not np.array_equal(r.data.reshape(-1)[: want.size], want):
            raise RuntimeError(f"{job} generation {gen}: {mp.header.member} stored wrong bytes")
        got += 1
    if got != len(names):
        raise RuntimeError(f"{job} generation {gen}: read {got} of {len(names)} members")
    return got


def in_parallel(fn: Any, items: list[Any]) -> None:
    with ThreadPoolExecutor(ATTACH_THREADS) as pool:
        list(pool.map(fn, items))


def run_size(fleet: Fleet, n: int, reps: int, pages: int) -> dict[str, Any]:
    assert fleet.coordinator is not None
    pid = fleet.coordinator.pid
    before = proc_status(pid)
    sim = Sim(fleet, n, pages, f"sim{n}")
    try:
        idle = proc_status(pid)
        job = f"scale-{n}"
        t0 = time.monotonic()

        def attach(i: int) -> None:
            req = coordinator_pb2.AttachMemberRequest(
                job=job,
                member=f"m{i:05d}",
                process=types_pb2.ProcessIdentity(pid=sim.proc.pid),
                node=sim.node(i),
            )
            fleet.stub.AttachMember(req, timeout=120)

        in_parallel(attach, list(range(n)))
        attach_s = time.monotonic() - t0
        warm = checkpoint(fleet, job, full=True)
        samples = []
        for _ in range(reps):
            cp = checkpoint(fleet, job)
            info, m = cp["info"], cp["marks"]
            if info.members != n or info.pages_captured != n:
                raise RuntimeError(f"{job}: {info.members} members, {info.pages_captured} pages")
            samples.append(
                {
                    "commit_s": cp["commit_s"],
                    "barrier_s": m.get("barrier", 0.0),
                    "captured_s": m.get("captured", 0.0),
                    "commit_phase_s": m["committed"] - m.get("captured", m["committed"]),
                    "before_begin_s": cp["commit_s"] - m["committed"],
                    "frozen_s": info.frozen_seconds,
                    "coordinator_cpu_s": cp["cpu_s"],
                    "events": cp["events"],
                    "bytes_new": info.bytes_new,
                    "generation": info.number,
                }
            )
        last = samples[-1]["generation"]
        names = sorted({f"m{0:05d}", f"m{n - 1:05d}"})
        checked = verify(fleet, job, last, names, pages)
        busy = proc_status(pid)
        hc = unary_rtt(fleet.address, 50, health=True)
        in_parallel(
            lambda i: fleet.stub.DetachMember(
                coordinator_pb2.DetachMemberRequest(job=job, member=f"m{i:05d}"), timeout=120
            ),
            list(range(n)),
        )
        sim_rss = proc_status(sim.proc.pid)["rss"]
    finally:
        sim.close()

    def st(k: str) -> dict[str, Any]:
        return Stats.of([s[k] for s in samples]).as_dict()

    keys = ("commit_s", "barrier_s", "captured_s", "commit_phase_s", "before_begin_s")
    return {
        "agents": n,
        **{k: st(k) for k in keys},
        "coordinator_cpu_s": st("coordinator_cpu_s"),
        "warmup_commit_s": warm["commit_s"],
        "connect_s": sim.connect_s,
        "attach_s": attach_s,
        "threads": {"before": before["threads"], "idle": idle["threads"], "busy": busy["threads"]},
        "rss": {"before": before["rss"], "idle": idle["rss"], "busy": busy["rss"], "sim": sim_rss},
        "health_rtt": hc.as_dict(),
        "verified_members": checked,
        "load_avg": os.getloadavg(),
        "samples": samples,
    }


def plot(points: list[dict[str, Any]], raw: dict[str, Any]) -> Any:
    def draw(fig: Any) -> None:
        ax, ax2 = fig.subplots(1, 2)
        xs = [p["agents"] for p in points]
        for key, style, label in (
            ("commit_s", "o-", "request to COMMITTED (commit overhead)"),
            ("captured_s", "s--", "every member uploaded"),
            ("barrier_s", "^:", "barrier (every member frozen)"),
            ("coordinator_cpu_s", "D-.", "coordinator CPU per checkpoint"),
        ):
            med = [p[key]["median"] * 1e3 for p in points]
            lo = [m - p[key]["min"] * 1e3 for m, p in zip(med, points, strict=True)]
            hi = [p[key]["max"] * 1e3 - m for m, p in zip(med, points, strict=True)]
            ax.errorbar(xs, med, yerr=[lo, hi], fmt=style, capsize=3, label=label)
        ax.axhline(1000, color="#c33", lw=1, ls="--", label="goal at 2,000 agents: 1 s")
        rtt = raw["unary_rtt"]["median"] * 1e3
        ax.axhline(rtt, color="#888", lw=1, ls="-.", label=f"raw gRPC unary RTT {rtt:.2f} ms")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("agents (simulated, one member each, one connection each)")
        ax.set_ylabel("ms (median; bars: min-max)")
        ax.set_title("Checkpoint of a job with one member per agent")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        for key, style, label in (
            ("idle", "o-", "threads, agents idle"),
            ("busy", "s--", "threads, after checkpoints"),
        ):
            ax2.plot(xs, [p["threads"][key] for p in points], style, label=label)
        ax2.set_xscale("log")
        ax2.set_xlabel("agents")
        ax2.set_ylabel("coordinator threads")
        r = ax2.twinx()
        r.plot(xs, [p["rss"]["busy"] / 2**20 for p in points], "D:", color="#b55", label="RSS")
        r.set_ylabel("coordinator resident MiB", color="#b55")
        ax2.set_title("Coordinator threads and memory")
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=7, loc="upper left")
        fig.set_size_inches(13, 5)

    return draw


def main(argv: list[str] | None = None) -> int:
    ap = scale_parser(__doc__, "scale", MODES, "1,100,1000,2000")
    ap.add_argument("--pages", type=int, default=2, help="pages per member (default 2)")
    ap.add_argument(
        "--volume",
        action="store_true",
        help="the data-volume axis instead (bench/scale_volume.py): 1, 2, 4 real agents x "
        "--size-mib of random bytes, direct and coordinator data paths (with --quick: "
        "1, 2 x 64 MiB; --tiny: 1, 2 x 8 MiB)",
    )
    ap.add_argument(
        "--size-mib", type=float, default=None, help="--volume: MiB per member (default 256)"
    )
    a = ap.parse_args(argv)
    if a.volume:
        from bench import scale_volume

        return scale_volume.main(a)
    mode, counts, reps = scale_plan(a, MODES)
    if not counts or counts[0] < 1 or reps < 1 or a.pages < 1:
        raise SystemExit("--agents must be >= 1, --reps >= 1, --pages >= 1")
    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="cpcoord-scale-", dir=a.store_dir))
    # Heartbeats cost two messages per agent per interval: at thousands of agents an
    # interval of seconds (docs/operations.md, "Sizing") keeps them a small share.
    fleet = Fleet(tmp, heartbeat_ms=5000)
    points: list[dict[str, Any]] = []
    try:
        raw = raw_limits(PAGE, 3, tmp)
        fleet.start_coordinator()  # its defaults: what a user runs
        for n in counts:
            p = run_size(fleet, n, reps, a.pages)
            points.append(p)
            print(
                f"{n:5d} agents: commit {p['commit_s']['median'] * 1e3:.0f} ms, coordinator "
                f"{p['threads']['busy']} threads {p['rss']['busy'] / 2**20:.0f} MiB, "
                f"load {p['load_avg'][0]:.2f}",
                flush=True,
            )
    finally:
        fleet.close()
        shutil.rmtree(tmp, ignore_errors=True)
    rtt = raw["unary_rtt"]["median"]
    rows = [
        {
            "agents": p["agents"],
            "commit ms": p["commit_s"]["median"] * 1e3,
            "min": p["commit_s"]["min"] * 1e3,
            "max": p["commit_s"]["max"] * 1e3,
            "barrier ms": p["barrier_s"]["median"] * 1e3,
            "uploaded ms": p["captured_s"]["median"] * 1e3,
            "manifest+catalog ms": p["commit_phase_s"]["median"] * 1e3,
            "coordinator CPU ms": p["coordinator_cpu_s"]["median"] * 1e3,
            "threads idle": p["threads"]["idle"],
            "threads busy": p["threads"]["busy"],
            "RSS MiB": p["rss"]["busy"] / 2**20,
            "sim RSS MiB": p["rss"]["sim"] / 2**20,
            "connect s": p["connect_s"],
            "attach s": p["attach_s"],
            "health RTT ms": p["health_rtt"]["median"] * 1e3,
            "load 1m": p["load_avg"][0],
        }
        for p in points
    ]
    top = points[-1]
    notes = [
        f"One simulator process (bench/agent_sim.py) per count holds that many agents, each "
        f"with its own connection and Attach stream and one member of {a.pages} pages of real "
        f"memory. {reps} measured checkpoints per count after a full warm-up; each changes "
        "one page per member (incremental: one new 4 KiB chunk per member); median, min, max.",
        "commit = the Checkpoint call to its COMMITTED event: Freeze to every agent, the "
        "barrier, Capture, every member's MissingChunks + UploadPages + Uploaded, the "
        "manifest and the catalog flip, Committed; the simulated agents' own work is "
        "microseconds, so this is the control plane's cost (plus the simulator's share of "
        "the CPUs).",
        "Checked: every checkpoint committed with every member; the stored bytes of the first "
        "and last member of the last checkpoint at each count were read back and equal what "
        "the simulator held.",
        f"Coordinator threads before the first simulator: {points[0]['threads']['before']}; "
        f"with {top['agents']} agents connected: {top['threads']['idle']} idle, "
        f"{top['threads']['busy']} after checkpoints (the thread-pool threads of uploads and "
        "attaches start on demand, up to --rpc-threads; control streams hold none).",
        f"Raw gRPC unary round trip on loopback, same run: {rtt * 1e3:.3f} ms (median of 200).",
        load_note(load_start, "the coordinator, the simulator and this client"),
    ]
    extra = {
        "pages": a.pages,
        **run_extra(reps, mode, raw, points, load_start),
        "median_commit_s": {str(p["agents"]): statistics.median(
            s["commit_s"] for s in p["samples"]) for p in points},
    }  # fmt: skip
    return publish(
        a.name,
        "Control plane: commit overhead, threads and memory vs agents",
        rows,
        notes=notes,
        extra=extra,
        plot=plot(points, raw),
    )


if __name__ == "__main__":
    sys.exit(main())
