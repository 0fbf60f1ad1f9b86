"""Committing a generation, dropping an aborted one, ending a checkpoint, and retention.

The protocol core says *when* (`Commit` once every member is uploaded, `DropGeneration`
on abort); this module does it against the store:
- `run`: on its own thread, build the complete manifest from the members' finished
  uploads (each already the parent's pages overlaid with the changed ones,
  coordinator/uploads.py) plus the registers and kernel side whole-memory members
  reported with their Staged (agent_events.py), and `repo.commit` it: packs fsynced,
  manifest fsynced, catalog flip. The outcome goes back to the core as StoreCommitted
  or StoreFailed; then retention runs.
- `drop`: mark the catalog row ABORTED. The core's commit deadline can fire while the
  store is flipping the row; the flip is conditional (only a PREPARING row flips), so
  the race has one bad order left: flipped, then aborted. Then the generation is
  deleted, because the client was told ABORTED and it must not be visible.
- `finish`: at a checkpoint's end, its run stats are kept for listings and a committed
  generation becomes the base of its members' next capture.
- `retain`: keep the newest `keep` committed generations per job and the pinned ones;
  delete the rest (their chunks go at the next gc).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from coordinator import generations
from coordinator.flight import Flight, Summary
from coordinator.protocol.messages import Event, StoreCommitted, StoreFailed
from coordinator.protocol.values import AbortReason, GenState
from coordinator.store import Manifest, State
from coordinator.store import partners as store_partners
from cpcoord.errors import CpcoordError, GenerationStateError
from cpcoord.log import log_event

if TYPE_CHECKING:
    from coordinator.engine_view import EngineView

log = logging.getLogger("cpcoord.coordinator.commit")
RECENT = 4096  # run stats kept for listings (pages captured, downtime, seconds)


def run(engine: EngineView, f: Flight) -> None:
    """Commit the flight's generation and tell the core how it went."""
    ev: Event
    try:
        ev = StoreCommitted() if _write(engine, f) else StoreFailed("aborted meanwhile")
    except CpcoordError as e:
        ev = StoreFailed(str(e))
    except Exception as e:
        log.exception("commit failed")
        ev = StoreFailed(f"{type(e).__name__}: {e}")
    with engine.lock:
        f.committing = False
        engine.feed(f, ev)
        committed = f.gen.state is GenState.COMMITTED
    if committed:
        retain(engine, f.job)


def _write(engine: EngineView, f: Flight) -> bool:
    with engine.lock:
        if not f.in_flight:
            return False
        spec = f.gen.snapshot.spec
        uploads = [f.uploads[m] for m, _ in spec.members]
        threads = dict(f.threads)
        kernel = dict(f.kernel)
    cuts = [u.cut_ns for u in uploads if u.cut_ns]
    m = Manifest(
        job=f.job,
        generation=f.number,
        parent=f.parent,
        time_ns=max(cuts) if cuts else (f.barrier_ns or time.time_ns()),
        page_size=engine.opt.page_size,
        members=tuple(
            replace(u.member_map(), threads=threads.get(u.member, ()), kernel=kernel.get(u.member))
            for u in uploads
        ),
    )
    engine.repo.commit(m)
    store_partners.committed(engine.repo, f.job, f.number)  # copied already: `partner`
    engine.dataplane.record(uploads)
    return True


def drop(engine: EngineView, f: Flight, reason: AbortReason) -> None:
    """The catalog row becomes ABORTED (never a visible COMMITTED one)."""
    f.uploads.clear()
    try:
        engine.repo.abort(f.job, f.number, reason.value)
    except GenerationStateError:
        info = engine.repo.catalog.get(f.job, f.number)
        if info.state is State.COMMITTED:
            log_event(
                log,
                logging.ERROR,
                "deleting a generation committed after its abort",
                job=f.job,
                generation=f.number,
            )
            engine.repo.delete_generation(f.job, f.number)


def retain(engine: EngineView, job: str) -> list[int]:
    """Delete committed generations beyond the newest `keep` (pinned ones stay)."""
    gens = engine.repo.generations(job)
    keep = {g.number for g in gens[-engine.opt.keep :]} | {g.number for g in gens if g.pinned}
    dropped = []
    for g in gens:
        if g.number in keep:
            continue
        try:
            engine.repo.delete_generation(job, g.number)
            dropped.append(g.number)
            engine.events.publish("generation_deleted", job=job, generation=g.number)
        except CpcoordError as e:
            log_event(
                log,
                logging.WARNING,
                "retention skipped a generation",
                job=job,
                generation=g.number,
                why=str(e),
            )
    return dropped


def finish(engine: EngineView, f: Flight) -> Summary:
    """Under the lock, at a checkpoint's end (COMMITTED or ABORTED; the engine has ended
    the flight): keep its run stats; a committed one becomes its members' base (and is
    pinned if asked)."""
    run = f.run_stats()
    engine.recent[(f.job, f.number)] = run
    while len(engine.recent) > RECENT:
        engine.recent.popitem(last=False)
    snap = f.gen.snapshot
    if snap.state is GenState.COMMITTED:
        spec_members = [m for m, _ in snap.spec.members]
        recs = [engine.members.get(f.job, m) for m in spec_members]
        engine.members.update_all(replace(r, committed=f.number) for r in recs if r is not None)
        if f.pin:
            engine.repo.pin(f.job, f.number, True)
    f.summary = generations.summarize(engine, f.job, f.number, snap.state.value, snap, run)
    log_event(
        log,
        logging.INFO,
        "generation ended",
        job=f.job,
        generation=f.number,
        state=snap.state.value,
        reason=snap.reason.value if snap.reason else "",
        seconds=round(run.seconds, 3),
        frozen_seconds=round(run.frozen_seconds, 4),
    )
    return f.summary
