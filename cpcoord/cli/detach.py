"""`cpcoord detach`: remove a member from a job (its generations stay); the root of a
tree (`attach --tree`) takes its descendants with it."""

from __future__ import annotations

import argparse

from cpcoord import clientconn
from cpcoord.gen.v1 import coordinator_pb2
from cpcoord.ranges import check_name

NAME = "detach"
HELP = "remove a member (a tree's root: the whole tree) from a job"
EPILOG = """\
example:
  cpcoord detach --job train-42 --member rank-3"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", required=True, help="job name")
    p.add_argument("--member", required=True, help="member name")
    clientconn.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    check_name(args.job)
    check_name(args.member)
    with clientconn.connect(args) as c:
        c.call(
            "DetachMember", coordinator_pb2.DetachMemberRequest(job=args.job, member=args.member)
        )
    print(f"detached {args.job}/{args.member}")
    return 0
