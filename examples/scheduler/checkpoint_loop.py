"""A scheduler's checkpoint loop: checkpoint a job every K seconds, and once more when
the scheduler preempts it (SIGTERM, as a Kubernetes preStop hook or a Slurm
`--signal=TERM@60` would send), then exit 0 once that final generation is committed.

    python examples/scheduler/checkpoint_loop.py --coordinator coord:7070 \\
        --job train-42 --every 300 [--tls-cert C --tls-key K --tls-ca CA | --insecure]

Prints one JSON line per event on stdout ("started", "committed", "aborted", "final"),
for the scheduler's log. A periodic checkpoint that aborts (an agent restarting, the
job busy with a restore) is logged and retried at the next tick; the final one is
retried a few times, then the loop exits with the error's exit code (docs/api.md,
docs/exit-codes.md). Everything goes through `cpcoord.api.Client`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from cpcoord.api import Client, Generation
from cpcoord.errors import CpcoordError, GenerationAborted, JobBusy

FINAL_ATTEMPTS = 3


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "time": round(time.time(), 3), **fields}), flush=True)


def checkpoint(c: Client, job: str, lease_ms: int) -> Generation:
    g = c.checkpoint(job, lease_ms=lease_ms)  # blocks; raises GenerationAborted
    say(
        "committed",
        job=job,
        generation=g.number,
        parent=g.parent,
        pages_captured=g.pages_captured,
        bytes_new=g.bytes_new,
        frozen_seconds=round(g.frozen_seconds, 4),
    )
    return g


def final_checkpoint(c: Client, job: str, lease_ms: int) -> int:
    """The preemption checkpoint: retried on an abort or a busy job, then given up."""
    err: CpcoordError | None = None
    for attempt in range(1, FINAL_ATTEMPTS + 1):
        try:
            g = checkpoint(c, job, lease_ms)
        except (GenerationAborted, JobBusy) as e:
            err = e
            say("aborted", job=job, attempt=attempt, error=str(e))
            time.sleep(min(2.0 * attempt, 5.0))
            continue
        say("final", job=job, generation=g.number)
        return 0
    assert err is not None
    return err.exit_code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coordinator", default=None, help="HOST:PORT (default $CPCOORD_COORDINATOR)")
    p.add_argument("--job", required=True)
    p.add_argument("--every", type=float, default=300.0, metavar="SECONDS")
    p.add_argument("--lease-ms", type=int, default=0, help="max frozen time (0 = default)")
    p.add_argument("--insecure", action="store_true", help="plaintext (loopback tests)")
    for what in ("cert", "key", "ca"):
        p.add_argument(f"--tls-{what}", type=Path, default=None)
    p.add_argument("--token", default=None, help="bearer token (default $CPCOORD_TOKEN)")
    args = p.parse_args(argv)

    preempted = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        # Only a flag: a checkpoint in progress finishes, then the final one runs.
        preempted.set()

    signal.signal(signal.SIGTERM, on_term)
    try:
        with Client(
            args.coordinator,
            insecure=args.insecure,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_ca=args.tls_ca,
            token=args.token,
        ) as c:
            job = c.job(args.job)  # UnknownJob now rather than at the first tick
            say("started", job=job.name, members=[m.name for m in job.members], every=args.every)
            while not preempted.wait(args.every):
                try:
                    checkpoint(c, args.job, args.lease_ms)
                except (GenerationAborted, JobBusy) as e:
                    say("aborted", job=args.job, error=str(e))
            return final_checkpoint(c, args.job, args.lease_ms)
    except CpcoordError as e:
        say("error", error=str(e), exit_code=e.exit_code)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
