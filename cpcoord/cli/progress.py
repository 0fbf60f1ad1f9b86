"""Progress of long CLI operations (checkpoint, restore, export, verify, gc).

Owns the display on stderr: on a terminal one bar line redrawn in place (`\\r` ... `ESC[K`,
at most ~10 times a second, always on a phase change) showing phase, units done (members,
chunks), bytes and rate; elsewhere (a pipe, a log file, TERM=dumb) plain lines, one per
phase change and at most one every few seconds otherwise, never a `\\r` or an escape.
Also the short name of a streamed event's kind and the check that a Checkpoint or Restore
stream ended with an outcome.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from cpcoord.errors import RemoteError
from cpcoord.gen.v1 import common_pb2
from cpcoord.humanize import format_bytes, format_seconds

OUTCOMES = ("committed", "aborted")
REDRAW_S = 0.1  # terminal: redraws at most this often (phase changes always redraw)
LINE_S = 5.0  # plain lines: at most this often within one phase


def kind(ev: Any) -> str:
    """`PROGRESS_KIND_MEMBER_DONE` -> `member_done`."""
    return str(common_pb2.ProgressKind.Name(ev.kind)).removeprefix("PROGRESS_KIND_").lower()


@dataclass(frozen=True)
class Status:
    """Where an operation is: its phase, units done of total (0 = unknown), bytes moved."""

    phase: str
    done: int = 0
    total: int = 0
    unit: str = "members"
    nbytes: int = 0
    note: str = ""  # shown after the numbers (e.g. what pre-copy did)


class Display(Protocol):
    def start(self, st: Status) -> None:
        """What shows while waiting for the first event: drawn on a terminal, not
        printed as a line (a log gains nothing, and a failure stays one line)."""

    def update(self, st: Status) -> None: ...

    def close(self) -> None: ...


def _numbers(st: Status, seconds: float, bar_width: int = 0) -> list[str]:
    """Counts (with a bar of `bar_width` when the total is known), bytes, rate, time."""
    out = []
    if st.total:
        if bar_width:
            fill = int(min(1.0, st.done / st.total) * bar_width)
            out.append("[" + "#" * fill + "-" * (bar_width - fill) + "]")
        out.append(f"{st.done}/{st.total} {st.unit}".rstrip())
    elif st.done or st.unit:
        out.append(f"{st.done} {st.unit}".rstrip())
    out.append(format_bytes(st.nbytes))
    # Below a millisecond the clock's resolution and scheduling noise make any rate
    # meaningless; above it a short operation still deserves its rate.
    if st.nbytes > 0 and seconds >= 0.001:
        out.append(f"{format_bytes(int(st.nbytes / seconds))}/s")
    out.append(format_seconds(seconds))
    return out


class Silent:
    """--json, or asked for nothing: no progress output."""

    def start(self, st: Status) -> None:
        del st

    def update(self, st: Status) -> None:
        del st

    def close(self) -> None:
        pass


class _Shown:
    """What a visible display starts with: its title, stream and clock, the start time,
    and the last status it was given."""

    def __init__(
        self, title: str, out: TextIO, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.title, self.out, self.clock = title, out, clock
        self.t0 = clock()
        self.last: Status | None = None


class Bar(_Shown):
    """One line on a terminal, rewritten in place."""

    WIDTH = 20
    drawn_at = -1e9

    def _columns(self) -> int:
        try:
            cols = os.get_terminal_size(self.out.fileno()).columns
        except (OSError, ValueError):
            cols = 0
        return cols or shutil.get_terminal_size().columns or 80

    def render(self, st: Status, elapsed: float) -> str:
        note = f"  {st.note}" if st.note else ""
        return f"{self.title} {st.phase:<10} " + "  ".join(_numbers(st, elapsed, self.WIDTH)) + note

    def _draw(self, st: Status) -> None:
        now = self.clock()
        line = self.render(st, now - self.t0)[: max(10, self._columns() - 1)]
        # \r back to column 0, the line, ESC[K clears what a longer previous line left.
        self.out.write(f"\r{line}\x1b[K")
        self.out.flush()
        self.drawn_at = now

    def start(self, st: Status) -> None:
        self.update(st)

    def update(self, st: Status) -> None:
        phase_changed = self.last is None or self.last.phase != st.phase
        self.last = st
        if phase_changed or self.clock() - self.drawn_at >= REDRAW_S:
            self._draw(st)

    def close(self) -> None:
        if self.last is not None:
            self._draw(self.last)  # the final numbers, whatever the throttle skipped
            self.out.write("\n")
            self.out.flush()
            self.last = None  # closing twice (an error path) draws nothing more


class Lines(_Shown):
    """Plain lines for logs and pipes: one per phase, and one every LINE_S within one."""

    printed: Status | None = None
    printed_at = -1e9

    def _print(self, st: Status) -> None:
        elapsed = self.clock() - self.t0
        note = f", {st.note}" if st.note else ""
        self.out.write(
            f"{self.title}: {st.phase}, " + ", ".join(_numbers(st, elapsed)) + note + "\n"
        )
        self.out.flush()
        self.printed, self.printed_at = st, self.clock()

    def start(self, st: Status) -> None:
        del st

    def update(self, st: Status) -> None:
        self.last = st
        if (
            self.printed is None
            or self.printed.phase != st.phase
            or (self.clock() - self.printed_at >= LINE_S and st != self.printed)
        ):
            self._print(st)

    def close(self) -> None:
        if self.last is not None and self.last != self.printed:
            self._print(self.last)


def is_terminal(out: TextIO) -> bool:
    return out.isatty() and os.environ.get("TERM", "") != "dumb"


def display(title: str, enabled: bool = True, out: TextIO | None = None) -> Display:
    """A bar on a terminal, plain lines elsewhere, nothing when not enabled (--json)."""
    out = sys.stderr if out is None else out
    if not enabled:
        return Silent()
    return Bar(title, out) if is_terminal(out) else Lines(title, out)


# -- Checkpoint and Restore streams ------------------------------------------------------

PHASES = {
    "freeze_sent": "freezing",
    "barrier": "cut",
    "member_staged": "copying",
    "member_uploaded": "uploading",
    "member_restored": "writing",
    "captured": "committing",
    "committed": "committed",
    "aborted": "aborted",
    "committed_local": "draining",
}


class EventProgress:
    """Turns CheckpointEvents/RestoreEvents into Statuses: the phase from the kind, the
    members done of total, and bytes as the sum over members of the latest byte count
    each member reported."""

    def __init__(self, out: Display) -> None:
        self.out = out
        self.member_bytes: dict[tuple[str, str], int] = {}
        # Pre-copied members (checkpoint): live passes, bytes per pass, pages frozen.
        self.precopy: dict[str, dict[str, Any]] = {}

    def event(self, ev: Any) -> None:
        k = kind(ev)
        if ev.member and ev.HasField("stats"):
            key = (ev.node, ev.member)
            self.member_bytes[key] = max(self.member_bytes.get(key, 0), ev.stats.bytes_logical)
            if getattr(ev.stats, "precopy_rounds", 0):
                self.precopy[ev.member] = {
                    "rounds": ev.stats.precopy_rounds,
                    "bytes": list(ev.stats.precopy_bytes),
                    "frozen_pages": ev.stats.precopy_frozen_pages,
                }
        note = ""
        if self.precopy:
            rounds = max(p["rounds"] for p in self.precopy.values())
            note = f"pre-copied {len(self.precopy)} members in <= {rounds} passes"
        self.out.update(
            Status(
                PHASES.get(k, k),
                ev.members_done,
                ev.members_total,
                "members",
                sum(self.member_bytes.values()),
                note,
            )
        )


def show_event(ev: Any) -> None:
    """Rewrite the status line on stderr with this event (caller checks it is a terminal).
    Kept for callers of the first version; new code uses `display` and `EventProgress`."""
    who = f" {ev.member}@{ev.node}" if ev.member else ""
    print(
        f"\r[{ev.elapsed_seconds:7.2f}s] generation {ev.generation}: {kind(ev)}"
        f"{who} ({ev.members_done}/{ev.members_total})\x1b[K",
        end="",
        file=sys.stderr,
        flush=True,
    )


def outcome(rpc: str, last: Any, shown: bool | Display) -> Any:
    """End the progress display and return the last event, which must be an outcome: a
    stream cut before it is a RemoteError, never a silent success. `shown` is the Display
    (closed here), or for old callers whether a `show_event` line needs ending."""
    if isinstance(shown, bool):
        if shown:
            print(file=sys.stderr)
    else:
        shown.close()
    if last is None or kind(last) not in OUTCOMES:
        raise RemoteError(rpc, "UNKNOWN", "the stream ended before the outcome")
    return last
