"""Data volume: the coordinator's CPU as the bytes of a full checkpoint grow.

    python -m bench.scale --volume [--agents 1,2,4] [--size-mib 256] [--reps 2] [--quick] [--tiny]

(bench/scale.py's other axis is the number of agents with nearly no bytes; this one holds
the agents few and makes the bytes large.) Two fleets side by side (bench/scale_fleet.py),
each a real coordinator (its defaults, a directory store) and real `cpcoord agent`
processes on loopback: in one the agents put their own packs into the store
(`--data-path direct`, which refuses rather than falls back), in the other every page goes
through the coordinator (`--data-path coordinator`), for contrast. Every agent gets one
tiny warm-up checkpoint first (its first store open, its first stream).

Per agent count N, each agent holds one member of SIZE MiB of random (incompressible)
bytes, refilled from a new seed before every checkpoint, so each full checkpoint stores
N x SIZE new bytes; both fleets hold the same bytes. REPS full checkpoints per path, the
paths interleaved, each measured as: call -> COMMITTED (client side); the CPU seconds of
the coordinator process (utime + stime from /proc, before and after) and of the N agents
together; the bytes the generation committed (its new stored bytes) and the coordinator's
CPU per GiB of them. Each checkpoint's answer must name the fleet's data path for every
member. Per N, in the same run: the machine's limit, the raw durable write of the same
bytes (one file of N x SIZE written and fsynced, bench/end_to_end_direct.raw_dir) into
the direct fleet's store directory, best of 3. Exactness: every member of each row's last
checkpoint is read back (ReadGeneration, every chunk re-hashed) and equals what it held.
Writes bench/results/scale_volume.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import Stats, gbps, load_note, publish
from bench.end_to_end import cpu_seconds
from bench.end_to_end_direct import raw_dir
from bench.scale_fleet import Fleet, Modes, scale_plan, seeded_bytes
from bench.scale_real import checkpoint, verify

GIB = 1 << 30
MODES: Modes = {"full": ("1,2,4", 2), "quick": ("1,2", 1), "tiny": ("1,2", 1)}
SIZE_MIB = {"full": 256, "quick": 64, "tiny": 8}
PATHS = ("direct", "coordinator")
RAW_REPS = 3
WARM_PAGES = 16


def seed(n: int, rep: int, i: int) -> int:
    """Member i's bytes in repetition rep of the n-agent row (the same in both fleets)."""
    return 50_000_000 + 100_000 * n + 1000 * rep + i


def start(root: Path, path: str, agents: int) -> Fleet:
    """A coordinator and `agents` agents on `path`, each through one tiny checkpoint."""
    root.mkdir()
    fleet = Fleet(root, agent_args=("--data-path", path))
    try:
        fleet.start_coordinator()  # its defaults: what a user runs
        fleet.grow(agents)
        for i, (node, _, _) in enumerate(fleet.agents):
            fleet.attach("warm", f"w{i:03d}", node, fleet.add_target(WARM_PAGES * 4096, i))
        checkpoint(fleet, "warm")
        for i in range(agents):
            fleet.detach("warm", f"w{i:03d}")
        fleet.drop_targets()
    except BaseException:
        fleet.close()
        raise
    return fleet


def attach_row(fleet: Fleet, n: int, size: int) -> str:
    job = f"volume-{n}"
    fleet.drop_targets()
    for i in range(n):
        fleet.attach(job, f"m{i:03d}", fleet.agents[i][0], fleet.add_target(size, seed(n, 0, i)))
    return job


def measure(fleet: Fleet, path: str, job: str, n: int, size: int) -> dict[str, Any]:
    """One full checkpoint of the row's job: time, CPU, bytes, data paths."""
    assert fleet.coordinator is not None
    coord, agents = fleet.coordinator.pid, [p.pid for _, p, _ in fleet.agents[:n]]
    c0, a0 = cpu_seconds(coord), sum(cpu_seconds(p) for p in agents)
    try:
        cp = checkpoint(fleet, job)
    except RuntimeError as e:  # which fleet's: the message names only the job
        raise RuntimeError(f"{path} data path: {e}") from e
    cpu = cpu_seconds(coord) - c0
    agents_cpu = sum(cpu_seconds(p) for p in agents) - a0
    info = cp["info"]
    if info.members != n or info.pages_captured != n * (size // 4096):
        raise RuntimeError(f"{path} {job}: {info.members} members, {info.pages_captured} pages")
    paths = dict(info.data_paths)
    if len(paths) != n or set(paths.values()) != {path}:
        raise RuntimeError(f"{path} {job}: members took the data paths {paths}")
    if info.bytes_new < 0.95 * n * size:  # incompressible and never seen: all of it is new
        raise RuntimeError(f"{path} {job}: {info.bytes_new} new bytes of {n * size}")
    return {
        "commit_s": cp["commit_s"],
        "coordinator_cpu_s": cpu,
        "agents_cpu_s": agents_cpu,
        "bytes_committed": info.bytes_new,
        "coordinator_cpu_s_per_gib": cpu / (info.bytes_new / GIB),
        "frozen_s": info.frozen_seconds,
        "generation": info.number,
    }


def refill(fleet: Fleet, n: int, rep: int) -> None:
    with ThreadPoolExecutor(n) as pool:  # each target fills itself: in parallel
        list(pool.map(lambda i: fleet.targets[i].refill(seed(n, rep, i)), range(n)))


def run_count(fleets: dict[str, Fleet], n: int, size: int, reps: int) -> list[dict[str, Any]]:
    """Both paths at n agents, interleaved; then the raw write of the same bytes."""
    jobs = {path: attach_row(f, n, size) for path, f in fleets.items()}
    samples: dict[str, list[dict[str, Any]]] = {path: [] for path in fleets}
    for rep in range(reps):
        for path, f in fleets.items():
            if rep:
                refill(f, n, rep)
            samples[path].append(measure(f, path, jobs[path], n, size))
    out = []
    for path, f in fleets.items():
        last = samples[path][-1]["generation"]
        checked = verify(f, jobs[path], last, size, {i: seed(n, reps - 1, i) for i in range(n)})
        for i in range(n):
            f.detach(jobs[path], f"m{i:03d}")
        f.drop_targets()
        out.append({"agents": n, "path": path, "verified_members": checked})
        out[-1]["samples"] = samples[path]
    data = [seeded_bytes(seed(n, reps - 1, i), size) for i in range(n)]
    raw = raw_dir(fleets[PATHS[0]].root / "store", data, RAW_REPS)
    del data
    for p in out:
        p["raw_write"] = raw.as_dict()
        p["load_avg"] = os.getloadavg()
        for k in ("commit_s", "coordinator_cpu_s", "agents_cpu_s", "coordinator_cpu_s_per_gib"):
            p[k] = Stats.of([s[k] for s in p["samples"]]).as_dict()
        p["bytes_committed"] = p["samples"][-1]["bytes_committed"]
    return out


def row(p: dict[str, Any], size: int) -> dict[str, Any]:
    raw = p["raw_write"]["min"]
    commit = p["commit_s"]["median"]
    return {
        "agents": p["agents"],
        "path": p["path"],
        "GiB committed": p["bytes_committed"] / GIB,
        "commit s": commit,
        "commit GB/s": gbps(p["agents"] * size, commit),
        "raw durable write s (best of 3)": raw,
        "ratio": commit / raw,
        "coordinator CPU s": p["coordinator_cpu_s"]["median"],
        "coordinator CPU s/GiB": p["coordinator_cpu_s_per_gib"]["median"],
        "agents CPU s": p["agents_cpu_s"]["median"],
        "exact": p["verified_members"] == p["agents"],
        "load 1m": p["load_avg"][0],
    }


def plot(points: list[dict[str, Any]], mib: int) -> Any:
    def draw(fig: Any) -> None:
        ax, ax2 = fig.subplots(1, 2)
        for path, style in zip(PATHS, ("o-", "s--"), strict=True):
            pts = [p for p in points if p["path"] == path]
            xs = [p["bytes_committed"] / GIB for p in pts]
            for a, key in ((ax, "coordinator_cpu_s"), (ax2, "commit_s")):
                med = [p[key]["median"] for p in pts]
                lo = [m - p[key]["min"] for m, p in zip(med, pts, strict=True)]
                hi = [p[key]["max"] - m for m, p in zip(med, pts, strict=True)]
                a.errorbar(xs, med, yerr=[lo, hi], fmt=style, capsize=3, label=f"{path} path")
            for p, x in zip(pts, xs, strict=True):
                ax.annotate(f"{p['agents']} ag.", (x, p["coordinator_cpu_s"]["median"]),
                            fontsize=7, textcoords="offset points", xytext=(4, 4))  # fmt: skip
        raw = [p for p in points if p["path"] == PATHS[0]]
        ax2.plot([p["bytes_committed"] / GIB for p in raw], [p["raw_write"]["min"] for p in raw],
                 "^:", color="#888", label="raw durable write, same bytes (best of 3)")  # fmt: skip
        ax.set_title("Coordinator CPU per full checkpoint")
        ax.set_ylabel("coordinator CPU s (median; bars: min-max)")
        ax2.set_title("Checkpoint call to COMMITTED")
        ax2.set_ylabel("s (median; bars: min-max)")
        for a in (ax, ax2):
            a.set_xlabel(f"GiB committed (N agents, each one member of {mib} MiB, random)")
            a.set_ylim(bottom=0)
            a.grid(True, alpha=0.3)
            a.legend(fontsize=8)
        fig.set_size_inches(12, 5)

    return draw


def keep_logs(tmp: Path) -> None:
    """A failed run's daemon logs, kept (the store and the rest go)."""
    keep = Path(tempfile.mkdtemp(prefix="cpcoord-volume-logs-"))
    for log in tmp.glob("*/*.log"):
        shutil.copy2(log, keep / f"{log.parent.name}-{log.name}")
    print(f"logs of the failed run: {keep}", flush=True)


def main(a: argparse.Namespace) -> int:
    """`bench/scale.py --volume` (its parsed options)."""
    mode, counts, reps = scale_plan(a, MODES)
    size = int((a.size_mib or SIZE_MIB[mode]) * 2**20) // 4096 * 4096
    if not counts or counts[0] < 1 or reps < 1 or size < 4096:
        raise SystemExit("--agents must be >= 1, --reps >= 1, --size-mib >= 1 page")
    name = "scale_volume" if a.name == "scale" else a.name
    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="cpcoord-volume-", dir=a.store_dir))
    fleets: dict[str, Fleet] = {}
    points: list[dict[str, Any]] = []
    try:
        for path in PATHS:
            fleets[path] = start(tmp / path, path, counts[-1])
        for n in counts:
            for p in run_count(fleets, n, size, reps):
                points.append(p)
                r = row(p, size)
                raw = r["raw durable write s (best of 3)"]
                print(f"{n} x {size >> 20} MiB, {p['path']:11}: commit {r['commit s']:.2f} s "
                      f"(raw {raw:.2f} s), coordinator CPU {r['coordinator CPU s']:.3f} s, "
                      f"load {r['load 1m']:.2f}", flush=True)  # fmt: skip
    except Exception:
        keep_logs(tmp)
        raise
    finally:
        for f in fleets.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [row(p, size) for p in points]

    def cpu(path: str) -> str:
        return ", ".join(f"{r['coordinator CPU s']:.3f} s at {r['GiB committed']:.2f} GiB"
                         for r in rows if r["path"] == path)  # fmt: skip

    mib = size >> 20
    notes = [
        f"Each agent holds one member of {mib} MiB of random bytes, new before every "
        f"checkpoint; {reps} full checkpoint(s) per path and count, the paths interleaved; "
        "medians. GiB committed = the generation's new stored bytes.",
        "direct: the agents put their packs into the store (--data-path direct); the "
        "coordinator moves ids, page tables and pack reports. coordinator: every page "
        "goes through the coordinator (UploadPages), for contrast.",
        f"Coordinator CPU per checkpoint on the direct path: {cpu('direct')}; through the "
        f"coordinator: {cpu('coordinator')}.",
        f"raw = one file of the same bytes (N x {mib} MiB) written and fsynced into the "
        f"direct fleet's store directory, best of {RAW_REPS}, measured after each count's "
        "checkpoints; ratio = commit / raw.",
        "Checked: every checkpoint committed with every member on its fleet's data path and "
        "all its bytes new; every member of each row's last checkpoint was read back "
        "(ReadGeneration) and equals what it held (exact).",
        load_note(load_start, "both coordinators, their agents and targets, and this client"),
    ]
    extra = {
        "size_bytes": size,
        "mode": mode,
        "reps": reps,
        "raw_reps": RAW_REPS,
        "points": points,
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
    }
    return publish(
        name,
        "Data volume: coordinator CPU vs bytes committed",
        rows,
        notes=notes,
        extra=extra,
        plot=plot(points, mib),
    )
