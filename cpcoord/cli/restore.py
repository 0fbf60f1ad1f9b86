"""`cpcoord restore`: roll a job's live members back to a generation, or write one
member's pages into a new process."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cpcoord import clientconn
from cpcoord.cli import progress
from cpcoord.errors import InvalidArgument, RestoreAborted, RestoreRefusedKernelState
from cpcoord.gen.v1 import common_pb2, coordinator_pb2, types_pb2
from cpcoord.ranges import check_name

NAME = "restore"
HELP = "roll a job back to a generation, or restore a member into a new process"
DESCRIPTION = """\
In place (default): freeze every member of the job (or those given with --member), check
that each still maps its regions with the same sizes, write every page of the generation
(zero pages and pages written since included), then let all run again. If any member does
not fit, nothing is written anywhere and the error names the member and region. A
whole-memory member whose kernel side changed since the cut (an fd opened or closed, a
file offset moved, bytes unread in a pipe or socket that differ) is refused with the fd
and what differs, unless --force (docs/restore.md: what a rollback covers).
With --into PID: write the pages of one --member into the process PID (a restarted
member), at the addresses of the cut or where --region NAME=START-END says.
Exits 0 when done, 59 when the restore aborted (the reason is printed)."""
EPILOG = """\
examples:
  cpcoord restore --job train-42                     # the newest committed generation
  cpcoord restore --job train-42 --generation 7 --json
  cpcoord restore --job train-42 --generation 7 --force   # even if fds/pipes changed
  cpcoord restore --job train-42 --generation 7 --member rank-0 --into 5151
  cpcoord restore --job train-42 --member rank-0 --into 5151 \\
      --region state=0x7f3a10000000-0x7f3a10400000"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", required=True, help="job name")
    p.add_argument(
        "--generation", type=int, default=0, metavar="N", help="default: the newest committed"
    )
    p.add_argument(
        "--member",
        action="append",
        default=[],
        help="in place: only this member (repeatable); with --into: the member to take",
    )
    p.add_argument("--into", type=int, default=0, metavar="PID", help="restore into this process")
    p.add_argument("--node", default="", help="with --into: PID's node (default: the member's)")
    p.add_argument(
        "--region",
        dest="regions",
        action="append",
        default=[],
        metavar="NAME=START-END",
        help="with --into: where region NAME lives in PID now (repeatable)",
    )
    p.add_argument(
        "--lease-ms", type=int, default=0, metavar="MS", help="longest frozen time (default 10000)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="in place: roll back even where the kernel side (open fds, file offsets, pipe "
        "and socket queues) changed since the cut, which a rollback does not undo",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    clientconn.add_arguments(p)


def _region(text: str) -> types_pb2.Region:
    try:
        name, rng = text.split("=", 1)
        a, b = rng.split("-", 1)
        start, end = int(a, 0), int(b, 0)
    except ValueError:
        raise InvalidArgument(f"--region {text!r}: expected NAME=START-END") from None
    check_name(name)
    return types_pb2.Region(name=name, start=start, end=end)


def request(args: argparse.Namespace) -> coordinator_pb2.RestoreRequest:
    check_name(args.job)
    for m in args.member:
        check_name(m)
    if args.generation < 0:
        raise InvalidArgument(f"--generation must be >= 1, got {args.generation}")
    req = coordinator_pb2.RestoreRequest(
        job=args.job,
        generation=args.generation,
        members=args.member,
        lease_ms=args.lease_ms,
        force=args.force,
    )
    if args.into:
        if len(args.member) != 1:
            raise InvalidArgument("--into needs exactly one --member (whose pages to write)")
        if args.node:
            check_name(args.node)
        if args.force:
            raise InvalidArgument("--force goes with a restore in place, not --into")
        req.ClearField("members")
        req.into.CopyFrom(
            coordinator_pb2.RestoreTarget(
                member=args.member[0],
                process=types_pb2.ProcessIdentity(pid=args.into),
                node=args.node,
                regions=[_region(r) for r in args.regions],
            )
        )
    elif args.regions or args.node:
        raise InvalidArgument("--region and --node go with --into")
    return req


def run(args: argparse.Namespace) -> int:
    req = request(args)
    shown = progress.display(f"restore {args.job}", enabled=not args.json)
    events = progress.EventProgress(shown)
    last = None
    restored: list[dict[str, Any]] = []
    try:
        with clientconn.connect(args) as c:
            if not req.generation:
                req.generation = clientconn.default_generation(c, args.job, "restoring")
            for ev in c.stream("Restore", req):
                last = ev
                if progress.kind(ev) == "member_restored":
                    restored.append(
                        {
                            "member": ev.member,
                            "node": ev.node,
                            "pages": ev.stats.pages,
                            "bytes": ev.stats.bytes_logical,
                            "frozen_seconds": round(ev.stats.frozen_seconds, 6),
                            "pages_written": ev.stats.pages_written,
                            "bytes_prefetched": ev.stats.bytes_prefetched,
                            "read_path": "direct" if ev.stats.read_direct else "coordinator",
                            "kernel_warnings": list(ev.stats.kernel_warnings),
                        }
                    )
                events.event(ev)
    finally:
        shown.close()  # the error message, if any, starts on a line of its own
    last = progress.outcome("Restore", last, shown)
    state = "restored" if progress.kind(last) == "committed" else "aborted"
    reason = common_pb2.AbortReason.Name(last.reason).removeprefix("ABORT_REASON_").lower()
    out = {
        "job": args.job,
        "generation": last.generation,
        "state": state,
        "into": args.into or None,
        "members": restored,
        "pages": sum(m["pages"] for m in restored),
        "seconds": last.elapsed_seconds,
        "reason": reason if state == "aborted" else "",
        "detail": last.detail,
    }
    if args.json:
        print(json.dumps(out, indent=1))
    elif state == "restored":
        where = f" into pid {args.into}" if args.into else ""
        print(
            f"generation {last.generation} of {args.job} restored{where}: "
            f"{len(restored)} members, {out['pages']} pages, {last.elapsed_seconds:.2f} s"
        )
        for m in restored:  # what the rollback could not take back (docs/restore.md)
            for w in m["kernel_warnings"]:
                print(f"warning: member {m['member']}: kernel side differs from the cut: {w}")
    if state == "aborted" and reason == "kernel_state":
        raise RestoreRefusedKernelState(last.generation, args.job, last.detail)
    if state == "aborted":
        raise RestoreAborted(last.generation, args.job, reason, last.detail)
    return 0
