"""`cpcoord export`: write a committed generation as an image directory.

The image format is that of `cpcoord capture` (cpcoord/image.py), with full pages,
flattened: every page the generation holds for a member, whichever generation captured
it, so the directory stands alone (no parent, no all_pages). Pages are read from the
store here when it opens here (`--data-path`, cpcoord/readpath.py), else come
with the coordinator's ReadGeneration stream; either way every chunk is re-hashed
against its id before it is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cpcoord import clientconn, readpath
from cpcoord.cli import progress
from cpcoord.errors import ImageInvalid
from cpcoord.gen.v1 import coordinator_pb2
from cpcoord.image_writer import ImageWriter
from cpcoord.ranges import PAGE_SIZE, check_name

NAME = "export"
HELP = "write a committed generation as an image directory"
EPILOG = """\
examples:
  cpcoord export --job train-42 --out /tmp/train-42-latest
  cpcoord export --job train-42 --generation 7 --member rank-0 --out /tmp/g7-rank0
  cpcoord export --job train-42 --data-path direct --store-key-file key --out /tmp/t42"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", required=True, help="job name")
    p.add_argument("--generation", type=int, default=0, help="generation (default: latest)")
    p.add_argument(
        "--member", dest="members", action="append", default=[], help="only this member; repeatable"
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="new or empty directory")
    p.add_argument("--json", action="store_true", help="print a summary as JSON")
    p.add_argument(
        "--data-path",
        choices=readpath.MODES,
        default="auto",
        help="read packs from the store here (direct), through the coordinator, or direct "
        "when the store opens here (auto, default)",
    )
    p.add_argument(
        "--store-key-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="the store's data key, for a direct read of a sealed store "
        "(default: $CPCOORD_STORE_KEY)",
    )
    clientconn.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    check_name(args.job)
    for m in args.members:
        check_name(m)
    with clientconn.connect(args) as c:
        number = args.generation or clientconn.default_generation(c, args.job, "exporting")
        gen = c.call(
            "GetGeneration",
            coordinator_pb2.GetGenerationRequest(job=args.job, generation=number),
        )
        n = gen.info.number
        jobs = c.call("ListJobs", coordinator_pb2.ListJobsRequest(job=args.job))
        procs = {
            m.name: (m.process.pid, m.process.start_time) for j in jobs.jobs for m in j.members
        }
        # Where to read from before the image directory exists: a refusal leaves nothing.
        store = readpath.choose(c.call, args.data_path, args.store_key_file, _warn)
        try:
            writer = ImageWriter(args.out, job=args.job, generation=n)
        except BaseException:
            if store is not None:
                store.close()
            raise
        pages = members = 0
        total = len(args.members) or gen.info.members
        shown = progress.display(f"export {args.job}", enabled=not args.json)
        shown.start(progress.Status("reading", 0, total))
        reads = readpath.Reads()
        try:
            req = coordinator_pb2.ReadGenerationRequest(
                job=args.job, generation=n, members=args.members
            )
            for mp in readpath.members(c.stream, req, store, args.data_path, reads, _warn):
                if mp.header.page_size != PAGE_SIZE:
                    raise ImageInvalid(args.out, f"page size {mp.header.page_size} differs")
                pid, start = procs.get(mp.name, (0, 0))
                writer.add_member(mp.name, pid, start)
                for r in mp.regions:
                    writer.add_region(
                        mp.name, pid, start, r.name, r.start, r.end, r.pages, r.data, r.zero
                    )
                    pages += r.pages.size
                members += 1
                shown.update(progress.Status("reading", members, total, nbytes=pages * PAGE_SIZE))
            shown.update(progress.Status("writing", members, total, nbytes=pages * PAGE_SIZE))
            image = writer.commit()
            shown.update(progress.Status("done", members, total, nbytes=pages * PAGE_SIZE))
        except BaseException:
            writer.abort()
            raise
        finally:
            shown.close()
            if store is not None:
                store.close()
    out = {
        "job": args.job,
        "generation": n,
        "members": members,
        "pages": pages,
        "out": str(image.path),
        "bytes_written": writer.bytes_written,
        # Members read from the store here / through the coordinator (--data-path).
        "read_path": {"direct": reads.direct, "coordinator": reads.coordinator},
        "bytes_read_direct": reads.direct_bytes,
    }
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(
            f"exported generation {n} of {args.job}: {members} member(s), {pages} pages "
            f"-> {image.path}"
        )
    return 0


def _warn(text: str) -> None:
    print(f"cpcoord export: {text}", file=sys.stderr)
