"""Prometheus metrics of the coordinator, on a registry passed in (docs/metrics.md).

counters  what happened: fed by the engine's progress hook (`install`, `serve`)
state     what is: read from the engine and the store at scrape time
"""

from coordinator.metrics.counters import CoordinatorMetrics, FlightView, install, serve
from coordinator.metrics.state import StateCollector

__all__ = ["CoordinatorMetrics", "FlightView", "StateCollector", "install", "serve"]
