"""Multi-level checkpoints (docs/multilevel.md): commit at local speed, drain later.

    python -m bench.multilevel [--size-mib 512] [--reps 3] [--store-dir DIR] [--cache-dir DIR]

Two agents (separate processes), each holding one member of SIZE MiB of resident random
pages, a real coordinator and a directory store under --store-dir (disk); each agent has
a node cache under --cache-dir (default /dev/shm: tmpfs). Per mode a fresh cluster (a
fresh store and caches: dedup must not make a later run cheaper), one full checkpoint:

- `--wait local`: call -> COMMITTED at level local; then the drain: COMMITTED -> level
  store, and its throughput (bytes stored / seconds);
- `--wait partner`: the agents also listen for partner copies (`--partner-listen`, each
  the other's partner) and the drain is held (`--drain-rate 1`: unheld, the drain to a
  local disk finishes first and the call returns at `store`): call -> COMMITTED at
  level partner (every pack copied to the other node and checked there in full);
- `--wait store` with the same caches: call -> COMMITTED at level store (local commit
  plus the drain);
- no cache (today's direct data path) for reference;
- raw: the same bytes written and fsynced into one file on the cache's tmpfs, and on the
  store's disk (best of --reps);
- floor (bench/floor.py): per member at once, only the copy out, the chunk ids and the
  tmpfs write over pages allocated before (as the cache's spares; best of --reps): how
  close any design that hashes before it commits can come.
Goal: `--wait local` (best of --reps, each on a fresh cluster) <= 1.3 x the raw tmpfs
write.
Every mode's export is checked byte for byte. Writes bench/results/multilevel.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import gbps, repeat, results_dir, timed_write, write_results
from bench.end_to_end_direct import exact
from bench.floor import parallel_floor
from cpcoord.api import Client, Level
from testbed.cluster import Cluster, attach_args
from testbed.driver import Target

RATIO_GOAL = 1.3
NODES = ("node-a", "node-b")


def one_mode(
    mode: str, tmp: Path, cache_root: Path, targets: dict[str, Target], want: dict[str, bytes]
) -> dict[str, Any]:
    root = tmp / f"cluster-{mode}"
    root.mkdir()
    caches = {n: cache_root / f"{mode}-{n}" for n in NODES}
    args = {n: ("--data-path", "direct") for n in NODES}
    if mode != "no cache":
        args = {n: (*args[n], "--cache", str(caches[n])) for n in NODES}
    if mode == "--wait partner":
        partner = ("--partner-listen", "127.0.0.1:0", "--drain-rate", "1")
        args = {n: (*args[n], *partner) for n in NODES}
    cluster = Cluster(root, nodes=NODES, heartbeat_ms=1000, agent_args=args)
    try:
        cluster.start()
        for (member, t), node in zip(targets.items(), NODES, strict=True):
            m = t.mapping("data")
            cluster.cli(*attach_args("bench", member, t.pid, node, [(m.addr, m.end)]))
        prepared_s = cluster.wait_prepared(NODES)
        wait = {"--wait local": Level.LOCAL, "--wait partner": Level.PARTNER}.get(mode, Level.STORE)
        with Client(cluster.address, insecure=True, timeout=900) as api:
            t0 = time.perf_counter()
            g = api.checkpoint("bench", wait=wait)
            commit_s = time.perf_counter() - t0
            level = g.level.value
            drain_s = 0.0
            if g.level is Level.LOCAL:
                while api.generation("bench", g.number).info.level is not Level.STORE:
                    time.sleep(0.02)
                drain_s = time.perf_counter() - t0 - commit_s
        return {
            "commit_s": commit_s,
            "level": level,
            "drain_s": drain_s,
            "bytes_new": g.bytes_new,
            "frozen_s": g.frozen_seconds,
            "prepared_s": prepared_s,
            "exact": exact(cluster, tmp, g.number, want),
        }
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)
        for c in caches.values():
            shutil.rmtree(c, ignore_errors=True)


def run(size_mib: int, reps: int, store_dir: Path | None, cache_dir: Path) -> int:
    size = size_mib << 20
    tmp = Path(tempfile.mkdtemp(prefix="cpcoord-multilevel-", dir=store_dir))
    cache_root = Path(tempfile.mkdtemp(prefix="cpcoord-multilevel-cache-", dir=cache_dir))
    targets = {
        f"m{i}": Target(maps=[f"data:{size // 4096}:anon:random:{61 + i}"], tmpdir=tmp, timeout=300)
        for i in range(len(NODES))
    }
    total = size * len(NODES)
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"size_bytes_per_member": size, "members": len(NODES)}
    try:
        want = {m: t.read("data").tobytes() for m, t in targets.items()}
        joined = memoryview(b"".join(want.values()))
        raw_tmpfs = repeat(lambda: timed_write(cache_root, joined), reps).min
        raw_disk = repeat(lambda: timed_write(tmp, joined), reps).min
        members = [(t.pid, t.mapping("data").addr, size) for t in targets.values()]
        floor = parallel_floor(members, cache_root, reps).min
        extra["floor_s"] = floor

        extra["raw_tmpfs_s"], extra["raw_disk_s"] = raw_tmpfs, raw_disk
        for mode in ("--wait local", "--wait partner", "--wait store", "no cache"):
            # The goal's mode is timed best of `reps` (fresh clusters), as the raw write
            # it is held against; the others once.
            runs = [one_mode(mode, tmp, cache_root, targets, want)
                    for _ in range(reps if mode == "--wait local" else 1)]  # fmt: skip
            r = min(runs, key=lambda x: x["commit_s"])
            r["all_commit_s"] = [x["commit_s"] for x in runs]
            r["exact"] = all(x["exact"] for x in runs)
            extra[mode] = r
            rows.append({
                "mode": mode,
                "commit s": r["commit_s"],
                "level": r["level"],
                "x raw tmpfs write": r["commit_s"] / raw_tmpfs,
                "drain s": r["drain_s"] or None,
                "drain GB/s": gbps(total, r["drain_s"]) if r["drain_s"] else None,
                "exact": r["exact"],
            })  # fmt: skip
        # The raw write into fresh tmpfs pages varies most (first touch in this VM): it
        # is measured again after the modes, and the best of both sets is the baseline,
        # so that a slow start never flatters the ratio.
        raw_tmpfs = min(raw_tmpfs, repeat(lambda: timed_write(cache_root, joined), reps).min)
        extra["raw_tmpfs_s"] = raw_tmpfs
        for r in rows:
            r["x raw tmpfs write"] = r["commit s"] / raw_tmpfs
        rows.append({"mode": "raw write, tmpfs (cache)", "commit s": raw_tmpfs,
                     "x raw tmpfs write": 1.0})  # fmt: skip
        rows.append({"mode": "floor: copy out + chunk ids + tmpfs write, per agent at once",
                     "commit s": floor, "x raw tmpfs write": floor / raw_tmpfs})  # fmt: skip
        rows.append({"mode": "raw write, disk (store)", "commit s": raw_disk,
                     "x raw tmpfs write": raw_disk / raw_tmpfs,
                     "drain GB/s": gbps(total, raw_disk)})  # fmt: skip
    finally:
        for t in targets.values():
            t.close()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(cache_root, ignore_errors=True)
    extra["load_average"] = os.getloadavg()
    local = extra["--wait local"]["commit_s"] / extra["raw_tmpfs_s"]
    notes = [
        f"Two agents x {size_mib} MiB incompressible, one full checkpoint per mode, each "
        f"on a fresh cluster (store on disk under {store_dir or tempfile.gettempdir()}, "
        f"caches on {cache_dir}).",
        f"Goal: --wait local <= {RATIO_GOAL} x the raw write of the same bytes to the same "
        f"tmpfs (best of {reps}; the raw write best of {reps} before the modes and "
        f"{reps} after): {local:.2f} "
        f"({'met' if local <= RATIO_GOAL else 'NOT met'}); --wait local runs: "
        + ", ".join(f"{x:.2f} s" for x in extra["--wait local"]["all_commit_s"])
        + ".",
        f"Floor (bench/floor.py): each member in its own process at once does only what "
        f"any checkpoint with chunk ids before the commit must: process_vm_readv into a "
        f"prefaulted buffer, one BLAKE3 pass (64 KiB chunks), the write + fsync over a "
        f"file of the same tmpfs written before the start (as the cache's spares); "
        f"best of {reps}: {floor:.3f} s = {floor / raw_tmpfs:.2f} x the raw write"
        + (
            ", so the goal is within reach of the design"
            if floor / raw_tmpfs <= RATIO_GOAL
            else " (above the goal in this run)"
        )
        + f"; --wait local is "
        f"{extra['--wait local']['commit_s'] / floor:.2f} x this floor.",
        "Drain: COMMITTED at local -> level store (both agents draining at once, unlimited "
        "rate), beside the raw durable write of the same bytes to the store's disk.",
        "--wait partner: each agent also copies its packs to the other's partner listener, "
        "which checks every chunk before it holds the copy; the drain is held (1 byte/s) "
        "so the call returns at level partner, not at store.",
        f"Load average during the run: {extra['load_average']} (a shared machine).",
    ]
    for p in write_results(
        "multilevel",
        "Multi-level checkpoints: commit in the node cache, drain to the store",
        ["mode", "commit s", "level", "x raw tmpfs write", "drain s", "drain GB/s", "exact"],
        rows,
        notes=notes,
        extra=extra,
    ):
        print(p)
    print((results_dir() / "multilevel.md").read_text())
    return 0 if all(r.get("exact", True) for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--store-dir", type=Path, default=None)
    ap.add_argument("--cache-dir", type=Path, default=Path("/dev/shm"))
    a = ap.parse_args(argv)
    return run(a.size_mib, a.reps, a.store_dir, a.cache_dir)


if __name__ == "__main__":
    raise SystemExit(main())
