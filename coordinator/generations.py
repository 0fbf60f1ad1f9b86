"""Reading and managing generations: list, get, delete, pin, gc, verify, stats.

Only committed generations are visible, plus the one in flight (PREPARING) and, on
request, aborted ones. Deleting a job's newest generation is allowed: members whose
tracker counted from it no longer match the new newest one, so their next capture is
full (engine.checkpoint compares each member's `committed` with the parent).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coordinator.flight import RunStats, Summary
from coordinator.protocol.values import AbortReason, Snapshot
from coordinator.store import GcReport, Manifest, State, StoreStats, VerifyReport
from coordinator.store.catalog import GenerationInfo, Level
from cpcoord.errors import GenerationStateError, InvalidArgument, NoSuchGeneration, UnknownJob
from cpcoord.log import log_event
from cpcoord.ranges import check_name

if TYPE_CHECKING:
    from coordinator.engine_view import EngineView

log = logging.getLogger("cpcoord.coordinator.generations")


def summarize(
    engine: EngineView,
    job: str,
    number: int,
    state: str = "",
    snap: Snapshot | None = None,
    run: RunStats | None = None,
    info: GenerationInfo | None = None,
) -> Summary:
    """A generation as clients see it: the catalog row (if it still has one), the abort
    reason (from the core, or the catalog's text after a restart) and the run's numbers
    (kept in memory for recent generations)."""
    if info is None:
        try:
            info = engine.repo.catalog.get(job, number)
        except NoSuchGeneration:
            info = None
    reason = detail = ""
    if snap is not None and snap.reason is not None:
        reason, detail = snap.reason.value, snap.detail
    elif info is not None and info.state is State.ABORTED:
        reason, detail = _reason_of(info.reason)
    st = state or (info.state.value.lower() if info is not None else "aborted")
    lost, cache_nodes = "", ()  # type: tuple[str, tuple[str, ...]]
    if info is not None and info.state is State.COMMITTED and info.level is not Level.STORE:
        with engine.repo.lock:
            lost = engine.repo.cached.lost.get((job, number), "")
            up = _reachable(engine)
            cache_nodes = () if lost else tuple(engine.repo.cached.nodes_of(job, number, up))
    return Summary(
        catalog=info,
        job=job,
        number=number,
        parent=info.parent if info is not None else None,
        state=st,
        reason=reason,
        detail=detail,
        run=run or engine.recent.get((job, number), RunStats()),
        lost=lost,
        cache_nodes=cache_nodes,
    )


def _reason_of(text: str) -> tuple[str, str]:
    """The catalog keeps an abort reason as text: an AbortReason value, or the store's
    own words (e.g. "interrupted: the store was reopened" after a restart)."""
    try:
        return AbortReason(text).value, ""
    except ValueError:
        return AbortReason.STORE_ERROR.value, text


def _job(engine: EngineView, job: str) -> None:
    check_name(job)
    if not engine.members.has_job(job) and job not in engine.repo.catalog.jobs():
        raise UnknownJob(job)


def committed(engine: EngineView, job: str, n: int, readable: bool = False) -> GenerationInfo:
    """Generation n of job if committed; n = 0: the newest committed one (`readable`:
    the newest that can be read now, for restore: not lost, and in the store or in node
    caches whose agents are connected; docs/multilevel.md)."""
    _job(engine, job)
    if n == 0:
        gens = engine.repo.generations(job)
        if not gens:
            raise NoSuchGeneration("(latest committed)", job)
        if readable:
            return _newest_readable(engine, job, gens)
        return gens[-1]
    info = engine.repo.catalog.get(job, n)
    if info.state is not State.COMMITTED:
        raise GenerationStateError(n, job, "read it", f"it is {info.state.value.lower()}")
    if readable:
        with engine.repo.lock:
            lost = engine.repo.cached.lost.get((job, n), "")
        if lost:  # never a silent fallback to another generation
            raise GenerationStateError(n, job, "restore it", f"it is lost: {lost}")
    return info


def _reachable(engine: EngineView) -> Callable[[str], bool]:
    """Whether a node's agent is connected (a dict lookup: no engine lock needed, so it
    may be asked under the repository's lock)."""
    return lambda node: engine.agents.current(node) is not None


def unreadable(engine: EngineView, job: str, g: GenerationInfo) -> str:
    """Why a committed generation cannot be read now ("" when it can)."""
    if g.level is Level.STORE:
        return ""
    with engine.repo.lock:
        lost = engine.repo.cached.lost.get((job, g.number), "")
        nodes = engine.repo.cached.nodes_of(job, g.number, _reachable(engine))
    if lost:
        return f"lost: {lost}"
    with engine.lock:
        away = [n for n in nodes if engine.agents.current(n) is None]
    return f"in the cache of {', '.join(away)}, not connected" if away else ""


def _newest_readable(engine: EngineView, job: str, gens: list[GenerationInfo]) -> GenerationInfo:
    skipped: list[str] = []
    for g in reversed(gens):
        why = unreadable(engine, job, g)
        if not why:
            if skipped:
                log_event(
                    log, logging.WARNING, "newest generation unreadable: taking an older one",
                    job=job, skipped="; ".join(skipped), taken=g.number,
                )  # fmt: skip
            return g
        skipped.append(f"generation {g.number}: {why}")
    raise GenerationStateError(
        "(latest readable)", job, "restore it", f"none can be read: {'; '.join(skipped)}"
    )


def list_generations(
    engine: EngineView, job: str, include_aborted: bool = False, limit: int = 0
) -> list[Summary]:
    """Newest first."""
    _job(engine, job)
    rows = engine.repo.catalog.generations(job)
    shown = [r for r in rows if include_aborted or r.state is not State.ABORTED]
    shown.reverse()
    if limit:
        shown = shown[:limit]
    return [summarize(engine, job, r.number, info=r) for r in shown]


@dataclass(frozen=True)
class Detail:
    summary: Summary
    manifest: Manifest
    nodes: dict[str, str]  # member -> node (as the membership knows it now)


def get_generation(engine: EngineView, job: str, n: int) -> Detail:
    info = committed(engine, job, n)
    m = engine.repo.manifest(job, info.number)
    with engine.lock:
        nodes = {r.name: r.node for r in engine.members.of_job(job)}
    return Detail(summarize(engine, job, info.number, info=info), m, nodes)


def manifest(engine: EngineView, job: str, n: int) -> tuple[Manifest, dict[str, str]]:
    d = get_generation(engine, job, n)
    return d.manifest, d.nodes


def delete_generation(engine: EngineView, job: str, n: int, force: bool = False) -> None:
    _job(engine, job)
    if n < 1:
        raise InvalidArgument(f"generation must be >= 1, got {n}")
    with engine.lock:
        f = engine.flights.get(job)
        if f is not None and f.number == n:
            raise GenerationStateError(n, job, "delete it", "it is in flight")
        info = engine.repo.catalog.get(job, n)
        if info.pinned and force:
            engine.repo.pin(job, n, False)
        engine.repo.delete_generation(job, n)
        engine.events.publish("generation_deleted", job=job, generation=n, detail="deleted")


def pin(engine: EngineView, job: str, n: int, pinned: bool) -> Summary:
    info = committed(engine, job, n) if n else committed(engine, job, 0)
    engine.repo.pin(job, info.number, pinned)
    return summarize(engine, job, info.number)


def gc(engine: EngineView, keep: int = 0, dry_run: bool = False) -> GcReport:
    keep = keep or engine.opt.keep
    if keep < 1:
        raise InvalidArgument(f"keep must be at least 1, got {keep}")
    if not dry_run:
        report = engine.repo.gc(keep)
        engine.events.gc_ran(report)
        return report
    dropped = []
    for job in engine.repo.catalog.jobs():
        gens = engine.repo.generations(job)
        kept = {g.number for g in gens[-keep:]} | {g.number for g in gens if g.pinned}
        dropped += [(job, g.number) for g in gens if g.number not in kept]
    return GcReport(tuple(dropped), 0, 0, 0, 0, 0, 0, 0, 0)


def verify(engine: EngineView, job: str = "", n: int = 0) -> VerifyReport:
    if n and not job:
        raise InvalidArgument("a generation needs its job")
    if job:
        _job(engine, job)
    if n:
        committed(engine, job, n)
    report = engine.repo.verify()
    if not job:
        return report
    damage = tuple(d for d in report.damage if d.job == job and (not n or d.generation == n))
    return VerifyReport(
        report.generations,
        report.chunks,
        report.packs,
        report.bytes_read,
        damage,
        report.damaged_packs,
    )


def stats(engine: EngineView) -> StoreStats:
    return engine.repo.stats()
