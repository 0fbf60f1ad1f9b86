"""`cpcoord forget NODE`: an operator says a node is gone for good, with its cache.

Its packs that never reached the store are given up and the generations that needed
them become lost (docs/multilevel.md, "Node loss"), exactly as when the node comes back
with another cache, but without waiting for it to come back.
"""

from __future__ import annotations

import argparse
import json

from cpcoord import clientconn
from cpcoord.gen.v1 import coordinator_pb2
from cpcoord.ranges import check_name

NAME = "forget"
HELP = "give up a lost node's cache: its undrained generations become lost"
EPILOG = """\
examples:
  cpcoord forget node-b          # node-b is gone with its cache; stop its agent first
  cpcoord forget node-b --json

A generation at level local (docs/multilevel.md) whose packs are only in node-b's cache
is lost; restore and export without --generation then take the newest readable one.
Refused (exit 55) while node-b's agent is connected."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("node", help="the node name, as its agent said (cpcoord jobs shows them)")
    p.add_argument("--json", action="store_true", help="print JSON")
    clientconn.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    check_name(args.node)
    with clientconn.connect(args) as c:
        r = c.call("ForgetNode", coordinator_pb2.ForgetNodeRequest(node=args.node))
    lost = [clientconn.generation_dict(g) for g in r.lost]
    if args.json:
        out = {"node": args.node, "packs": r.packs, "lost": lost, "members": list(r.members)}
        print(json.dumps(out, indent=1))
        return 0
    what = ", ".join(f"{g['job']} {g['generation']}" for g in lost) or "none"
    print(f"forgot node {args.node}: {r.packs} undrained pack(s); generations lost: {what}")
    if r.members:
        print(
            f"still attached on {args.node} (detach them, or their jobs' checkpoints wait "
            f"for it): {', '.join(r.members)}"
        )
    return 0
