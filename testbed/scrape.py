"""Metrics as tests and benchmarks read them: a free loopback port for a daemon's
`--metrics-port`, and one counter family scraped from it, summed by one label."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    """A loopback TCP port free right now (for a daemon that takes a port number)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def summed_by(port: int, sample: str, label: str) -> dict[str, float]:
    """Samples named `sample` on http://127.0.0.1:PORT/metrics, summed per value of
    `label` (over every other label)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == sample:
                key = s.labels[label]
                out[key] = out.get(key, 0.0) + s.value
    return out


def read_bytes_by_path(port: int) -> dict[str, float]:
    """cpcoord_data_path_read_bytes by path (coordinator, direct), summed over nodes."""
    return summed_by(port, "cpcoord_data_path_read_bytes_total", "path")
