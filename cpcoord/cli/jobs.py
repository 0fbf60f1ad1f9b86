"""`cpcoord jobs`: jobs with their members, nodes and last generation."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cpcoord import clientconn
from cpcoord.gen.v1 import coordinator_pb2

NAME = "jobs"
HELP = "list jobs, their members and last generation"
EPILOG = """\
examples:
  cpcoord jobs --coordinator 10.0.0.5:7420
  cpcoord jobs --job train-42 --json"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", default="", help="only this job")
    p.add_argument("--json", action="store_true", help="print JSON")
    clientconn.add_arguments(p)


def member_dict(m: Any) -> dict[str, Any]:
    health = coordinator_pb2.MemberHealth.Name(m.health).removeprefix("MEMBER_HEALTH_").lower()
    return {
        "name": m.name,
        "node": m.node,
        "pid": m.process.pid,
        "start_time": m.process.start_time,
        "health": health,
        "detail": m.detail,
        "tracker": m.tracker,
        "group": m.group,
        "regions": [{"name": r.name, "start": hex(r.start), "end": hex(r.end)} for r in m.regions],
    }


def job_dict(j: Any) -> dict[str, Any]:
    return {
        "job": j.name,
        "members": [member_dict(m) for m in j.members],
        "in_flight": j.in_flight or None,
        "generations": j.generations,
        "last_committed": (
            clientconn.generation_dict(j.last_committed) if j.HasField("last_committed") else None
        ),
    }


def run(args: argparse.Namespace) -> int:
    with clientconn.connect(args) as c:
        resp = c.call("ListJobs", coordinator_pb2.ListJobsRequest(job=args.job))
    jobs = [job_dict(j) for j in resp.jobs]
    if args.json:
        print(json.dumps({"jobs": jobs}, indent=1))
        return 0
    print(f"{'JOB':<20} {'MEMBER':<16} {'NODE':<14} {'PID':>8} {'HEALTH':<20} LAST")
    for j in jobs:
        last = j["last_committed"]["generation"] if j["last_committed"] else "-"
        for m in j["members"] or [None]:
            if m is None:
                print(f"{j['job']:<20} {'-':<16} {'-':<14} {'-':>8} {'-':<20} {last}")
                continue
            print(
                f"{j['job']:<20} {m['name']:<16} {m['node']:<14} {m['pid']:>8} "
                f"{m['health']:<20} {last}"
            )
    return 0
