"""`cpcoord attach`: add a process to a job as a named member."""

from __future__ import annotations

import argparse
import json

from cpcoord import clientconn
from cpcoord.cli.jobs import member_dict
from cpcoord.gen.v1 import coordinator_pb2, types_pb2
from cpcoord.ranges import AddressRange, check_name

NAME = "attach"
HELP = "attach a process to a job as a member"
DESCRIPTION = """\
Add process PID, running on NODE (the machine of a connected agent), to job J as member
NAME; the job is created with its first member. Regions default to every writable private
mapping; --range START-END (repeatable) names explicit half-open ranges instead, each
narrowed to the whole pages it covers and named range-<start>-<end>. The agent checks the
process and the ranges before anything is recorded.

--tree attaches PID and every descendant as one group: each descendant is member
NAME.<pid>; the group is frozen and thawed as one, memory its processes share is stored
once (by one of them), and descendants forked later join at the next checkpoint."""
EPILOG = """\
examples:
  cpcoord attach --job train-42 --member rank-0 --pid 4242 --node gpu-1
  cpcoord attach --job web --member nginx --pid 900 --tree
  cpcoord attach --job train-42 --member rank-1 --pid 777 --node gpu-2 \\
      --range 0x7f3a10000000-0x7f3a10400000"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", required=True, help="job name")
    p.add_argument("--member", required=True, help="member name, unique in the job")
    p.add_argument("--pid", type=int, required=True, help="the process")
    p.add_argument(
        "--start-time",
        type=int,
        default=0,
        metavar="TICKS",
        help="refuse unless pid started at this tick (default: as now)",
    )
    p.add_argument("--node", default="", help="its node (default: the only connected agent)")
    add_range_argument(p, "explicit region; repeatable")
    p.add_argument("--tracker", default="", help="preferred tracker backend")
    p.add_argument(
        "--tree", action="store_true", help="the process and its descendants, as one group"
    )
    p.add_argument("--json", action="store_true", help="print the member as JSON")
    clientconn.add_arguments(p)


def add_range_argument(p: argparse.ArgumentParser, help: str) -> None:
    """`--range START-END` (repeatable): the member's explicit regions."""
    p.add_argument(
        "--range", dest="ranges", action="append", default=[], metavar="START-END", help=help
    )


def range_regions(ranges: list[str]) -> list[types_pb2.Region]:
    """The regions of `--range` arguments, each named after its page range."""
    out = []
    for text in ranges:
        rng = AddressRange.parse(text)
        name = f"range-{rng.page_start:x}-{rng.page_end:x}"
        out.append(types_pb2.Region(name=name, start=rng.page_start, end=rng.page_end))
    return out


def attach_request(
    args: argparse.Namespace, regions: list[types_pb2.Region], pid: int, start_time: int = 0
) -> coordinator_pb2.AttachMemberRequest:
    """The AttachMember request of --job, --member, --node and --tracker."""
    return coordinator_pb2.AttachMemberRequest(
        job=args.job,
        member=args.member,
        node=args.node,
        regions=regions,
        tracker=args.tracker,
        process=types_pb2.ProcessIdentity(pid=pid, start_time=start_time),
        tree=bool(getattr(args, "tree", False)),
    )


def run(args: argparse.Namespace) -> int:
    check_name(args.job)
    check_name(args.member)
    req = attach_request(args, range_regions(args.ranges), args.pid, args.start_time)
    with clientconn.connect(args) as c:
        resp = c.call("AttachMember", req)
    m = member_dict(resp.member)
    if args.json:
        print(json.dumps(m, indent=1))
    else:
        print(
            f"attached {args.job}/{m['name']}: pid {m['pid']} on {m['node']}, "
            f"{len(m['regions'])} region(s)"
        )
    return 0
