"""A restore's read path through the cluster: the same rollback with the agent reading
the packs itself (`--data-path direct`) and through the coordinator (`--data-path
coordinator`). One member of SIZE MiB of random pages on a directory store, a full
checkpoint, every page rewritten, then a rollback (all pages come back), REPS times per
path.

    python -m bench.restore_read_path [--size-mib 256] [--reps 2]

Per rollback: the coordinator's CPU seconds (utime + stime of its process across the
call), the bytes it sent and located (cpcoord_data_path_read_bytes), the agent's CPU,
the call's wall time, the member's frozen time. Writes
bench/results/restore_read_path.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import write_results
from bench.restore_cluster import rollback
from testbed.cluster import Cluster, attach_args
from testbed.driver import Target
from testbed.scrape import free_port, read_bytes_by_path

TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def _one_path(tmp: Path, path: str, pages: int, reps: int) -> list[dict[str, Any]]:
    port = free_port()
    t = Target(maps=[f"data:{pages}:anon:random:11"], tmpdir=tmp, timeout=600)
    c = Cluster(
        tmp / f"cluster-{path}",
        nodes=("node-a",),
        agent_args={"node-a": ("--data-path", path)},
        coordinator_args=("--metrics-port", str(port)),
    )
    out = []
    try:
        c.root.mkdir()
        c.start()
        m = t.mapping("data")
        c.cli(*attach_args("bench", "m", t.pid, "node-a", [(m.addr, m.end)]))
        r = c.cli_json("checkpoint", "--job", "bench")
        assert r["state"] == "committed", r
        gen = int(r["generation"])
        assert c.coordinator is not None
        coord, agent = c.coordinator.pid, c.agents["node-a"].pid
        for k in range(reps):
            t.cmd("write", name="data", page=0, count=pages, counter=100 + k)
            b0, c0, a0 = read_bytes_by_path(port), _cpu_s(coord), _cpu_s(agent)
            got = rollback(c.address, "bench", gen)
            b1, c1, a1 = read_bytes_by_path(port), _cpu_s(coord), _cpu_s(agent)
            assert got["ok"], got
            sent = b1.get("coordinator", 0) - b0.get("coordinator", 0)
            located = b1.get("direct", 0) - b0.get("direct", 0)
            out.append(
                {
                    "path": path,
                    "coordinator_cpu_s": round(c1 - c0, 2),
                    "coordinator_sent_mib": round(sent / 2**20, 1),
                    "located_mib": round(located / 2**20, 1),
                    "agent_cpu_s": round(a1 - a0, 2),
                    "call_s": round(got["call_s"], 2),
                    "frozen_s": round(got.get("frozen_s", 0.0), 3),
                }
            )
    finally:
        c.close()
        t.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    pages = (args.size_mib << 20) // 4096
    tmp = Path(tempfile.mkdtemp(prefix=f"cpcoord-readpath-{os.getpid()}-"))
    rows = []
    for path in ("coordinator", "direct"):
        rows += _one_path(tmp, path, pages, args.reps)
    cols = list(rows[0])
    notes = [
        f"{args.size_mib} MiB member, random pages, directory store; load "
        f"{os.getloadavg()[0]:.1f} at the end; {time.strftime('%Y-%m-%d')}",
        "coordinator_sent: chunk bytes on DownloadPages; located: stored bytes of the "
        "chunks it named for the agent to read itself",
    ]
    for p in write_results(
        "restore_read_path",
        f"Restore read path, {args.size_mib} MiB rollback",
        cols,
        rows,
        notes=notes,
    ):
        print(p)
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
