"""`cpcoord verify`: re-read and re-hash every chunk of every committed generation."""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

from cpcoord import clientconn
from cpcoord.cli import progress
from cpcoord.errors import VerifyFailed
from cpcoord.gen.v1 import coordinator_pb2

NAME = "verify"
HELP = "re-read and re-hash the store; report damage by generation and member"
EPILOG = """\
examples:
  cpcoord verify
  cpcoord verify --job train-42 --json
exit code 79 when damage is found."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", default="", help="only this job")
    p.add_argument("--generation", type=int, default=0, help="only this generation")
    p.add_argument("--json", action="store_true", help="print JSON")
    clientconn.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    req = coordinator_pb2.VerifyRequest(job=args.job, generation=args.generation)
    damage = []
    final = None
    shown = progress.display("verify", enabled=not args.json)
    shown.start(progress.Status("verifying", unit="chunks"))
    with contextlib.closing(shown), clientconn.connect(args) as c:
        for ev in c.stream("Verify", req):
            phase = "done" if ev.final else "verifying"
            shown.update(
                progress.Status(phase, ev.chunks_checked, ev.chunks_total, "chunks", ev.bytes_read)
            )
            damage += [
                {
                    "job": d.job,
                    "generation": d.generation,
                    "member": d.member,
                    "chunks": d.chunks,
                    "first_chunk": d.first_chunk,
                    "why": d.why,
                }
                for d in ev.damage
            ]
            if ev.final:
                final = ev
    out: dict[str, Any] = {
        "ok": bool(final and final.ok),
        "generations": final.generations if final else 0,
        "chunks": final.chunks_checked if final else 0,
        "bytes_read": final.bytes_read if final else 0,
        "damage": damage,
        "damaged_packs": list(final.damaged_packs) if final else [],
    }
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(
            f"checked {out['generations']} generations, {out['chunks']} chunks, "
            f"{clientconn.human_bytes(out['bytes_read'])} read"
        )
        for d in damage:
            print(
                f"DAMAGE {d['job']} generation {d['generation']} member {d['member']}: "
                f"{d['chunks']} chunk(s), {d['why']}"
            )
        for p in out["damaged_packs"]:
            print(f"DAMAGED PACK {p}")
    if not out["ok"]:
        raise VerifyFailed(f"{len(damage)} damaged member(s), {len(out['damaged_packs'])} pack(s)")
    return 0
