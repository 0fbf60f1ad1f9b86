"""State-derived coordinator metrics, computed at scrape time (a prometheus_client Collector).

Owns the figures that describe *what is* rather than *what happened*: connected agents
and the trackers each offers, jobs and their members, generations in flight, the last
committed generation of every job (number, time, sizes), and the store (size, chunks,
packs, dedup and compression ratios, the file system it lives on). Reading them when
Prometheus asks keeps them exact after a restart (the catalog is the source) and costs
nothing between scrapes.

The engine's in-memory state is copied under its lock (short: dict walks only); catalog
queries and the store's index walk run outside it. Chunk and pack counts and sizes are
exact at every scrape; the figures that walk every index entry (uncompressed and logical
bytes, dedup and compression ratios) are recomputed when the store changed but at most
every `stats_min_interval_s`, and at least every `stats_max_age_s`. A part that fails
(the store closing during shutdown) is logged and skipped: a scrape never takes the
daemon down.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator import levels
from coordinator.store import State, StoreStats
from coordinator.store.catalog import Level
from coordinator.store.index import BYTES_PER_ENTRY
from cpcoord.log import log_event

if TYPE_CHECKING:
    from coordinator.engine import Engine

log = logging.getLogger("cpcoord.coordinator.metrics")


@dataclass(frozen=True)
class _EngineView:
    """What the collector needs of the engine, copied under its lock."""

    nodes: tuple[tuple[str, bool, tuple[tuple[str, bool], ...]], ...]  # node, up, trackers
    members: tuple[tuple[str, int, int], ...]  # job, running, gone
    in_flight: tuple[str, ...]  # jobs with a generation in flight
    recent: dict[tuple[str, int], float]  # (job, n) -> longest downtime, seconds


def _view(engine: Engine) -> _EngineView:
    with engine.lock:
        nodes = tuple(
            (
                r.session.node,
                r.session.alive,
                tuple((t.name, bool(t.available)) for t in r.session.hello.trackers),
            )
            for r in engine.agents.records()
        )
        members = []
        for job in engine.members.jobs():
            recs = engine.members.of_job(job)
            gone = sum(1 for m in recs if m.gone)
            members.append((job, len(recs) - gone, gone))
        recent = {k: v.frozen_seconds for k, v in engine.recent.items()}
        return _EngineView(nodes, tuple(members), tuple(sorted(engine.flights)), recent)


@dataclass(frozen=True)
class _Shape:
    chunks: int
    packs: int
    bytes: int  # of all packs


def _store_root(engine: Engine) -> Path | None:
    root = getattr(engine.repo.backend, "root", None)
    return Path(root) if root is not None else None


class StateCollector(Collector):
    """Register on a registry of the caller's: `registry.register(StateCollector(engine))`."""

    def __init__(
        self,
        engine: Engine,
        *,
        stats_min_interval_s: float = 10.0,
        stats_max_age_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.stats_min_interval_s = stats_min_interval_s
        self.stats_max_age_s = stats_max_age_s
        self._clock = clock
        self._stats: StoreStats | None = None
        self._stats_at = float("-inf")
        self._stats_shape = _Shape(-1, -1, -1)
        self._stats_lock = threading.Lock()

    def describe(self) -> list[Metric]:
        # Nothing to check at registration: the names are fixed and listed in docs/metrics.md.
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            v = _view(self.engine)
        except Exception as e:
            log_event(log, logging.WARNING, "metrics part failed", part="engine", error=str(e))
            v = _EngineView((), (), (), {})
        parts: tuple[Callable[[_EngineView], Iterator[Metric]], ...] = (
            self._agents_and_jobs,
            self._last_generations,
            self._store,
            self._dataplane,
            self._levels,
        )
        for part in parts:
            try:
                # Materialised first: a part that fails halfway yields nothing half-built.
                yield from list(part(v))
            except Exception as e:  # a scrape reports what it can, never raises
                log_event(
                    log, logging.WARNING, "metrics part failed", part=part.__name__, error=str(e)
                )

    # -- data plane (coordinator/dataplane.py) ----------------------------------------

    def _dataplane(self, v: _EngineView) -> Iterator[Metric]:
        by_path, through = self.engine.dataplane.snapshot()
        fam = CounterMetricFamily(
            "cpcoord_data_path_bytes",
            "stored bytes committed, by the data path they took and the node that sent them",
            labels=["path", "node"],
        )
        for (path, node), n in sorted(by_path.items()):
            fam.add_metric([path, node], n)
        yield fam
        yield CounterMetricFamily(
            "cpcoord_coordinator_moved_bytes",
            "page bytes of committed generations that passed through the coordinator",
            value=through,
        )
        reads = CounterMetricFamily(
            "cpcoord_data_path_read_bytes",
            "restore reads: chunk bytes sent by the coordinator (path coordinator), or stored "
            "bytes of chunks it located for the agent to read from the store (path direct)",
            labels=["path", "node"],
        )
        for (path, node), n in sorted(self.engine.dataplane.read_snapshot().items()):
            reads.add_metric([path, node], n)
        yield reads
        trust = self.engine.repo.trust
        ver = CounterMetricFamily(
            "cpcoord_chunks_verified_across_nodes",
            "agents' chunks read back and checked before another node deduplicated on them",
            labels=["outcome"],
        )
        ver.add_metric(["ok"], trust.checked - trust.failed)
        ver.add_metric(["bad"], trust.failed)
        yield ver

    # -- durability levels (coordinator/levels.py, docs/multilevel.md) ---------------

    def _levels(self, v: _EngineView) -> Iterator[Metric]:
        by = GaugeMetricFamily(
            "cpcoord_generations_by_level",
            "Committed generations by durability level (local: in node caches only)",
            labels=["level"],
        )
        counts = {lv.value: 0 for lv in Level}
        for g in self.engine.repo.catalog.generations(state=State.COMMITTED):
            counts[g.level.value] += 1
        for lv, n in counts.items():
            by.add_metric([lv], n)
        yield by
        drained, failed = levels.STATS.snapshot()
        fam = CounterMetricFamily(
            "cpcoord_drain_bytes",
            "stored bytes of drained cached packs the coordinator checked and took, by node",
            labels=["node"],
        )
        for node, n in sorted(drained.items()):
            fam.add_metric([node], n)
        yield fam
        bad = CounterMetricFamily(
            "cpcoord_drain_failures", "drain reports refused (bad data), by node", labels=["node"]
        )
        for node, n in sorted(failed.items()):
            bad.add_metric([node], n)
        yield bad

    # -- engine state ---------------------------------------------------------------

    def _agents_and_jobs(self, v: _EngineView) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "cpcoord_agents_connected",
            "Agents holding a control stream to this coordinator",
            value=sum(1 for _, up, _ in v.nodes if up),
        )
        up = GaugeMetricFamily(
            "cpcoord_node_connected",
            "1 while the node's agent holds a control stream, 0 once it ended "
            "(nodes seen since the coordinator started)",
            labels=["node"],
        )
        trk = GaugeMetricFamily(
            "cpcoord_node_tracker_available",
            "Tracker backends a connected agent reported in its Hello: 1 usable, 0 not",
            labels=["node", "tracker"],
        )
        for node, alive, trackers in v.nodes:
            up.add_metric([node], 1.0 if alive else 0.0)
            if alive:
                for name, ok in trackers:
                    trk.add_metric([node, name], 1.0 if ok else 0.0)
        yield up
        yield trk
        mem = GaugeMetricFamily(
            "cpcoord_job_members",
            "Members attached to a job, by whether their process still runs",
            labels=["job_name", "state"],
        )
        for job, running, gone in v.members:
            mem.add_metric([job, "running"], running)
            mem.add_metric([job, "gone"], gone)
        yield mem
        yield GaugeMetricFamily("cpcoord_jobs", "Jobs the coordinator knows", value=len(v.members))
        yield GaugeMetricFamily(
            "cpcoord_checkpoints_in_flight",
            "Generations begun and not yet committed or aborted",
            value=len(v.in_flight),
        )

    def _last_generations(self, v: _EngineView) -> Iterator[Metric]:
        recent = v.recent
        last: dict[str, Any] = {}
        count: dict[str, int] = {}
        pinned: dict[str, int] = {}
        for g in self.engine.repo.catalog.generations(state=State.COMMITTED):
            last[g.job] = g  # ordered by job, then number: the last one wins
            count[g.job] = count.get(g.job, 0) + 1
            pinned[g.job] = pinned.get(g.job, 0) + int(g.pinned)

        def fam(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["job_name"])

        number = fam(
            "cpcoord_last_generation_number", "Number of the job's last committed generation"
        )
        ts = fam(
            "cpcoord_last_generation_timestamp_seconds",
            "Unix time the job's last committed generation was committed",
        )
        logical = fam(
            "cpcoord_last_generation_logical_bytes",
            "Last committed generation: bytes of the pages it records (pages x page size)",
        )
        stored = fam(
            "cpcoord_last_generation_stored_bytes",
            "Last committed generation: stored (compressed) bytes of the distinct chunks it "
            "references",
        )
        new = fam(
            "cpcoord_last_generation_new_bytes",
            "Last committed generation: stored bytes of the chunks it added to the store",
        )
        pages = fam("cpcoord_last_generation_pages", "Last committed generation: pages it records")
        zero = fam(
            "cpcoord_last_generation_zero_pages", "Last committed generation: all-zero pages"
        )
        frozen = fam(
            "cpcoord_last_generation_frozen_seconds",
            "Last committed generation: longest member downtime; absent after a restart",
        )
        kept = fam("cpcoord_generations", "Committed generations the store keeps for the job")
        pin = fam("cpcoord_generations_pinned", "Pinned generations of the job")
        for job, g in last.items():
            number.add_metric([job], g.number)
            ts.add_metric([job], g.finished or g.started)
            z = g.sizes
            logical.add_metric([job], z.bytes_logical)
            stored.add_metric([job], z.bytes_stored)
            new.add_metric([job], z.bytes_new)
            pages.add_metric([job], z.pages)
            zero.add_metric([job], z.zero_pages)
            run = recent.get((job, g.number))
            if run is not None:
                frozen.add_metric([job], run)
            kept.add_metric([job], count[job])
            pin.add_metric([job], pinned[job])
        yield from (number, ts, logical, stored, new, pages, zero, frozen, kept, pin)

    # -- the store --------------------------------------------------------------------

    def _shape(self) -> _Shape:
        """Exact figures that need no walk over the index entries."""
        repo = self.engine.repo
        with repo.lock:
            chunks = sum(len(ci) for ci in repo.index.namespaces.values())
            packs = repo.index.packs()
            return _Shape(chunks, len(packs), sum(p.size for p in packs.values()))

    def store_stats(self) -> StoreStats:
        """The store's full statistics (they walk every index entry): recomputed when
        chunks or packs came or went, at most every `stats_min_interval_s`, and at least
        every `stats_max_age_s` (logical bytes change when generations are deleted)."""
        with self._stats_lock:
            now = self._clock()
            shape = self._shape()
            age = now - self._stats_at
            changed = shape != self._stats_shape and age >= self.stats_min_interval_s
            if self._stats is None or changed or age >= self.stats_max_age_s:
                self._stats = self.engine.repo.stats()
                self._stats_at, self._stats_shape = now, shape
            return self._stats

    def _store(self, v: _EngineView) -> Iterator[Metric]:
        del v  # the store is not engine state
        shape = self._shape()
        s = self.store_stats()
        yield GaugeMetricFamily(
            "cpcoord_store_size_bytes", "Bytes of all pack objects in the store", value=shape.bytes
        )
        yield GaugeMetricFamily(
            "cpcoord_store_chunks", "Distinct chunks the store holds", value=shape.chunks
        )
        yield GaugeMetricFamily(
            "cpcoord_store_packs", "Pack objects in the store", value=shape.packs
        )
        yield GaugeMetricFamily(
            "cpcoord_store_index_memory_bytes",
            "Memory the in-memory chunk index takes",
            value=shape.chunks * BYTES_PER_ENTRY,
        )
        yield GaugeMetricFamily(
            "cpcoord_store_chunk_bytes",
            "Uncompressed bytes of the distinct chunks the store holds",
            value=s.chunk_bytes,
        )
        yield GaugeMetricFamily(
            "cpcoord_store_logical_bytes",
            "Sum over committed generations of the bytes of the pages they record",
            value=s.logical_bytes,
        )
        if s.dedup_ratio is not None:
            yield GaugeMetricFamily(
                "cpcoord_store_dedup_ratio",
                "Logical bytes of committed generations over uncompressed bytes of distinct "
                "chunks (zero pages count as deduplicated)",
                value=s.dedup_ratio,
            )
        if s.compression_ratio is not None:
            yield GaugeMetricFamily(
                "cpcoord_store_compression_ratio",
                "Uncompressed over stored bytes of the distinct chunks",
                value=s.compression_ratio,
            )
        root = _store_root(self.engine)
        if root is not None:
            st = os.statvfs(root)
            yield GaugeMetricFamily(
                "cpcoord_store_filesystem_size_bytes",
                "Size of the file system holding a local store",
                value=st.f_blocks * st.f_frsize,
            )
            yield GaugeMetricFamily(
                "cpcoord_store_filesystem_avail_bytes",
                "Bytes free to unprivileged users on the file system holding a local store",
                value=st.f_bavail * st.f_frsize,
            )
