"""`cpcoord diff`: which pages changed between two committed generations of a job."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cpcoord import clientconn
from cpcoord.errors import InvalidArgument
from cpcoord.gen.v1 import coordinator_pb2
from cpcoord.ranges import check_name

NAME = "diff"
HELP = "pages changed between two generations, per member and region"
EPILOG = """\
examples:
  cpcoord diff --job train-42 3 7
  cpcoord diff --job train-42 3 7 --member worker-0 --json

Runs are [first page offset from the region start, page count]."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", required=True, help="job name")
    p.add_argument("a", type=int, metavar="A", help="the older generation")
    p.add_argument("b", type=int, metavar="B", help="the newer generation")
    p.add_argument("--member", action="append", default=[], help="only this member (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")
    clientconn.add_arguments(p)


def collect(responses: Any) -> list[dict[str, Any]]:
    """DiffResponses -> one dict per (member, region), continuation messages merged."""
    out: list[dict[str, Any]] = []
    for r in responses:
        if out and out[-1]["member"] == r.member and out[-1]["region"] == r.region:
            d = out[-1]
        else:
            d = {
                "member": r.member,
                "region": r.region,
                "added": r.added,
                "removed": r.removed,
                "runs": [],
                "pages_changed": 0,
                "bytes_changed": 0,
            }
            out.append(d)
        d["runs"].extend([x.offset, x.count] for x in r.changed)
        d["pages_changed"] += r.pages_changed
        d["bytes_changed"] += r.bytes_changed
    return out


def _runs_text(runs: list[list[int]], limit: int = 8) -> str:
    parts = [f"{o}" if c == 1 else f"{o}-{o + c - 1}" for o, c in runs[:limit]]
    if len(runs) > limit:
        parts.append(f"... ({len(runs) - limit} more runs)")
    return ",".join(parts) or "-"


def run(args: argparse.Namespace) -> int:
    check_name(args.job)
    for m in args.member:
        check_name(m)
    if args.a < 1 or args.b < 1:
        raise InvalidArgument("generations A and B must be >= 1")
    req = coordinator_pb2.DiffRequest(
        job=args.job, from_generation=args.a, to_generation=args.b, members=args.member
    )
    with clientconn.connect(args) as c:
        rows = collect(c.stream("Diff", req))
    total = sum(r["pages_changed"] for r in rows)
    if args.json:
        doc = {
            "job": args.job,
            "from": args.a,
            "to": args.b,
            "regions": rows,
            "pages_changed": total,
            "bytes_changed": sum(r["bytes_changed"] for r in rows),
        }
        print(json.dumps(doc, indent=1))
        return 0
    print(f"{'MEMBER':<16} {'REGION':<16} {'PAGES':>8} {'BYTES':>10} CHANGED")
    for r in rows:
        note = " (added)" if r["added"] else " (removed)" if r["removed"] else ""
        print(
            f"{r['member']:<16} {r['region']:<16} {r['pages_changed']:>8} "
            f"{clientconn.human_bytes(r['bytes_changed']):>10} {_runs_text(r['runs'])}{note}"
        )
    print(f"{total} pages changed from generation {args.a} to {args.b} of {args.job}")
    return 0
