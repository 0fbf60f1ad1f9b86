"""Ingest throughput of the page store: 1 GiB in 64 KiB chunks through missing(),
add_chunks() and commit(), for random, mostly-zero and compressible data.

Usage: python bench/store.py [--gib 1.0] [--chunk 65536] [--dir DIR] [--out FILE]
Writes a Markdown table to bench/results/store.md (or --out) and prints it.

What is timed is the store's side only: the caller's chunk ids (the agent hashes and
drops zero pages before upload) are computed outside the clock, and so is generating the
data. The store re-hashes every chunk it receives (verification on ingest), compresses,
writes fsynced packs, then commits. A second, identical generation measures the dedup
path (missing() finds everything, nothing is uploaded).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from coordinator.store import Manifest, MemberMap, PageTable, RegionMap, Repository
from storecore.ids import chunk_ids_of, member_of

BLOCK = 64 << 20  # data is generated and uploaded in blocks of this size
PAGE = 4096


def make_block(kind: str, rng: np.random.Generator, n: int) -> bytes:
    if kind == "random":
        return rng.bytes(n)
    if kind == "mostly-zero":  # one 64 KiB chunk in 64 holds data, the rest is zero
        a = np.zeros((n // 65536, 65536), dtype=np.uint8)
        rows = a[::64]
        rows[:] = np.frombuffer(rng.bytes(rows.size), dtype=np.uint8).reshape(rows.shape)
        return a.tobytes()
    # compressible: 64-byte records (8-byte counter, 8 random bytes, 48 bytes of a fixed
    # pattern), like an array of structs with pointers and padding; zstd-1 gets ~3x
    rec = np.zeros((n // 64, 8), dtype=np.uint64)
    rec[:, 0] = np.arange(rec.shape[0], dtype=np.uint64)
    rec[:, 1] = np.frombuffer(rng.bytes(8 * rec.shape[0]), dtype=np.uint64)
    rec[:, 2:] = 0x0000_7F3A_1000_0000
    return rec.tobytes()


def run(kind: str, root: Path, total: int, chunk: int) -> dict[str, float]:
    rng = np.random.default_rng(7)
    repo = Repository.open_local(root)
    timing = {"ingest": 0.0, "commit": 0.0, "dedup": 0.0}
    tables: list[PageTable] = []
    g = repo.begin("bench")
    all_ids = []
    for start in range(0, total, BLOCK):
        data = make_block(kind, rng, min(BLOCK, total - start))
        ids, chunks = chunk_ids_of(data, chunk)
        all_ids.append(ids)
        t0 = time.perf_counter()
        todo = repo.missing("bench", g, ids)
        sel = np.flatnonzero(member_of(ids, todo))
        if sel.size:
            repo.add_chunks("bench", g, ids[sel], [chunks[i] for i in sel])
        timing["ingest"] += time.perf_counter() - t0
    ids = np.concatenate(all_ids)
    per = chunk // PAGE
    tables.append(PageTable.of(np.arange(ids.size) * per, np.full(ids.size, per), ids))
    region = RegionMap("r", 0, total, tables[0])
    t0 = time.perf_counter()
    repo.commit(Manifest("bench", g, None, time.time_ns(), PAGE, (MemberMap("m", (region,)),)))
    timing["commit"] = time.perf_counter() - t0
    g2 = repo.begin("bench")
    t0 = time.perf_counter()
    left = repo.missing("bench", g2, ids)
    repo.commit(Manifest("bench", g2, g, time.time_ns(), PAGE, (MemberMap("m", (region,)),)))
    timing["dedup"] = time.perf_counter() - t0
    assert left.size == 0
    st = repo.stats()
    t0 = time.perf_counter()
    n = sum(r.count * PAGE for r in repo.iter_pages("bench", g2))
    timing["read"] = time.perf_counter() - t0
    repo.close()
    disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {**timing, "disk": disk, "stored": st.stored_chunk_bytes, "read_bytes": n}


def baseline_rates() -> dict[str, float]:
    """The bounds measured in the same run, MiB/s: hashing, compressing, durable writes."""
    import blake3
    import zstandard

    rng = np.random.default_rng(1)
    chunks: list[bytes | bytearray | memoryview] = [rng.bytes(65536) for _ in range(2048)]
    t0 = time.perf_counter()
    for c in chunks:
        blake3.blake3(c).digest()
    hash_rate = 128 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    zstandard.ZstdCompressor(level=1).multi_compress_to_buffer(chunks, threads=2)
    zstd_rate = 128 / (time.perf_counter() - t0)
    data = rng.bytes(16 << 20)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        for i in range(8):
            fd = os.open(f"{d}/f{i}", os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
        write_rate = 128 / (time.perf_counter() - t0)
    return {"blake3": hash_rate, "zstd": zstd_rate, "write_fsync": write_rate}


def baselines(rates: dict[str, float]) -> list[str]:
    hash_rate, zstd_rate, write_rate = rates["blake3"], rates["zstd"], rates["write_fsync"]
    load = Path("/proc/loadavg").read_text().split()[0]
    return [
        f"Same run: BLAKE3 {hash_rate:.0f} MiB/s (1 thread, 64 KiB chunks); zstd-1 on random "
        f"{zstd_rate:.0f} MiB/s (2 threads); write+fsync of 16 MiB files {write_rate:.0f} "
        f"MiB/s (1 writer); load average {load} on {os.cpu_count()} cpus.",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "store.md")
    a = ap.parse_args()
    total = int(a.gib * (1 << 30)) // a.chunk * a.chunk
    mib = total / (1 << 20)
    rows = [
        f"Store ingest, {mib:.0f} MiB in {a.chunk // 1024} KiB chunks "
        f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cpus)",
        "",
        "| data | ingest MiB/s | commit s | 2nd gen (dedup) s | read+verify MiB/s (logical) "
        "| on disk MiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    results: dict[str, dict[str, float]] = {}
    for kind in ("random", "mostly-zero", "compressible"):
        root = Path(tempfile.mkdtemp(prefix="cpcoord-bench-", dir=a.dir))
        try:
            r = results[kind] = run(kind, root, total, a.chunk)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        rows.append(
            f"| {kind} | {mib / r['ingest']:.0f} | {r['commit']:.3f} | {r['dedup']:.3f} "
            f"| {r['read_bytes'] / (1 << 20) / r['read']:.0f} | {r['disk'] / (1 << 20):.1f} |"
        )
    rates = baseline_rates()
    rows += ["", *baselines(rates)]
    text = "\n".join(rows) + "\n"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    # The same numbers for `python -m bench`'s summary (bench/run_all.py).
    doc = {"name": "store", "mib": mib, "chunk": a.chunk, "kinds": results, "baselines": rates}
    a.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
