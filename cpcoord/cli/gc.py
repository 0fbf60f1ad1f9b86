"""`cpcoord gc`: apply retention and remove chunks no kept generation references."""

from __future__ import annotations

import argparse
import contextlib
import json

from cpcoord import clientconn
from cpcoord.cli import progress
from cpcoord.errors import InvalidArgument
from cpcoord.gen.v1 import coordinator_pb2

NAME = "gc"
HELP = "apply retention and remove unreferenced data from the store"
EPILOG = """\
examples:
  cpcoord gc                    # keep the coordinator's --keep newest per job (+ pinned)
  cpcoord gc --keep 2 --json
  cpcoord gc --dry-run          # which generations retention would drop"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keep",
        type=int,
        default=0,
        metavar="N",
        help="generations kept per job (default: the coordinator's --keep)",
    )
    p.add_argument("--dry-run", action="store_true", help="report, change nothing")
    p.add_argument("--json", action="store_true", help="print JSON")
    clientconn.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    if args.keep < 0:
        raise InvalidArgument(f"--keep must be >= 1, got {args.keep}")
    req = coordinator_pb2.GarbageCollectRequest(keep=args.keep, dry_run=args.dry_run)
    final = None
    shown = progress.display("gc", enabled=not args.json)
    shown.start(progress.Status("starting", unit=""))
    with contextlib.closing(shown), clientconn.connect(args) as c:
        for ev in c.stream("GarbageCollect", req):
            shown.update(progress.Status(ev.phase, ev.done, ev.total, "", max(0, ev.bytes_freed)))
            if ev.phase == "done":
                final = ev
    out = {
        "dropped": [{"job": d.job, "generation": d.generation} for d in final.dropped]
        if final
        else [],
        "chunks_dropped": final.chunks_dropped if final else 0,
        "packs_deleted": final.packs_deleted if final else 0,
        "packs_repacked": final.packs_repacked if final else 0,
        "bytes_freed": final.bytes_freed if final else 0,
        "orphan_manifests": final.orphan_manifests if final else 0,
        "dry_run": args.dry_run,
    }
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(
            f"{'would drop' if args.dry_run else 'dropped'} {len(out['dropped'])} "
            f"generation(s), {out['chunks_dropped']} chunk(s), {out['packs_deleted']} "
            f"pack(s); freed {clientconn.human_bytes(out['bytes_freed'])}"
        )
    return 0
