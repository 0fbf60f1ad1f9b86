"""`cpcoord checkpoint`: take one coordinated checkpoint of a job."""

from __future__ import annotations

import argparse
import json

from cpcoord import clientconn
from cpcoord.cli import progress
from cpcoord.errors import GenerationAborted
from cpcoord.gen.v1 import common_pb2, coordinator_pb2
from cpcoord.ranges import check_name

NAME = "checkpoint"
HELP = "checkpoint every member of a job as one generation"
DESCRIPTION = """\
Freeze every member of the job on every node, take the cut when all are frozen, copy each
member's changed pages (all pages with --full) and let it run again, store the pages, and
commit the generation once every member is stored. Either the whole generation commits
or nothing of it is visible. Progress goes to stderr on a terminal; --json prints one
object at the end: generation, state, members, pages_captured, bytes_logical,
bytes_stored_new, frozen_seconds (the longest member downtime), seconds, precopy (per
pre-copied member: live passes, bytes per pass, pages still copied frozen), and more.
Members captured in full are pre-copied by default (--no-precopy: not): their agent
copies them while they run and freezes them only to copy what they wrote since (within
half the freeze timeout; trackers uffd-wp and soft-dirty).
Exits 0 when committed, 52 when the generation aborted (the reason is printed)."""
EPILOG = """\
examples:
  cpcoord checkpoint --job train-42
  cpcoord checkpoint --job train-42 --full --json --lease-ms 5000"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", required=True, help="job name")
    p.add_argument("--full", action="store_true", help="capture every page, not the changes")
    p.add_argument(
        "--lease-ms",
        type=int,
        default=0,
        metavar="MS",
        help="longest time any member stays frozen (default 10000)",
    )
    p.add_argument("--pin", action="store_true", help="pin the generation once committed")
    p.add_argument(
        "--precopy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="copy members captured in full while they run, then freeze them only to copy "
        "what they wrote since (default: on; members with the hash or no tracker never are)",
    )
    p.add_argument(
        "--wait",
        choices=("local", "partner", "store"),
        default="store",
        help="return once the generation reaches this durability level: local (every "
        "member's packs in its node's cache, agents with --cache), partner (also a checked "
        "copy on another node: agents with --partner-listen) or store (in the shared "
        "store; the default, what a checkpoint always meant)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    clientconn.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    check_name(args.job)
    req = coordinator_pb2.CheckpointRequest(
        job=args.job,
        full=args.full,
        lease_ms=args.lease_ms,
        pin=args.pin,
        no_precopy=not args.precopy,
        wait="DURABILITY_LEVEL_" + args.wait.upper(),
    )
    shown = progress.display(f"checkpoint {args.job}", enabled=not args.json)
    events = progress.EventProgress(shown)
    last = None
    try:
        with clientconn.connect(args) as c:
            for ev in c.stream("Checkpoint", req):
                last = ev
                events.event(ev)
    finally:
        shown.close()  # the error message, if any, starts on a line of its own
    last = progress.outcome("Checkpoint", last, shown)
    out = clientconn.generation_dict(last.info)
    out["state"] = progress.kind(last)
    out["precopy"] = events.precopy
    out["data_paths"] = dict(last.info.data_paths)  # member -> "direct" | "coordinator"
    if args.json:
        print(json.dumps(out, indent=1))
    elif out["state"] == "committed":
        print(
            f"generation {out['generation']} of {args.job} committed: {out['members']} members, "
            f"{out['pages_captured']} pages captured, "
            f"{clientconn.human_bytes(out['bytes_logical'])} logical, "
            f"{clientconn.human_bytes(out['bytes_stored_new'])} new on disk, "
            f"frozen {out['frozen_seconds'] * 1000:.1f} ms, {out['seconds']:.2f} s, "
            f"level {out['level']}"
        )
    if out["state"] == "aborted":
        reason = common_pb2.AbortReason.Name(last.reason).removeprefix("ABORT_REASON_").lower()
        raise GenerationAborted(last.generation, args.job, reason, last.detail)
    return 0
