"""Progress of a streamed coordinator call (Checkpoint, Restore) for the CLI.

Owns the event kind's short name, the one status line rewritten in place on stderr while
the stream runs, and the check that the stream ended with an outcome.
"""

from __future__ import annotations

import sys
from typing import Any

from cpcoord.errors import RemoteError
from cpcoord.gen.v1 import common_pb2

OUTCOMES = ("committed", "aborted")


def kind(ev: Any) -> str:
    """`PROGRESS_KIND_MEMBER_DONE` -> `member_done`."""
    return str(common_pb2.ProgressKind.Name(ev.kind)).removeprefix("PROGRESS_KIND_").lower()


def show_event(ev: Any) -> None:
    """Rewrite the status line on stderr with this event (caller checks it is a terminal)."""
    who = f" {ev.member}@{ev.node}" if ev.member else ""
    print(
        f"\r[{ev.elapsed_seconds:7.2f}s] generation {ev.generation}: {kind(ev)}"
        f"{who} ({ev.members_done}/{ev.members_total})\x1b[K",
        end="",
        file=sys.stderr,
        flush=True,
    )


def outcome(rpc: str, last: Any, shown: bool) -> Any:
    """End the status line (when one was shown) and return the last event, which must
    be an outcome: a stream cut before it is a RemoteError, never a silent success."""
    if shown:
        print(file=sys.stderr)
    if last is None or kind(last) not in OUTCOMES:
        raise RemoteError(rpc, "UNKNOWN", "the stream ended before the outcome")
    return last
