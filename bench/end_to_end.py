"""A checkpoint through the whole system against this machine's raw rates.

    python -m bench.end_to_end [--size-mib 1024] [--dirty 0.01] [--reps 3] [--store-dir DIR]
    python -m bench.end_to_end --direct    (the direct data path: bench/end_to_end_direct.py)

One member of SIZE MiB of resident, incompressible (random) pages; a real coordinator and
a real agent as separate processes on loopback (tests/helpers/cluster.py), the store on
disk. In one run this measures:

- raw `process_vm_readv` of the member's pages into a prefaulted buffer;
- the capture engine alone (nodeagent.capture.process, no agent, no coordinator): its frozen time;
- raw gRPC streaming on loopback: a generic-handler server in its own process receiving a
  client stream of 1 MiB and 4 MiB `bytes` messages, SIZE in total;
- the raw durable write rate of the store's disk: SIZE as 16 MiB objects through the
  local backend's own `put` (O_DIRECT, fsync, rename, directory fsync): packs must be on
  disk before the commit, so this bounds it too;
- cpcoord: a full checkpoint, then one after writing `--dirty` of the pages (spread in
  runs over the whole member): frozen time (longest member downtime, as the agent
  measured it), time from the Checkpoint call to COMMITTED, new bytes stored, the
  store's size on disk (du), and the CPU seconds the coordinator and agent processes
  used during the full checkpoint (the machine is shared: CPU time is steadier than
  wall time; docs/performance.md has the profile).

Goal: the full commit of SIZE incompressible within 1.5x the time raw gRPC needs to move
SIZE (best of the two message sizes); frozen time as the capture engine's.
Writes bench/results/end_to_end.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import Stats, gbps, raw_readv, repeat, results_dir, write_results
from cpcoord.gen.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from cpcoord.grpcopts import channel_options, server_options
from cpcoord.ranges import AddressRange
from storecore.backend import Kind, LocalBackend
from testbed.cluster import Cluster, attach_args
from testbed.daemons import wait_for
from testbed.driver import REPO, Target

GOAL_RATIO = 1.5
RAW_METHOD = "/bench.Raw/Sink"


# -- raw gRPC baseline --------------------------------------------------------------------


def _sink(requests: Any, context: grpc.ServicerContext) -> bytes:
    n = 0
    for msg in requests:
        n += len(msg)
    return str(n).encode()


def raw_server(port_file: Path) -> None:
    """`python -m bench.end_to_end --raw-server FILE`: serve the sink until killed."""
    server = grpc.server(futures.ThreadPoolExecutor(4), options=server_options())
    handler = grpc.stream_unary_rpc_method_handler(_sink)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Raw", {"Sink": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.replace(port_file)  # whole or absent: the client must never read it half written
    server.wait_for_termination()


def raw_grpc(total: int, msg_bytes: int, reps: int, tmp: Path) -> Stats:
    port_file = tmp / f"raw-{msg_bytes}.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.end_to_end", "--raw-server", str(port_file)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 30, "raw gRPC")
        addr = f"127.0.0.1:{port_file.read_text().strip()}"
        payload = np.random.default_rng(5).bytes(msg_bytes)
        count = total // msg_bytes
        with grpc.insecure_channel(addr, options=channel_options()) as ch:
            call = ch.stream_unary(RAW_METHOD, None, None)

            def once() -> None:
                got = call(iter([payload] * count), timeout=300)
                assert int(got) == count * msg_bytes

            return repeat(once, reps, warmup=1)
    finally:
        proc.kill()
        proc.wait()


# -- raw disk -----------------------------------------------------------------------------


def raw_disk(total: int, reps: int, tmp: Path) -> Stats:
    """SIZE written as 16 MiB objects through the store's own durable put (temp file,
    O_DIRECT bulk write, fsync, rename, directory fsync): the disk's limit for packs."""
    backend = LocalBackend(tmp / "raw-disk")
    payload = np.random.default_rng(6).bytes(16 << 20)
    count = max(1, total // len(payload))

    def once() -> None:
        for i in range(count):
            backend.put(Kind.PACKS, f"{i:064x}", payload)

    try:
        return repeat(once, reps, warmup=1)
    finally:
        backend.close()
        shutil.rmtree(tmp / "raw-disk", ignore_errors=True)


_CPUCLOCK_SCHED = 2  # include/linux/posix-timers.h: the scheduler's runtime, in ns


def cpu_seconds(pid: int) -> float:
    """CPU seconds a process has used so far, all its threads (ended ones too), to the
    nanosecond: its process CPU clock (clock_getcpuclockid(3): CPUCLOCK_SCHED of the
    whole group, encoded as the kernel does). /proc/PID/stat counts 10 ms ticks and
    splits user from system by sampling, which moved a 1 GiB checkpoint's coordinator
    figure by a tick either way (0.10 or 0.11 s); it is the fallback."""
    try:
        return time.clock_gettime(((~pid) << 3) | _CPUCLOCK_SCHED)
    except OSError:  # a kernel without per-process CPU clocks, or the process ended
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- cpcoord ------------------------------------------------------------------------------


def du(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def checkpoint(address: str, job: str) -> dict[str, Any]:
    """One checkpoint through the API; the phases from its progress events."""
    marks: dict[str, float] = {}
    with grpc.insecure_channel(address, options=channel_options()) as ch:
        stub = coordinator_pb2_grpc.CoordinatorStub(ch)
        t0 = time.perf_counter()
        last = None
        for ev in stub.Checkpoint(coordinator_pb2.CheckpointRequest(job=job), timeout=600):
            kind = common_pb2.ProgressKind.Name(ev.kind).removeprefix("PROGRESS_KIND_").lower()
            marks[kind] = ev.elapsed_seconds
            last = ev
        dt = time.perf_counter() - t0
    assert last is not None and last.kind == common_pb2.PROGRESS_KIND_COMMITTED, last
    i = last.info
    return {
        "commit_s": dt,
        "frozen_s": i.frozen_seconds,
        "pages": i.pages_captured,
        "bytes_new": i.bytes_new,
        "full": i.full,
        "generation": i.number,
        # Since Begin: the barrier, the member thawed (staged), its upload stored, the
        # generation committed (manifest and catalog).
        "phases": {
            k: marks[k]
            for k in ("barrier", "member_staged", "member_uploaded", "committed")
            if k in marks
        },
    }


def upload_timings(log: Path) -> list[dict[str, float]]:
    """The coordinator's per-stream split (debug log): waiting for the agent's next
    batch, checking batches, storing chunks."""
    out: list[dict[str, float]] = []
    for line in log.read_text(errors="replace").splitlines():
        if 'msg="upload timing"' in line:
            f = dict(x.split("=", 1) for x in line.split() if "=" in x)
            keys: tuple[str, ...] = ("wait_s", "check_s", "store_s")
            out.append({k: float(f[k]) for k in keys if k in f})
    return out


def dirty(t: Target, pages: int, fraction: float) -> int:
    """Write `fraction` of the pages, in 64 runs spread over the member; returns pages."""
    want = max(1, int(pages * fraction))
    runs = min(64, want)
    per, step = want // runs, pages // runs
    for k in range(runs):
        t.cmd("write", name="data", page=k * step, count=per, counter=k + 1)
    return per * runs


def capture_engine_frozen(t: Target, reps: int) -> Stats:
    """The capture engine on its own (bench/capture.py measures it in depth)."""
    from nodeagent.capture.process import capture
    from nodeagent.proc.procfs import ProcessIdentity

    m = t.mapping("data")
    ident = ProcessIdentity.of(t.pid)

    def once() -> float:
        cap = capture(ident, [AddressRange(m.addr, m.end)])
        frozen = cap.timings.frozen
        cap.staging.close()
        return frozen

    return repeat(once, reps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dirty", type=float, default=0.01)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the raw baselines")
    ap.add_argument("--store-dir", type=Path, default=None, help="parent dir of the store")
    ap.add_argument("--raw-server", type=Path, help=argparse.SUPPRESS)
    ap.add_argument(
        "--direct",
        action="store_true",
        help="two agents on the direct data path, directory and S3 store "
        "(bench/end_to_end_direct.py; --size-mib per member, default 512)",
    )
    args = ap.parse_args()
    if args.raw_server:
        raw_server(args.raw_server)
        return 0
    if args.direct:
        from bench import end_to_end_direct

        size = 512 if "--size-mib" not in sys.argv else args.size_mib
        return end_to_end_direct.run(size, args.reps, args.store_dir)
    size = args.size_mib << 20
    pages = size // 4096
    tmp = Path(tempfile.mkdtemp(prefix="cpcoord-e2e-", dir=args.store_dir))
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"size_bytes": size, "dirty_fraction": args.dirty}
    t = Target(maps=[f"data:{pages}:anon:random:11"], tmpdir=tmp, timeout=300)
    cluster = Cluster(tmp / "cluster", nodes=("node-a",), heartbeat_ms=1000, log_level="debug")
    try:
        m = t.mapping("data")
        runs = np.array([[m.addr, size]], dtype=np.uint64)
        readv = raw_readv(t.pid, runs, args.reps)
        rows.append(
            {
                "what": "raw process_vm_readv",
                "seconds": readv.median,
                "GB/s": gbps(size, readv.median),
            }
        )
        eng = capture_engine_frozen(t, args.reps)
        rows.append(
            {"what": "capture engine alone: frozen", "seconds": eng.median, "frozen_s": eng.median}
        )
        raw: dict[int, Stats] = {}
        for mib in (1, 4):
            raw[mib] = raw_grpc(size, mib << 20, args.reps, tmp)
            rows.append(
                {
                    "what": f"raw gRPC stream, {mib} MiB messages",
                    "seconds": raw[mib].median,
                    "GB/s": gbps(size, raw[mib].median),
                }
            )
        best_raw = min(s.median for s in raw.values())
        disk = raw_disk(size, args.reps, tmp)
        rows.append(
            {
                "what": "raw store put (disk), 16 MiB objects",
                "seconds": disk.median,
                "GB/s": gbps(size, disk.median),
            }
        )

        (tmp / "cluster").mkdir()
        cluster.start()
        cluster.cli(*attach_args("bench", "m", t.pid, "node-a", [(m.addr, m.end)]))
        assert cluster.coordinator is not None
        procs = {"coordinator": cluster.coordinator.pid, "agent": cluster.agents["node-a"].pid}
        cpu0 = {k: cpu_seconds(p) for k, p in procs.items()}
        full = checkpoint(cluster.address, "bench")
        full["cpu_s"] = {k: round(cpu_seconds(p) - cpu0[k], 3) for k, p in procs.items()}
        full["store_bytes"] = du(cluster.store)
        rows.append(
            {
                "what": "cpcoord full checkpoint",
                "seconds": full["commit_s"],
                "GB/s": gbps(size, full["commit_s"]),
                "frozen_s": full["frozen_s"],
                "new MiB": full["bytes_new"] / 2**20,
                "store MiB": full["store_bytes"] / 2**20,
            }
        )
        n_dirty = dirty(t, pages, args.dirty)
        inc = checkpoint(cluster.address, "bench")
        inc["store_bytes"] = du(cluster.store)
        rows.append(
            {
                "what": f"cpcoord incremental ({n_dirty} pages dirty)",
                "seconds": inc["commit_s"],
                "frozen_s": inc["frozen_s"],
                "new MiB": inc["bytes_new"] / 2**20,
                "store MiB": inc["store_bytes"] / 2**20,
            }
        )
        timings = upload_timings(tmp / "cluster" / "coordinator.log")
        full["coordinator_upload"], inc["coordinator_upload"] = [*timings, {}, {}][:2]
        ratio = full["commit_s"] / best_raw
        extra.update(
            raw_disk_s=disk.median,
            load_average=os.getloadavg(),
            full=full,
            incremental=inc,
            raw_grpc_best_s=best_raw,
            ratio=ratio,
            goal_ratio=GOAL_RATIO,
            dirty_pages=n_dirty,
        )
    finally:
        cluster.close()
        t.close()
    verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
    notes = [
        f"Full commit / raw gRPC (best message size) = {ratio:.2f}; goal <= {GOAL_RATIO}: "
        f"{verdict}.",
        f"Disk: the raw store put of SIZE takes {disk.median:.2f} s; the commit cannot be "
        f"faster than max(raw gRPC, raw disk) = {max(best_raw, disk.median):.2f} s "
        f"(ratio to that: {full['commit_s'] / max(best_raw, disk.median):.2f}).",
        f"CPU seconds during the full checkpoint: {full['cpu_s']} "
        "(the machine is shared: CPU time is steadier than wall time).",
        f"Frozen: cpcoord full {full['frozen_s'] * 1e3:.0f} ms vs capture engine alone "
        f"{eng.median * 1e3:.0f} ms; incremental {inc['frozen_s'] * 1e3:.0f} ms.",
        f"Full, seconds since Begin: {full['phases']}; coordinator during the upload: "
        f"{full['coordinator_upload']} (wait = for the agent's next batch).",
        "Commit = Checkpoint call to COMMITTED: freeze, barrier, copy, thaw, agent hashing "
        "(BLAKE3) and MissingChunks, upload, store re-hash, pack writes, fsync, manifest, "
        "catalog flip. Store on disk; coordinator and agent are separate processes.",
    ]
    for p in write_results(
        "end_to_end",
        "Checkpoint through coordinator and store",
        ["what", "seconds", "GB/s", "frozen_s", "new MiB", "store MiB"],
        rows,
        notes=notes,
        extra=extra,
    ):
        print(p)
    print((results_dir() / "end_to_end.md").read_text())  # the file just written
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
