"""deploy/grafana/cpcoord.json: valid JSON, a dashboard Grafana can import, and every
expression names metrics cpcoord exports.

The exported names are the ones docs/metrics.md lists, which tests/unit/test_metrics.py
holds equal to what the registries really expose; tests/integration/test_prometheus.py
also runs every expression against a real Prometheus.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "cpcoord.json"
PROMQL_WORDS = {
    "sum", "by", "rate", "increase", "histogram_quantile", "time", "le", "without", "on",
    "max", "min", "avg", "count", "ignoring", "and", "or", "unless",
}  # fmt: skip


def exported() -> dict[str, str]:
    text = (REPO / "docs" / "metrics.md").read_text()
    return dict(re.findall(r"^\|\s*`(cpcoord_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|", text, re.M))


def series_names(kind_of: dict[str, str]) -> set[str]:
    """Every series name a scrape can hold (histograms: _bucket, _sum, _count)."""
    out = {"up"}
    for name, kind in kind_of.items():
        if kind == "histogram":
            out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            out.add(name)
    return out


def panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def metric_names(expr: str) -> set[str]:
    # Drop label matchers and strings, then take identifiers that are not PromQL words,
    # label names after `by (...)`, or numbers.
    bare = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^\]]*\]', " ", expr)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", bare)
    words = set(re.findall(r"\b[a-zA-Z_][a-zA-Z0-9_]*\b", bare))
    return {w for w in words if w not in PROMQL_WORDS}


def test_dashboard_is_importable_json() -> None:
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    ps = panels(d)
    ids = [p["id"] for p in ps]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in ps:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"
            assert t["refId"] and t["expr"].strip()
    names = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "job_name"} <= names


def test_every_expression_names_exported_metrics() -> None:
    d = json.loads(DASHBOARD.read_text())
    known = series_names(exported())
    assert len(known) > 40
    exprs = [t["expr"] for p in panels(d) for t in p.get("targets", [])]
    exprs += [v["definition"] for v in d["templating"]["list"] if v.get("type") == "query"]
    used = set()
    for e in exprs:
        e = re.sub(r"label_values\((\w+),\s*\w+\)", r"\1", e)
        names = metric_names(e)
        assert names, f"no metric in {e!r}"
        unknown = names - known
        assert not unknown, f"{e!r} names {sorted(unknown)}, not exported by cpcoord"
        used |= names
    # And the names themselves are not a tautology: a made-up one is caught.
    assert metric_names("rate(cpcoord_nope_total[5m])") - known == {"cpcoord_nope_total"}
    assert "cpcoord_last_generation_logical_bytes" in used


def test_size_and_downtime_per_job() -> None:
    d = json.loads(DASHBOARD.read_text())
    by_job = [
        t["expr"]
        for p in panels(d)
        for t in p.get("targets", [])
        if 'job_name=~"$job_name"' in t["expr"]
    ]
    assert any("cpcoord_last_generation_logical_bytes" in e for e in by_job)
    assert any("cpcoord_last_generation_new_bytes" in e for e in by_job)
    assert any(
        "cpcoord_checkpoint_frozen_seconds_bucket" in e and "by (job_name, le)" in e for e in by_job
    )
