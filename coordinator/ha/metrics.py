"""Prometheus metrics of a coordinator replica (docs/metrics.md, "Replicas").

On top of the coordinator's own metrics (coordinator/metrics/counters.py: the event counters are
made once and hooked into each new engine; the state collector follows the engine the
replica serves now), every replica reports whether it leads, its term, how often it
took over and why it lost leadership. A follower reports `cpcoord_agents_connected` 0
(agents hold their streams to the leader only) and no job or store figures: it has no
store open. Registry passed in, as everywhere (nothing on the process-global one).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.metrics import CoordinatorMetrics, StateCollector

if TYPE_CHECKING:
    from coordinator.engine import Engine
    from coordinator.ha.replica import Replica


class ReplicaCollector(Collector):
    def __init__(self, replica: Replica, *, stats_min_interval_s: float = 10.0) -> None:
        self.replica = replica
        self.stats_min_interval_s = stats_min_interval_s
        self._state: tuple[Engine, StateCollector] | None = None

    def describe(self) -> list[Metric]:
        return []  # names fixed, listed in docs/metrics.md

    def collect(self) -> Iterator[Metric]:
        r = self.replica
        engine = r.engine
        yield GaugeMetricFamily(
            "cpcoord_coordinator_is_leader",
            "1 while this replica leads (serves the engine and holds the store), else 0",
            value=1 if engine is not None else 0,
        )
        yield GaugeMetricFamily(
            "cpcoord_coordinator_term",
            "The term this replica leads in (the etcd revision that created the leader "
            "key; grows with every election), 0 while it follows",
            value=r.term,
        )
        yield CounterMetricFamily(
            "cpcoord_coordinator_failovers",
            "Times this replica took over as leader (its first election included)",
            value=r.failovers,
        )
        lost = CounterMetricFamily(
            "cpcoord_coordinator_leadership_lost",
            "Times this replica stopped leading, by reason (lease_lapsed, lease_expired, "
            "resigned, elector_failed)",
            labels=["reason"],
        )
        for reason, n in sorted(dict(r.lost).items()):
            lost.add_metric([reason], n)
        yield lost
        if engine is None:
            yield GaugeMetricFamily(
                "cpcoord_agents_connected",
                "Agents holding a control stream to this coordinator",
                value=0,
            )
            return
        if self._state is None or self._state[0] is not engine:
            s = StateCollector(engine, stats_min_interval_s=self.stats_min_interval_s)
            self._state = (engine, s)
        yield from self._state[1].collect()


def install(
    replica: Replica, registry: CollectorRegistry, *, stats_min_interval_s: float = 10.0
) -> CoordinatorMetrics:
    from cpcoord import __version__

    m = CoordinatorMetrics(registry)
    m.info.info({"version": __version__, "component": "coordinator"})
    registry.register(ReplicaCollector(replica, stats_min_interval_s=stats_min_interval_s))
    replica.on_engine.append(lambda engine: engine.on_progress.append(m.on_progress))
    return m


def serve(replica: Replica, port: int, addr: str = "0.0.0.0") -> CollectorRegistry:
    """Serve /metrics on `port` (a daemon thread) from a registry of the replica's own."""
    reg = CollectorRegistry()
    install(replica, reg)
    start_http_server(port, addr=addr, registry=reg)
    return reg
