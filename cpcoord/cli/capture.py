"""`cpcoord capture`: checkpoint memory of a live local process into an image directory.

No coordinator, no agent: freeze, copy, thaw (nodeagent.capture.process), then write the image
(cpcoord.image). Arguments are checked, the process identified, the parent checked and the
output directory prepared before anything is frozen, so bad input never stops the target.

Incremental chains: every capture arms a tracker in the process (`--tracker`,
default auto) and saves its state next to the image (nodeagent/capture/chain.py); `--parent DIR`
continues from such an image in a later command and stores only the changed pages.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cpcoord.errors import InvalidArgument, NoSuchProcess, TrackerUnavailable
from cpcoord.ranges import PAGE_SIZE, AddressRange, check_name

NAME = "capture"
HELP = "capture memory of a live process into an image directory"
DESCRIPTION = """\
Freeze every thread of a process, copy the pages of the given ranges (or of every
writable mapping) that are present or swapped, thaw it, and write an image directory:
DIR/image.json plus DIR/<member>/<region>.raw. A page is taken only when it lies wholly
inside a range; ranges are half-open START-END, hex (0x7f...) or decimal. Zero pages and
pages not taken are holes in the .raw files. The process is never left stopped."""
EPILOG = """\
examples:
  # every writable mapping of pid 4242 (heap, stacks, anonymous, private file data)
  cpcoord capture --pid 4242 --out /var/tmp/ckpt-1

  # two ranges, member named rank0, a summary as JSON
  cpcoord capture --pid 4242 --range 0x7f3a10000000-0x7f3a10400000 \\
      --range 0x55d0c2a3b000-0x55d0c2a5c000 --name rank0 --out ckpt --json

  # refuse if pid 4242 is no longer the process that started at tick 1234567
  cpcoord capture --pid 4242 --start-time 1234567 --out ckpt

  # an incremental chain: a full image that arms uffd-wp, then only the changed pages
  cpcoord capture --pid 4242 --tracker uffd-wp --out ckpt-1
  cpcoord capture --pid 4242 --parent ckpt-1 --out ckpt-2
  cpcoord image flatten ckpt-2 --out ckpt-2-full

pre-copy (--precopy, the default for a full capture with uffd-wp or soft-dirty, except
an image on tmpfs, which is copied into in place): the tracker is armed in a short
freeze, every page is copied while the process runs (up to 5 passes while the written
set shrinks), then the process is frozen only to copy what was written since. The image
equals memory at that freeze, as without pre-copy.

trackers (--tracker): auto (default: uffd-wp, else soft-dirty, else hash), uffd-wp,
soft-dirty, hash, none (no tracker: every capture is full). `cpcoord check` shows which
work here. A parent can be continued once, by the same process (pid and start time) and
the same tracker; its image must be the last capture of that process.

regions: one per --range, named range-<start>-<end> after the whole pages it covers;
without --range, one per mapping, named heap, stack, anon-<addr>, file-<name>-<addr>,
memfd-<name>-<addr>, shmem-<addr>, sysv-<key>-<addr>."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pid", type=int, required=True, help="process to capture")
    p.add_argument(
        "--range",
        dest="ranges",
        action="append",
        metavar="START-END",
        help="half-open address range; repeat for several (default: every writable mapping)",
    )
    p.add_argument(
        "--name", help="member name in the image and its subdirectory (default: the pid)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="new or empty directory")
    p.add_argument(
        "--start-time",
        type=int,
        metavar="TICKS",
        help="expected start time (field 22 of /proc/PID/stat): detects a reused pid",
    )
    p.add_argument(
        "--tracker",
        metavar="NAME",
        help="auto, uffd-wp, soft-dirty, hash or none (default: auto; the parent's with --parent)",
    )
    p.add_argument(
        "--parent",
        metavar="DIR",
        help="an earlier image of this process: store only the pages changed since",
    )
    p.add_argument(
        "--precopy",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a full capture copies while the process runs, then freezes to copy only "
        "the pages written since (default: on, except with --tracker hash or none and "
        "for an image on tmpfs, which a full capture copies into in place)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    # Imported here: building the parser for any subcommand must not pay for NumPy and
    # ptrace (the CLI imports every subcommand module to build --help).
    import shutil
    from concurrent.futures import Future, ThreadPoolExecutor

    from cpcoord.image_writer import ImageWriter
    from nodeagent.capture.inplace import reserve_in_place
    from nodeagent.proc.procfs import ProcessIdentity
    from nodeagent.trackers import registry

    ranges = [AddressRange.parse(r) for r in args.ranges] if args.ranges else None
    member = check_name(args.name if args.name is not None else str(args.pid))
    tracker = registry.canonical(args.tracker) if args.tracker is not None else None
    out = Path(args.out)
    parent = Path(args.parent) if args.parent is not None else None
    if parent is not None and parent.resolve() == out.resolve():
        raise InvalidArgument("--parent and --out name the same directory")
    if args.pid <= 0:
        raise NoSuchProcess(args.pid)
    if args.start_time is not None:
        ident = ProcessIdentity(args.pid, args.start_time)
        ident.check()
    else:
        ident = ProcessIdentity.of(args.pid)
    from nodeagent.capture import precopy as precopy_mod

    if args.precopy and not precopy_mod.usable(tracker):
        raise InvalidArgument(f"--precopy needs a tracker that sees writes, not {tracker}")
    writer = ImageWriter(out)
    # Default: pre-copy, except a full image on tmpfs. There the frozen copy goes straight
    # into the image's files (~0.13 s frozen per GiB, no write afterwards), while a
    # pre-copy copies into staging and writes it out after: a second copy of everything,
    # ~1.6x the command's time (bench/capture.py). --precopy asks for it anyway.
    want_precopy = (
        args.precopy
        if args.precopy is not None
        else precopy_mod.usable(tracker) and not (parent is None and writer.memory_backed)
    )
    # A full capture onto tmpfs copies straight into the image's files (no staging, no
    # second copy), whose pages are made ready on a second thread while the chain is set
    # up here; an incremental one copies few pages: staging, then write. A pre-copied
    # one copies into staging while the process runs (its layout may change meanwhile).
    into = writer.in_place(member) if parent is None and not want_precopy else None
    pool = ThreadPoolExecutor(1)
    early: Future[None] | None = None
    if into is not None:
        early = pool.submit(reserve_in_place, ident, ranges, into)
    try:
        from cpcoord.image_chain import parent_link
        from nodeagent.capture import chain

        link = chain.begin(ident, member, out, parent, tracker, ranges)
    except BaseException:
        pool.shutdown(wait=True)  # (its error, if any, is capture's to report)
        writer.abort()
        raise
    try:
        try:
            if early is not None:
                early.result()
        finally:
            pool.shutdown(wait=True)
        limits = precopy_mod.Limits() if want_precopy else None
        res = link.tc.capture(into=into, precopy=limits)
        cap = res.capture
        t1 = time.perf_counter()
        incremental = parent is not None
        writer.generation = link.generation
        writer.parent = parent_link(out, parent) if parent is not None else None
        writer.tracker = res.tracker if incremental else None
        writer.add_member(member, ident.pid, ident.start_time)
        for r in cap.regions:
            every = r.all_pages if incremental else None
            if r.in_place:
                writer.add_region_in_place(
                    member,
                    ident.pid,
                    ident.start_time,
                    r.name,
                    r.start,
                    r.end,
                    r.pages,
                    r.zero,
                    all_pages=every,
                )
                continue
            writer.add_region(
                member,
                ident.pid,
                ident.start_time,
                r.name,
                r.start,
                r.end,
                r.pages,
                r.data,
                r.zero,
                all_pages=every,
            )
        chain.save_new_state(link)
        writer.commit()
    except BaseException:
        writer.abort()
        shutil.rmtree(out / chain.STATE_DIR, ignore_errors=True)
        chain.fail(link)
        raise
    chain.finish(link)
    t2 = time.perf_counter()
    all_pages = sum(int(r.all_pages.size) for r in cap.regions)
    summary = {
        "image": str(writer.out),
        "member": member,
        "pid": ident.pid,
        "start_time": ident.start_time,
        "generation": link.generation,
        "parent": writer.parent,
        "tracker": link.tc.tracker_name,
        "incremental": incremental and not res.full,
        "full_reason": res.reason,
        "regions": [
            {
                "name": r.name,
                "start": f"0x{r.start:x}",
                "end": f"0x{r.end:x}",
                "pages": int(r.pages.size),
                "all_pages": int(r.all_pages.size),
                "zero_pages": r.zero_count,
            }
            for r in cap.regions
        ],
        "pages": cap.pages,
        "all_pages": all_pages,
        "zero_pages": cap.zero_pages,
        "changed": {
            "tracker": res.counts.tracker,
            "mappings": res.counts.mappings,
            "appeared": res.counts.appeared,
            "untracked": res.counts.untracked,
            "pending": res.counts.pending,
        },
        "bytes": cap.nbytes,
        "bytes_written": writer.bytes_written,
        "unreadable_pages": cap.unreadable_pages,
        "precopy": cap.precopy.as_json() if cap.precopy is not None else None,
        "frozen_s": round(cap.timings.frozen, 6),
        "capture_s": round(cap.timings.total, 6),
        "write_s": round(t2 - t1, 6),
        "total_s": round(t2 - t0, 6),
    }
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        mib = cap.nbytes / (1 << 20)
        kind = f"incremental over {writer.parent}" if summary["incremental"] else "full"
        print(
            f"captured pid {ident.pid} as member {member}: {len(cap.regions)} regions, "
            f"{cap.pages} of {all_pages} pages stored ({mib:.1f} MiB, {cap.zero_pages} zero), "
            f"page size {PAGE_SIZE}, {kind}"
            + (f" ({res.reason})" if incremental and res.full else "")
        )
        print(
            f"frozen {cap.timings.frozen * 1e3:.1f} ms, capture {cap.timings.total * 1e3:.1f} ms, "
            f"image written in {(t2 - t1) * 1e3:.1f} ms -> {writer.out}; "
            f"tracker {link.tc.tracker_name} armed"
        )
        if cap.precopy is not None:
            pc = cap.precopy
            live = sum(p.nbytes for p in pc.passes) / (1 << 20)
            print(
                f"pre-copy: {pc.rounds} live passes ({live:.1f} MiB), "
                f"{pc.frozen_pages} pages copied frozen"
                + (f" ({pc.fallback})" if pc.fallback else "")
            )
        if cap.unreadable_pages:
            print(f"warning: {cap.unreadable_pages} pages could not be read and are left out")
    if res.arm_error:
        # A named tracker that cannot be armed: the image is complete (full), but the
        # user asked for a chain and must hear that it will not be incremental.
        raise TrackerUnavailable(
            tracker or "auto", f"{res.arm_error}; {writer.out} was written as a full image"
        )
    return 0
