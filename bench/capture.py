"""Capture throughput and frozen time against this machine's raw process_vm_readv.

    python -m bench.capture [--size-mib 1024] [--reps 5] [--thp] [--disk-dir DIR]

A target process holds SIZE MiB of resident, incompressible (random) pages in one
mapping, with three idle threads besides. In one run this measures:

- raw `process_vm_readv` of exactly those pages into a prefaulted buffer (the baseline);
- cpcoord's capture of that range: frozen window = freeze + maps/pagemap + copy + thaw
  (that is both its "capture" time and the time the target is stopped), and separately
  the preparation before the freeze and the zero-page scan after the thaw;
- the whole `cpcoord capture` command with the image written, default tracker: in-process
  (cli.main) and as a subprocess (interpreter start included, byte code cached as after
  `pip install`), to tmpfs and to the disk (durable: fsynced);
- the raw limit of each filesystem, interleaved with those runs: raw readv + a raw write
  of the same bytes into a new file there (+ fsync on disk), best of the runs of each;
- memcpy for context.

Goals: capture >= 70% of raw, frozen <= 0.45 s for 1 GiB, whole command >= 40% of raw;
`cpcoord capture` <= 1.5x the raw limit on tmpfs and on disk.
Writes bench/results/capture.{json,md,png}.

    python -m bench.capture --mappings 1000,5000,20000,50000 [--size-mib 1024] [--reps 3]

measures instead how the frozen time grows with the number of mappings, beside the
single SIZE MiB mapping (bench/capture_mappings.py; capture-mappings.{json,md,png}).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.capture_cli import GOAL_VS_LIMIT, cli_notes, interpreter_note, measure_cli
from bench.common import (
    Stats,
    gbps,
    memcpy,
    rate_row,
    raw_mem,
    raw_readv,
    write_results,
)
from cpcoord.image_writer import ImageWriter
from cpcoord.ranges import AddressRange
from nodeagent.capture.process import capture
from nodeagent.proc.procfs import ProcessIdentity
from testbed.driver import Target, dirty_mib

GOAL_CAPTURE, GOAL_FROZEN_S_PER_GIB, GOAL_CLI = 0.70, 0.45, 0.40


def _in_place(ident: ProcessIdentity, rng: AddressRange, base: Path, pages: int) -> Any:
    """One engine capture into an image's region file on tmpfs; its timings."""
    work = Path(tempfile.mkdtemp(prefix="cpcoord-bench-ip-", dir=base))
    try:
        w = ImageWriter(work / "img")
        into = w.in_place("m")
        assert into is not None, f"{base} is not tmpfs"
        cap = capture(ident, [rng], into=into)
        assert cap.pages == pages, (cap.pages, pages)
        timings = cap.timings
        w.abort()
        del cap
        gc.collect()
        return timings
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if any(a == "--mappings" or a.startswith("--mappings=") for a in args_in):
        from bench.capture_mappings import run

        return run(args_in)
    p = argparse.ArgumentParser(prog="python -m bench.capture", description=__doc__)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--thp", action="store_true", help="target memory in transparent huge pages")
    p.add_argument("--tmpfs-dir", default="/dev/shm", help="memory-backed image directory")
    p.add_argument("--disk-dir", default="/var/tmp", help="disk-backed image directory")
    p.add_argument("--name", default="capture", help="results file name under bench/results")
    p.add_argument("--no-fork", action="store_true", help="skip the forked-target rows")
    p.add_argument("--no-cli", action="store_true", help="skip the `cpcoord capture` rows")
    args = p.parse_args(argv)

    size = args.size_mib << 20
    pages = size // 4096
    print(f"starting a target with {args.size_mib} MiB of random resident pages ...", flush=True)
    target = Target(maps=[f"data:{pages}:anon:random:7"], thp=args.thp, timeout=600)
    try:
        target.cmd("threads", count=3)
        m = target.mapping("data")
        runs = np.array([[m.addr, size]], dtype=np.uint64)
        rng_text = f"0x{m.addr:x}-0x{m.end:x}"
        ident = ProcessIdentity.of(target.pid)
        rows: list[dict[str, Any]] = []
        extra: dict[str, Any] = {"size_bytes": size, "target_thp": args.thp}

        raw = raw_readv(target.pid, runs, args.reps)
        raw_gbps = gbps(size, raw.median)
        extra["raw_readv"] = raw.as_dict()

        def row(what: str, st: Stats, nbytes: int = size, **more: Any) -> dict[str, Any]:
            return rate_row(what, st, nbytes, raw_gbps, **more)

        rows.append(row("raw process_vm_readv (baseline)", raw))
        mem = raw_mem(target.pid, runs, args.reps)
        extra["raw_mem"] = mem.as_dict()
        rows.append(row("baseline: raw /proc/PID/mem (no pins)", mem))

        frozen, prepare, zscan, totals, copy = [], [], [], [], []
        ip_frozen, ip_copy, ip_total = [], [], []
        for _ in range(args.reps):
            cap = capture(ident, [AddressRange(m.addr, m.end)])
            assert cap.pages == pages, (cap.pages, pages)
            tm = cap.timings
            frozen.append(tm.frozen)
            prepare.append(tm.prepare)
            zscan.append(tm.zero_scan)
            totals.append(tm.total)
            copy.append(tm.copy)
            cap.staging.close()
            del cap
            gc.collect()
            # The same, copied in place into an image's region file on tmpfs.
            tm = _in_place(ident, AddressRange(m.addr, m.end), Path(args.tmpfs_dir), pages)
            ip_frozen.append(tm.frozen)
            ip_copy.append(tm.copy)
            ip_total.append(tm.total)
        fz = Stats.of(frozen)
        extra["capture"] = {
            "frozen": fz.as_dict(),
            "copy": Stats.of(copy).as_dict(),
            "prepare": Stats.of(prepare).as_dict(),
            "zero_scan": Stats.of(zscan).as_dict(),
            "total": Stats.of(totals).as_dict(),
        }
        rows.append(row("capture: freeze + copy + thaw (= frozen time)", fz))
        rows.append(row("capture: copy alone (frozen)", Stats.of(copy)))
        rows.append(row("capture incl. prepare + zero scan", Stats.of(totals)))
        extra["capture_in_place"] = {
            "frozen": Stats.of(ip_frozen).as_dict(),
            "copy": Stats.of(ip_copy).as_dict(),
            "total": Stats.of(ip_total).as_dict(),
        }
        rows.append(row("capture in place (tmpfs file): frozen time", Stats.of(ip_frozen)))
        rows.append(row("capture in place: copy alone (frozen)", Stats.of(ip_copy)))
        rows.append(row("capture in place incl. prepare + zero scan", Stats.of(ip_total)))

        cli_rows, limits, readv_s = measure_cli(
            target.pid, runs, rng_text, raw, args, rows, row, extra
        )
        extra["raw_readv_all"] = Stats.of(readv_s).as_dict()
        mc = memcpy(size, args.reps)
        rows.append(row("baseline: memcpy in one process", mc))
        if not args.no_fork:
            # Last: its raw process_vm_readv unshares the target's memory.
            forked_rows(
                target, ident, AddressRange(m.addr, m.end), runs, args.reps, rows, row, extra
            )
        target.assert_running()
    finally:
        target.close()

    per_gib = fz.max * (1 << 30) / size
    best_cli = max(cli_rows.items(), key=lambda kv: gbps(size, kv[1].median), default=None)
    verdict = {
        "capture_vs_raw": gbps(size, fz.median) / raw_gbps,
        "frozen_max_s_per_gib": per_gib,
        "cli_best": best_cli[0] if best_cli else "",
        "cli_best_vs_raw": gbps(size, best_cli[1].median) / raw_gbps if best_cli else 0.0,
    }
    for label, limit in limits.items():
        verdict[f"cli_subprocess_vs_limit_{label}"] = cli_rows[f"subprocess {label}"].median / limit
        verdict[f"cli_in_process_vs_limit_{label}"] = cli_rows[f"in-process {label}"].median / limit
    extra["verdict"] = verdict

    def ok(b: bool) -> str:
        return "met" if b else "NOT met"

    notes = [
        f"Goal capture >= {GOAL_CAPTURE:.0%} of raw: {verdict['capture_vs_raw']:.0%} "
        f"({ok(verdict['capture_vs_raw'] >= GOAL_CAPTURE)}).",
        f"Goal frozen <= {GOAL_FROZEN_S_PER_GIB} s per GiB: worst of {args.reps} runs "
        f"{per_gib:.3f} s/GiB ({ok(per_gib <= GOAL_FROZEN_S_PER_GIB)}).",
        f"Goal whole command >= {GOAL_CLI:.0%} of raw: best is {verdict['cli_best']} at "
        f"{verdict['cli_best_vs_raw']:.0%} ({ok(verdict['cli_best_vs_raw'] >= GOAL_CLI)}); "
        "all variants are in the table.",
        *cli_notes(limits, cli_rows, verdict, extra, args.reps, len(raw.samples)),
        "Pages not exclusively mapped (pagemap bit 56) are read through /proc/PID/mem, "
        "which takes no pins: process_vm_readv pins, and pinning a copy-on-write shared "
        "page unshares it. The forked rows capture the same memory shared with a child "
        "(everything goes through /proc/PID/mem; the target keeps it shared), then show "
        "what a first process_vm_readv costs there: it copies every page.",
        interpreter_note(extra, args.reps),
        "On tmpfs the command copies straight into the image's files (no staging, no "
        "second copy); on disk it copies into staging and writes big runs with O_DIRECT, "
        "then fsyncs. The tracker is the default (auto: "
        + ", ".join(sorted({str(extra[f"cli_{label}"]["tracker"]) for label in limits}))
        + "), armed in the frozen window.",
        "Frozen window = seize/interrupt of every thread, maps + pagemap read, copy, check, "
        "detach of every thread. Prepare (pagemap pre-pass + prefaulting staging) runs "
        "before the freeze; the zero-page scan and image writing after the thaw.",
        "Subprocess rows include the Python interpreter start and imports (byte code cached, "
        "as installed); disk rows include fsync of every file; the write rows show what "
        "the storage allows alone. Raw limits are the best runs (a slow run is the "
        "machine's noise, never the limit); the commands' are medians.",
        f"{args.reps} repetitions each; target pages are {'THP' if args.thp else '4 KiB'}.",
    ]

    def plot(fig: Any) -> None:
        ax1, ax3, ax2 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [3, 1.4, 1]})
        labels = [r["what"] for r in rows]
        vals = [r["GB/s"] for r in rows]
        y = np.arange(len(rows))
        colors = ["#999" if ("baseline" in lbl or "limit" in lbl) else "#2a7" for lbl in labels]
        ax1.barh(y, vals, color=colors)
        ax1.set_yticks(y, labels, fontsize=7)
        ax1.invert_yaxis()
        ax1.axvline(raw_gbps * GOAL_CAPTURE, color="#c33", ls="--", lw=1, label="70% of raw")
        ax1.axvline(raw_gbps * GOAL_CLI, color="#e90", ls=":", lw=1, label="40% of raw")
        ax1.set_xlabel("GB/s (median)")
        ax1.legend(fontsize=7)
        ax1.set_title(f"capture of {args.size_mib} MiB", fontsize=9)
        vs = [
            (r["what"].split("image on ")[-1], r["x limit"])
            for r in rows
            if "image on" in r["what"]
        ]
        yy = np.arange(len(vs))
        ax3.barh(yy, [v for _, v in vs], color="#27a")
        ax3.set_yticks(yy, [w for w, _ in vs], fontsize=7)
        ax3.invert_yaxis()
        ax3.axvline(GOAL_VS_LIMIT, color="#c33", ls="--", lw=1, label=f"goal {GOAL_VS_LIMIT}x")
        ax3.axvline(1.0, color="#999", ls=":", lw=1)
        ax3.set_xlabel("median / (raw readv + write)")
        ax3.legend(fontsize=7)
        ax3.set_title("`cpcoord capture` vs raw limit", fontsize=9)
        ax2.plot(range(1, len(frozen) + 1), [f * 1e3 for f in frozen], "o-", label="frozen")
        ax2.axhline(
            GOAL_FROZEN_S_PER_GIB * 1e3 * size / (1 << 30),
            color="#c33",
            ls="--",
            lw=1,
            label="goal",
        )
        ax2.set_ylim(bottom=0)
        ax2.set_xlabel("run")
        ax2.set_ylabel("ms")
        ax2.legend(fontsize=7)
        ax2.set_title("time the target was stopped", fontsize=9)

    cols = ["what", "MiB", "median s", "min s", "max s", "GB/s", "% of raw", "x limit"]
    paths = write_results(
        args.name,
        "cpcoord capture vs raw process_vm_readv",
        cols,
        rows,
        notes=notes,
        extra=extra,
        plot=plot,
    )
    print(paths[1].read_text())
    print("written:", ", ".join(str(p) for p in paths))
    return 0


def forked_rows(
    target: Target,
    ident: ProcessIdentity,
    rng: AddressRange,
    runs: np.ndarray,
    reps: int,
    rows: list[dict[str, Any]],
    row: Any,
    extra: dict[str, Any],
) -> None:
    """The same memory after the target forked (parent and child share every page):
    cpcoord's capture keeps it shared; raw /proc/PID/mem for comparison; then the first
    raw process_vm_readv, which unshares (copies) every page, and the ones after it."""
    child = int(target.cmd("fork")["child"])
    size = int(runs[:, 1].sum())
    before = dirty_mib(target.pid)
    frozen, copy = [], []
    for _ in range(reps):
        cap = capture(ident, [rng])
        frozen.append(cap.timings.frozen)
        copy.append(cap.timings.copy)
        assert cap.shared_bytes == size, (cap.shared_bytes, size)
        cap.staging.close()
        del cap
        gc.collect()
    after = dirty_mib(target.pid)
    extra["forked"] = {
        "child": child,
        "dirty_before_mib": before,
        "dirty_after_captures_mib": after,
        "frozen": Stats.of(frozen).as_dict(),
        "copy": Stats.of(copy).as_dict(),
    }
    rows.append(row("forked: capture frozen (all pages shared)", Stats.of(frozen)))
    rows.append(row("forked: capture copy alone", Stats.of(copy)))
    mem = raw_mem(target.pid, runs, reps)
    rows.append(row("forked: raw /proc/PID/mem (baseline)", mem))
    first = raw_readv(target.pid, runs, 1, warmup=0)  # the pass that unshares
    rows.append(row("forked: first raw process_vm_readv (unshares all)", first))
    again = raw_readv(target.pid, runs, reps)
    rows.append(row("forked: raw process_vm_readv after that", again))
    extra["forked"]["dirty_after_readv_mib"] = dirty_mib(target.pid)
    extra["forked"]["raw_mem"] = mem.as_dict()
    extra["forked"]["first_readv"] = first.as_dict()
    print(
        "forked target, parent dirty MiB:",
        before,
        "->",
        after,
        "-> after readv",
        extra["forked"]["dirty_after_readv_mib"],
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
