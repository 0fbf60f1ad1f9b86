"""`cpcoord generations`: list a job's generations; delete, pin or unpin one."""

from __future__ import annotations

import argparse
import json

from cpcoord import clientconn
from cpcoord.gen.v1 import coordinator_pb2
from cpcoord.ranges import check_name

NAME = "generations"
HELP = "list, delete, pin or unpin a job's generations"
EPILOG = """\
examples:
  cpcoord generations --job train-42
  cpcoord generations --job train-42 --all --json     # aborted ones too
  cpcoord generations --job train-42 --pin 7          # keep 7 whatever retention says
  cpcoord generations --job train-42 --delete 3"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", required=True, help="job name")
    p.add_argument("--all", action="store_true", help="also aborted generations")
    p.add_argument("--limit", type=int, default=0, help="at most N, newest first")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--delete", type=int, metavar="N", help="delete generation N")
    act.add_argument("--pin", type=int, metavar="N", help="pin generation N")
    act.add_argument("--unpin", type=int, metavar="N", help="unpin generation N")
    p.add_argument("--force", action="store_true", help="with --delete: even if pinned")
    p.add_argument("--json", action="store_true", help="print JSON")
    clientconn.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    check_name(args.job)
    with clientconn.connect(args) as c:
        if args.delete is not None:
            c.call(
                "DeleteGeneration",
                coordinator_pb2.DeleteGenerationRequest(
                    job=args.job, generation=args.delete, force=args.force
                ),
            )
            print(f"deleted generation {args.delete} of {args.job}")
            return 0
        if args.pin is not None or args.unpin is not None:
            n = args.pin if args.pin is not None else args.unpin
            r = c.call(
                "PinGeneration",
                coordinator_pb2.PinGenerationRequest(
                    job=args.job, generation=n, pinned=args.pin is not None
                ),
            )
            d = clientconn.generation_dict(r.info)
            print(
                json.dumps(d, indent=1)
                if args.json
                else f"generation {n} of {args.job} {'pinned' if d['pinned'] else 'unpinned'}"
            )
            return 0
        resp = c.call(
            "ListGenerations",
            coordinator_pb2.ListGenerationsRequest(
                job=args.job, include_aborted=args.all, limit=args.limit
            ),
        )
    rows = [clientconn.generation_dict(g) for g in resp.generations]
    if args.json:
        print(json.dumps({"job": args.job, "generations": rows}, indent=1))
        return 0
    print(
        f"{'GEN':>5} {'PARENT':>6} {'STATE':<10} {'LEVEL':<7} {'PAGES':>10} {'LOGICAL':>11} "
        f"{'NEW':>11} PIN"
    )
    for r in rows:
        level = r["level"] if r["state"] == "committed" else "-"
        level = "lost" if r["lost"] else level
        why = f"lost: {r['lost']}" if r["lost"] else r["reason"]
        print(
            f"{r['generation']:>5} {r['parent'] or '-':>6} {r['state']:<10} {level:<7} "
            f"{r['pages']:>10} "
            f"{clientconn.human_bytes(r['bytes_logical']):>11} "
            f"{clientconn.human_bytes(r['bytes_stored_new']):>11} "
            f"{'yes' if r['pinned'] else ''} {why}"
        )
    return 0
