"""What the Client's streamed calls come to: the final event of a checkpoint or restore
turned into its result (raising the error the scheduler expects), and the ends of the
gc and verify streams. A stream that ends without its final event is StreamIncomplete.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cpcoord.api import convert
from cpcoord.api import values as v
from cpcoord.errors import (
    GenerationAborted,
    RestoreAborted,
    RestoreRefusedKernelState,
    StreamIncomplete,
)


def checkpoint(job: str, last: v.ProgressEvent | None, check: bool) -> v.Generation:
    """The generation a checkpoint's last event names; GenerationAborted if it aborted
    and `check`."""
    if last is None or not last.final:
        raise StreamIncomplete("Checkpoint")
    committed = last.kind is v.ProgressKind.COMMITTED
    if check and not committed:
        raise GenerationAborted(last.generation, job, last.reason.value, last.detail)
    if last.info is not None:
        return last.info
    st = v.GenerationState.COMMITTED if committed else v.GenerationState.ABORTED
    return v.Generation(job, last.generation, None, st, last.reason, last.detail)


def restore(job: str, evs: list[v.ProgressEvent], check: bool) -> v.RestoreResult:
    """A restore's events as its result; RestoreRefusedKernelState or RestoreAborted if it
    aborted and `check`."""
    if not evs or not evs[-1].final:
        raise StreamIncomplete("Restore")
    last = evs[-1]
    ok = last.kind is v.ProgressKind.COMMITTED
    if check and not ok and last.reason is v.AbortReason.KERNEL_STATE:
        raise RestoreRefusedKernelState(last.generation, job, last.detail)
    if check and not ok:
        raise RestoreAborted(last.generation, job, last.reason.value, last.detail)
    done = tuple(e.member for e in evs if e.kind is v.ProgressKind.MEMBER_RESTORED)
    return v.RestoreResult(job, last.generation, ok, last.reason, last.detail, done, tuple(evs))


def gc(events: Iterable[Any]) -> v.GcReport:
    """The report of a GarbageCollect stream (its `done` event)."""
    final = None
    for e in events:
        if e.phase == "done":
            final = e
    if final is None:
        raise StreamIncomplete("GarbageCollect")
    return convert.gc_report(final)


def verify(events: Iterable[Any]) -> v.VerifyReport:
    """The report of a Verify stream: the damage of every event, the counts of the
    final one."""
    damage: list[v.Damage] = []
    for e in events:
        damage += [convert.damage(d) for d in e.damage]
        if e.final:
            return v.VerifyReport(
                e.ok,
                e.chunks_checked,
                e.bytes_read,
                e.generations,
                tuple(damage),
                tuple(e.damaged_packs),
            )
    raise StreamIncomplete("Verify")
