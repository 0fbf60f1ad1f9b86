"""Restore in place against this machine's raw process_vm_writev, measured in the same run.

    python -m bench.restore [--size-mib 1024] [--reps 5]

A target process holds SIZE MiB of resident, incompressible pages in one mapping (plus
three idle threads). Captured once; then:

- raw `process_vm_writev` of exactly those bytes from a prefaulted buffer (the baseline);
- raw `process_vm_readv` of the same bytes (what the all-or-nothing backup reads);
- restore in place: freeze + fit check + write + thaw (= the time the target is stopped),
  and the write alone (nodeagent.restore.apply.write: maps, plan, backup, writev), with the
  backup in a prefaulted buffer (as the agent does) and in fresh memory;
- the same with the backup taken live right before the freeze (restore/livebackup.py, as
  the agent does for large rollbacks): frozen time, and the live read itself;
- restore in place of a generation where half the pages were zero at the cut (zeros
  come from the zero source) - the same bytes written, half of them zeros;
- the read-only path: the mapping made read-only, every byte through /proc/PID/mem;
- restore into a new process: fresh, never-touched memory at another address, so the
  write also faults every page in.

Writes bench/results/restore.{json,md,png}.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.common import Stats, gbps, rate_row, raw_readv, raw_writev, write_results
from cpcoord.ranges import PAGE_SIZE, AddressRange
from nodeagent.capture.process import capture
from nodeagent.pages import empty_pages, empty_runs
from nodeagent.proc.freeze import frozen
from nodeagent.proc.procfs import ProcessIdentity, read_maps
from nodeagent.proc.staging import Staging
from nodeagent.restore import livebackup
from nodeagent.restore.apply import (
    MemberLayout,
    RegionContents,
    RegionLayout,
    RestoreStats,
    check_fit,
    restore_into,
    write,
)
from nodeagent.restore.backup import BackupStore
from testbed.driver import Target


def _in_place(
    ident: ProcessIdentity,
    contents: RegionContents,
    reps: int,
    raw: Callable[[], float] | None = None,
    backup: Staging | None = None,
    live_pages: npt.NDArray[np.uint64] | None = None,
    live_s: list[float] | None = None,
) -> tuple[Stats, Stats, RestoreStats, Stats | None]:
    """(frozen time, write time, last stats, raw times) over `reps` restores in place;
    with `raw`, one raw write runs before each restore, so both see the same load.
    `backup`: the prefaulted buffer the backup of what is overwritten goes to (the
    agent passes the member's idle capture staging), else memory mapped while frozen.
    `live_pages`: back them up live before each freeze (restore/livebackup.py; nothing
    writes in between here, so nothing is stale), its seconds appended to `live_s`."""
    layout = MemberLayout("bench", (RegionLayout(contents.name, contents.start, contents.end),))
    total, wr, raws = [], [], []
    stats: RestoreStats | None = None
    for i in range(reps + 1):  # one warm-up
        if raw is not None:
            raws.append(raw())
        live = None
        if live_pages is not None:
            tl = time.perf_counter()
            store = BackupStore(backup)
            maps = read_maps(ident.pid)
            live = livebackup.take(ident.pid, live_pages, maps, store, time.monotonic() + 60)
            if i and live_s is not None:
                live_s.append(time.perf_counter() - tl)
        t0 = time.perf_counter()
        with frozen(ident) as fp:
            fitted = check_fit(fp, layout)
            t1 = time.perf_counter()
            if live is not None:  # as the agent marks what changed since (here: nothing)
                live.mark(empty_pages(), livebackup.own_pages(fp.pid, live.pages), empty_runs())
            stats = write(fitted, [contents], staging=backup, live=live)
            t2 = time.perf_counter()
        t3 = time.perf_counter()
        if live is not None:
            live.close()
        if i:
            total.append(t3 - t0)
            wr.append(t2 - t1)
    assert stats is not None
    raw_stats = Stats.of(raws[1:]) if raws else None
    return Stats.of(total), Stats.of(wr), stats, raw_stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.restore", description=__doc__)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--name", default="restore", help="results file name under bench/results")
    args = p.parse_args(argv)
    size = args.size_mib << 20
    pages = size // PAGE_SIZE
    print(f"starting a target with {args.size_mib} MiB of random resident pages ...", flush=True)
    target = Target(maps=[f"data:{pages}:anon:random:7"], timeout=600)
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"size_bytes": size}
    try:
        target.cmd("threads", count=3)
        m = target.mapping("data")
        ident = ProcessIdentity.of(target.pid)
        cap = capture(ident, [AddressRange(m.addr, m.end)])
        assert cap.pages == pages
        full = RegionContents.from_captured(cap.regions[0], copy=False)  # aliases staging
        runs = np.array([[m.addr, size]], dtype=np.uint64)

        def raw_once() -> float:
            return raw_writev(target.pid, runs, cap.staging, 1).median

        backup = Staging(size)  # as the agent's idle capture staging: prefaulted
        fz, wr, st, raw_st = _in_place(ident, full, args.reps, raw_once, backup)
        assert raw_st is not None and st.bytes_written == size and st.mem_bytes == 0
        assert st.backup_bytes == size and st.backup_fresh_bytes == 0
        raw = raw_st
        raw_gbps = gbps(size, raw.median)
        extra["raw_writev"] = raw.as_dict()
        raw_read = raw_readv(target.pid, runs, 3)
        extra["raw_readv"] = raw_read.as_dict()

        def row(what: str, st: Stats, nbytes: int = size) -> dict[str, Any]:
            return rate_row(what, st, nbytes, raw_gbps)

        rows.append(row("raw process_vm_writev (baseline)", raw))
        rows.append(row("raw process_vm_readv (what the backup reads)", raw_read))
        extra["in_place"] = {"frozen": fz.as_dict(), "write": wr.as_dict()}
        rows.append(row("restore in place: freeze + fit + backup + write + thaw (= frozen)", fz))
        rows.append(row("restore in place: backup + write alone (frozen)", wr))
        assert np.array_equal(target.read("data", 0, 64), full.data[:64])

        live_s: list[float] = []
        allp = np.arange(m.addr // PAGE_SIZE, m.end // PAGE_SIZE, dtype=np.uint64)
        fzl, wrl, stl, raw_l = _in_place(ident, full, args.reps, raw_once, backup, allp, live_s)
        assert raw_l is not None and stl.backup_live_bytes == size and stl.backup_bytes == 0
        extra["in_place_live_backup"] = {
            "frozen": fzl.as_dict(),
            "write": wrl.as_dict(),
            "live_backup": Stats.of(live_s).as_dict(),
            "raw_writev": raw_l.as_dict(),
        }
        rows.append(row("restore in place, backup taken live before: frozen", fzl))
        rows.append(row("the live backup itself (member running, not frozen)", Stats.of(live_s)))
        assert np.array_equal(target.read("data", 0, 64), full.data[:64])

        fzf, wrf, stf, _ = _in_place(ident, full, max(2, args.reps // 2))
        assert stf.backup_fresh_bytes == size
        extra["in_place_fresh_backup"] = {"frozen": fzf.as_dict(), "write": wrf.as_dict()}
        rows.append(row("restore in place, backup into fresh memory: frozen", fzf))

        half = RegionContents(
            full.name, full.start, full.end, full.pages[: pages // 2], full.data[: pages // 2]
        )
        fz2, wr2, st2, _ = _in_place(ident, half, args.reps, backup=backup)
        assert st2.zero_bytes == size // 2
        extra["half_zero"] = {"frozen": fz2.as_dict(), "write": wr2.as_dict()}
        rows.append(row("restore in place, half the pages zero at the cut: write alone", wr2))

        target.cmd("mprotect", name="data", page=0, count=pages, prot="r")
        fz3, wr3, st3, _ = _in_place(ident, full, max(2, args.reps // 2), backup=backup)
        assert st3.mem_bytes == size
        extra["read_only"] = {"frozen": fz3.as_dict(), "write": wr3.as_dict()}
        rows.append(row("restore in place, read-only mapping (/proc/PID/mem): write alone", wr3))
        target.cmd("mprotect", name="data", page=0, count=pages, prot="rw")
        backup.close()

        into = []
        for i in range(args.reps):
            name = f"new{i}"
            target.cmd("mmap", name=name, pages=pages, fill="none")  # never touched
            new = target.mapping(name)
            t0 = time.perf_counter()
            st4 = restore_into(ident, {full.name: (new.addr, size)}, [full])
            into.append(time.perf_counter() - t0)
            assert st4.bytes_written == size
            target.cmd("munmap", name=name, page=0, count=pages)
            gc.collect()
        extra["into_new"] = Stats.of(into).as_dict()
        rows.append(
            row("restore into fresh memory (faults every page): freeze..thaw", Stats.of(into))
        )
        target.assert_running()
    finally:
        target.close()

    ratio = gbps(size, wr.median) / raw_gbps
    notes = [
        f"Restore in place writes at {ratio:.0%} of raw process_vm_writev (backup + write); "
        f"the target is stopped {fz.median:.3f} s per {args.size_mib} MiB (median), "
        f"{fz.max:.3f} s worst of {args.reps}: {fz.median / raw.median:.2f}x raw writev.",
        "All or nothing: every byte the restore overwrites is first read into a backup "
        "(process_vm_readv for exclusively mapped pages, /proc/PID/mem for COW-shared ones), "
        "one 32 MiB step ahead of the writes on a second thread; a failure puts it back. "
        "The backup goes into a prefaulted buffer (the agent uses the member's idle capture "
        "staging); the fresh-memory row shows the cost without one (page faults while frozen).",
        "Frozen window = seize/interrupt of every thread (4), maps read, fit check, plan, "
        "backup, writes, detach. Contents come from one capture (prefaulted staging), as the "
        "agent holds them after downloading.",
        f"Half-zero row: {args.size_mib // 2} MiB from data and {args.size_mib // 2} MiB from "
        "the zero source (a never-written read-only mapping, i.e. the shared zero page): no "
        "memory spent on zeros.",
        "Read-only row: the same bytes through pwritev on /proc/PID/mem (FOLL_FORCE).",
        "Fresh-memory row: restore_into a new never-touched mapping of the same process; "
        "the kernel allocates and zeroes every page while we write it.",
        f"Live-backup rows: the backup read while the target runs (restore/livebackup.py), "
        f"right before the freeze; frozen {fzl.median:.3f} s median, "
        f"{fzl.median / raw_l.median:.2f}x the raw writev interleaved with those runs "
        f"({raw_l.median:.3f} s). Nothing writes in between here; in the agent the tracker "
        "says what did, and those pages are read frozen (bench.restore_cluster).",
        f"{args.reps} repetitions after one warm-up; 4 KiB pages; raw baseline = one "
        f"{args.size_mib} MiB iovec (the same run restore writes) from a prefaulted buffer, "
        "each raw repetition run right before a restore so both see the same load.",
        f"Load average during the run: {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
        "(the machine is shared: 2 CPUs).",
    ]

    def plot(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        labels = [r["what"].replace(": ", ":\n", 1) for r in rows]
        vals = [r["GB/s"] for r in rows]
        ax.barh(range(len(rows)), vals, color=["#777"] + ["#3a7"] * (len(rows) - 1))
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("GB/s (median)")
        ax.set_title(f"restore of {args.size_mib} MiB vs raw process_vm_writev")
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)

    cols = ["what", "MiB", "median s", "min s", "max s", "GB/s", "% of raw"]
    paths = write_results(
        args.name,
        "cpcoord restore vs raw process_vm_writev",
        cols,
        rows,
        notes=notes,
        extra=extra,
        plot=plot,
    )
    for path in paths:
        print(path)
    print((paths[1]).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
