"""Compression, dedup and capture speed on workloads beyond random bytes (bench/workloads.py).

    python -m bench.workloads_bench [--size-mib 256] [--reps 5] [--only NAME ...] [--store-dir DIR]

For each workload (a simulation stencil, a Python dict heap, a mostly-zero sparse array,
two ranks with largely identical memory), its members run as real processes holding about
SIZE MiB each. Then, in one run:

- capture: the real engine (`nodeagent.capture.process`) REPS times per member; its frozen
  window against raw `process_vm_readv` of exactly the same page runs into a prefaulted
  buffer (the machine's limit, measured alongside);
- generation 1: the last capture uploaded into a real store (`coordinator.store`
  Repository on local disk) the way an agent uploads, without the daemons: the agent's
  chunking rule (`nodeagent.upload.chunks.plan`: 16-page groups, zero pages as a marker), BLAKE3
  ids, `missing()`, `add_chunks()` (store re-hash, zstd, packs, fsync), `commit()`;
  read back and compared byte for byte with what was captured;
- generation 2: every member takes one step of its workload, is captured again in full
  and uploaded: only chunks the store lacks are stored (dedup across generations).

Ratios: zero = all-zero pages (never stored); dedup = non-zero bytes / distinct non-zero
chunk bytes (within a member, across members, and for generation 2 across generations);
compression = distinct chunk bytes / their stored (zstd-1) bytes; reduction = logical /
stored. Writes bench/results/workloads.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Stats, gbps, raw_readv, write_results
from bench.workloads import BY_NAME, WORKLOADS, Member, Workload, start, stop
from coordinator.store import Manifest, MemberMap, PageTable, RegionMap, Repository
from nodeagent.capture.process import Capture, capture
from nodeagent.pages import runs_from_pages
from nodeagent.proc.procfs import ProcessIdentity
from nodeagent.proc.staging import Staging
from nodeagent.upload.chunks import plan
from storecore.ids import ID_DTYPE, digest_all, member_of

PAGE = 4096
BATCH = 1024  # chunks per add_chunks call (<= 64 MiB), as an upload message would carry


@dataclass(frozen=True)
class Generation:
    """What one generation of a workload cost and what the store kept of it."""

    number: int
    logical: int  # captured pages * PAGE, zero pages included
    zero_pages: int
    chunk_bytes: int  # non-zero bytes (all chunks, repeats included)
    unique_bytes: int  # plain bytes of the distinct chunks of this generation
    new_stored: int  # stored bytes of the chunks this generation added
    referenced_stored: int  # stored bytes of the distinct chunks it references
    upload_s: float  # ids + missing + add_chunks + commit


def upload(repo: Repository, job: str, caps: list[tuple[str, Capture]]) -> Generation:
    """One generation of `caps` (member name, capture), uploaded like an agent does."""
    t0 = time.perf_counter()
    g = repo.begin(job)
    parent = repo.catalog.get(job, g).parent
    members, all_ids, sizes = [], [], []
    logical = zero = 0
    for name, cap in caps:
        regions = []
        for r in cap.regions:
            e = plan(r.pages, r.zero)
            nz = np.flatnonzero(~e.zero)
            # 1-D byte views of staging rows (no copy): the store sizes chunks by len().
            lo_rows, hi_rows = e.rows[nz].tolist(), (e.rows[nz] + e.counts[nz]).tolist()
            chunks = [r.data[a:b].reshape(-1).data for a, b in zip(lo_rows, hi_rows, strict=True)]
            ids = np.zeros(len(e), dtype=ID_DTYPE)  # ZERO marker for zero entries
            ids[nz] = digest_all(chunks)
            for lo in range(0, nz.size, BATCH):
                part = ids[nz[lo : lo + BATCH]]
                want = member_of(part, repo.missing(job, g, part))
                sel = np.flatnonzero(want)
                if sel.size:
                    repo.add_chunks(job, g, part[sel], [chunks[lo + int(k)] for k in sel])
            table = PageTable.of(e.offsets, e.counts, ids)
            regions.append(RegionMap(r.name, r.start, r.end, table))
            all_ids.append(ids[nz])
            sizes.append(e.counts[nz] * PAGE)
            logical += r.nbytes
            zero += r.zero_count
        members.append(MemberMap(name, tuple(regions)))
    info = repo.commit(Manifest(job, g, parent, time.time_ns(), PAGE, tuple(members)))
    dt = time.perf_counter() - t0
    ids_all, sz = np.concatenate(all_ids), np.concatenate(sizes)
    _, first = np.unique(ids_all, return_index=True)
    return Generation(
        number=g,
        logical=logical,
        zero_pages=zero,
        chunk_bytes=int(sz.sum()),
        unique_bytes=int(sz[first].sum()),
        new_stored=info.sizes.bytes_new,
        referenced_stored=info.sizes.bytes_stored,
        upload_s=dt,
    )


def check_restores(repo: Repository, job: str, g: int, caps: list[tuple[str, Capture]]) -> None:
    """The stored generation equals the captured pages, byte for byte (zeros included)."""
    for name, cap in caps:
        for r in cap.regions:
            want = np.zeros(((r.end - r.start) // PAGE, PAGE), dtype=np.uint8)
            want[r.pages.astype(np.int64)] = r.data
            got = repo.read_region(job, g, name, r.name)
            if bytes(got) != want.tobytes():
                raise AssertionError(f"{job} generation {g} {name}/{r.name} differs")


def capture_runs(m: Member, staging: Staging, reps: int) -> tuple[Capture, Stats, Stats, int]:
    """`reps` full captures of a member (the last one is returned, in `staging`), each
    followed by raw readv of the same page runs, so both see the same load:
    (capture, frozen seconds, raw seconds, bytes copied)."""
    ident = ProcessIdentity.of(m.pid)
    frozen, raw = [], []
    runs = None
    for _ in range(reps):
        cap = capture(ident, m.ranges, staging=staging)
        frozen.append(cap.timings.frozen)
        if runs is None:
            pages = [np.uint64(r.start // PAGE) + r.pages for r in cap.regions]
            runs = runs_from_pages(np.concatenate(pages)) * np.uint64(PAGE)
        raw.append(raw_readv(m.pid, runs, 1).median)
    return cap, Stats.of(frozen), Stats.of(raw), cap.nbytes


def bench_one(w: Workload, mib: int, reps: int, store_dir: Path) -> dict[str, Any]:
    members = start(w, mib)
    stagings = [Staging() for _ in members]
    root = Path(tempfile.mkdtemp(prefix=f"cpcoord-wl-{w.name}-", dir=store_dir))
    repo = Repository.open_local(root)
    try:
        got = [capture_runs(m, s, reps) for m, s in zip(members, stagings, strict=True)]
        caps = [(m.name, g[0]) for m, g in zip(members, got, strict=True)]
        g1 = upload(repo, w.name, caps)
        check_restores(repo, w.name, g1.number, caps)
        step_s = [m.step() for m in members]
        caps2 = [
            (m.name, capture(ProcessIdentity.of(m.pid), m.ranges, staging=s))
            for m, s in zip(members, stagings, strict=True)
        ]
        g2 = upload(repo, w.name, caps2)
        check_restores(repo, w.name, g2.number, caps2)
        for m in members:
            if m.proc.poll() is not None:
                raise RuntimeError(f"workload member {m.name} died")
        st = repo.stats()
    finally:
        repo.close()
        shutil.rmtree(root, ignore_errors=True)
        stop(members)
        for s in stagings:
            s.close()
    copied = sum(g[3] for g in got)
    frozen = sum(g[1].median for g in got)
    raw = sum(g[2].median for g in got)
    fz_min, fz_max = sum(g[1].min for g in got), sum(g[1].max for g in got)
    nonzero = g1.logical - g1.zero_pages * PAGE
    return {
        "workload": w.name,
        "members": w.members,
        "logical MiB": g1.logical / 2**20,
        "zero %": 100 * g1.zero_pages * PAGE / max(1, g1.logical),
        "dedup": nonzero / max(1, g1.unique_bytes),
        "compression": g1.unique_bytes / max(1, g1.referenced_stored),
        "stored MiB": g1.referenced_stored / 2**20,
        "reduction": g1.logical / max(1, g1.referenced_stored),
        "gen2 new MiB": g2.new_stored / 2**20,
        "gen2 new %": 100 * g2.new_stored / max(1, g2.logical),
        "capture GB/s": gbps(copied, frozen),
        "raw readv GB/s": gbps(copied, raw),
        "% of raw": 100 * raw / frozen,
        "frozen ms": frozen * 1e3,
        "frozen min-max": f"{fz_min * 1e3:.0f}-{fz_max * 1e3:.0f}",
        "upload MiB/s": g1.logical / 2**20 / g1.upload_s,
        "about": w.about,
        "detail": {
            "gen1": g1.__dict__,
            "gen2": g2.__dict__,
            "step_s": step_s,
            "frozen": [g[1].as_dict() for g in got],
            "raw_readv": [g[2].as_dict() for g in got],
            "store": {k: v for k, v in st.__dict__.items()},
            "rss": [m.rss for m in members],
        },
    }


def plot(rows: list[dict[str, Any]]) -> Any:
    def draw(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        names = [r["workload"] for r in rows]
        x = np.arange(len(rows))
        logical = np.array([r["logical MiB"] for r in rows])
        zero = logical * np.array([r["zero %"] for r in rows]) / 100
        stored = np.array([r["stored MiB"] for r in rows])
        new2 = np.array([r["gen2 new MiB"] for r in rows])
        ax1.bar(x - 0.3, logical - zero, 0.2, label="non-zero captured", color="#79c")
        ax1.bar(x - 0.3, zero, 0.2, bottom=logical - zero, label="zero pages", color="#cde")
        ax1.bar(x - 0.1, stored, 0.2, label="stored, generation 1", color="#2a7")
        ax1.bar(x + 0.1, new2, 0.2, label="new in generation 2 (after a step)", color="#e90")
        ax1.set_xticks(x, names, fontsize=8)
        ax1.set_ylabel("MiB")
        ax1.set_title("captured vs stored (dedup + zstd-1)", fontsize=9)
        ax1.legend(fontsize=7)
        ax2.bar(
            x - 0.2, [r["capture GB/s"] for r in rows], 0.4, label="capture (frozen)", color="#2a7"
        )
        ax2.bar(
            x + 0.2,
            [r["raw readv GB/s"] for r in rows],
            0.4,
            label="raw readv, same runs",
            color="#999",
        )
        for i, r in enumerate(rows):
            ax2.text(i - 0.2, r["capture GB/s"], f"{r['% of raw']:.0f}%", ha="center", fontsize=7)
        ax2.set_xticks(x, names, fontsize=8)
        ax2.set_ylabel("GB/s (median)")
        ax2.set_title("capture throughput vs the raw limit", fontsize=9)
        ax2.legend(fontsize=7)

    return draw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.workloads_bench", description=__doc__)
    p.add_argument("--size-mib", type=int, default=256, help="per member")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--only", nargs="*", choices=sorted(BY_NAME), default=None)
    p.add_argument("--store-dir", type=Path, default=Path("/var/tmp"), help="stores go here")
    args = p.parse_args(argv)
    chosen = [w for w in WORKLOADS if not args.only or w.name in args.only]
    load_before = os.getloadavg()
    rows = []
    for w in chosen:
        print(f"-- {w.name}: {w.about}", flush=True)
        rows.append(bench_one(w, args.size_mib, args.reps, args.store_dir))
        r = rows[-1]
        print(
            f"   zero {r['zero %']:.0f}%, dedup {r['dedup']:.2f}x, compression "
            f"{r['compression']:.2f}x, capture {r['% of raw']:.0f}% of raw",
            flush=True,
        )
    notes = [
        f"{args.size_mib} MiB per member; {args.reps} captures per member (median frozen "
        "time, min-max beside), each followed by raw process_vm_readv of the same runs into "
        "a prefaulted buffer; store on local disk (fsync), zstd level 1, 64 KiB chunks.",
        "zero % = all-zero pages of what was captured (never hashed, sent or stored). dedup "
        "= non-zero bytes / distinct chunk bytes. compression = distinct chunk bytes / "
        "stored bytes. reduction = logical / stored (everything together).",
        "gen2 new = stored bytes added by a second full capture after one workload step "
        "(the store keeps only chunks it lacks); % of that generation's logical size.",
        "dict-heap captures the whole interpreter (all writable private mappings); the "
        "others capture their array's mapping. Both generations read back byte for byte.",
        "upload MiB/s = logical bytes / (BLAKE3 ids + missing + add_chunks + commit), one "
        "thread, no gRPC (bench/end_to_end.py measures the whole path).",
        f"Load average before: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs, shared).",
    ]
    cols = [
        "workload",
        "members",
        "logical MiB",
        "zero %",
        "dedup",
        "compression",
        "stored MiB",
        "reduction",
        "gen2 new MiB",
        "gen2 new %",
        "capture GB/s",
        "raw readv GB/s",
        "% of raw",
        "frozen ms",
        "frozen min-max",
        "upload MiB/s",
    ]
    paths = write_results(
        "workloads",
        "Workloads: compression, dedup and capture vs raw readv",
        cols,
        rows,
        notes=notes,
        plot=plot(rows),
        extra={"size_mib": args.size_mib, "reps": args.reps},
    )
    print(paths[1].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
