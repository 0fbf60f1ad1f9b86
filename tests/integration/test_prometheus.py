"""A real Prometheus server scrapes a real coordinator and real agents, with the scrape
configuration and alert rules shipped in deploy/prometheus/. The test starts `cpcoord
coordinator` and two `cpcoord agent`s with `--metrics-port` (tests/helpers/cluster.py),
writes their addresses as the file_sd targets the shipped prometheus.yml reads, and starts
the `prometheus` binary itself (never the system service) on loopback with storage in the
test's tmp dir and a 1 s scrape interval (the only change made to the shipped file).
Checkpoints of real member processes follow: four commit, one aborts (the agent holding a
member is killed mid-freeze). Then everything is read back through Prometheus's HTTP API
(`/api/v1/query`, `/api/v1/rules`), and every expression of the Grafana dashboard is run
against it.

Also here: `promtool check config`, `promtool check rules` and `promtool test rules`
(deploy/prometheus/alerts_test.yml). In CI a missing prometheus or promtool fails.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.cluster import Cluster
from testbed.daemons import REPO, Daemon, daemon_env, wait_for
from testbed.driver import Target
from tests.conftest import require

pytestmark = [pytest.mark.integration]

DEPLOY = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "cpcoord.json"
PAGE = 4096


def tool(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} (Debian package prometheus)")
    assert path is not None
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- promtool -------------------------------------------------------------------------


def promtool(*args: str, cwd: Path = DEPLOY) -> str:
    r = subprocess.run(
        [tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def test_promtool_check_rules() -> None:
    out = promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in out


def test_promtool_check_config() -> None:
    # check config also checks the rule files and that file_sd patterns are sane.
    out = promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in out


def test_promtool_alert_unit_tests() -> None:
    promtool("test", "rules", "alerts_test.yml")


def test_every_alert_has_a_unit_test_and_a_runbook() -> None:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())
    tested = {
        t["alertname"]
        for case in tests["tests"]
        for t in case.get("alert_rule_test", [])
        if t.get("exp_alerts")
    }
    assert alerts - tested == set(), f"alerts never seen firing in a test: {alerts - tested}"
    ops = (REPO / "docs" / "operations.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9-]", "", h.lower().replace(" ", "-"))
        for h in re.findall(r"^#+ (.+)$", ops, re.M)
    }
    for g in rules["groups"]:
        for r in g["rules"]:
            runbook = r["annotations"]["runbook"]
            assert runbook.startswith("docs/operations.md#"), runbook
            assert runbook.split("#", 1)[1] in anchors, f"{r['alert']}: no section {runbook}"


# -- a real Prometheus ------------------------------------------------------------------


@dataclass
class _MetricsDaemon(Daemon):
    """A cluster daemon started with `--metrics-port` (the same port on every restart)."""

    extra: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.argv = [*self.argv, *self.extra]
        super().start()


@dataclass
class MetricsCluster(Cluster):
    """tests/helpers/cluster.Cluster whose daemons serve /metrics on known ports."""

    metrics: dict[str, int] = field(default_factory=dict)  # "coordinator" or node -> port

    def _daemon(self, key: str, name: str) -> _MetricsDaemon:
        port = self.metrics.setdefault(key, free_port())
        log = self.root / f"{name}.log"
        return _MetricsDaemon(name, [], log, {}, extra=["--metrics-port", str(port)])

    def start_coordinator(self, pause: Sequence[str] = ()) -> None:
        if self.coordinator is None:
            self.coordinator = self._daemon("coordinator", "coordinator")
        super().start_coordinator(pause)

    def start_agent(self, node: str, pause: Sequence[str] = (), fail: Sequence[str] = ()) -> Daemon:
        if node not in self.agents:
            self.agents[node] = self._daemon(node, f"agent-{node}")
        return super().start_agent(node, pause, fail)


class Prometheus:
    def __init__(self, root: Path, cluster: MetricsCluster) -> None:
        self.root = root
        conf = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        # The one change to the shipped file: scrape and evaluate every second.
        conf["global"]["scrape_interval"] = "1s"
        conf["global"]["evaluation_interval"] = "1s"
        (root / "targets").mkdir(parents=True)
        shutil.copy(DEPLOY / "alerts.yml", root / "alerts.yml")
        (root / "prometheus.yml").write_text(yaml.safe_dump(conf))
        coord = [{"targets": [f"127.0.0.1:{cluster.metrics['coordinator']}"], "labels": {}}]
        agents = [
            {"targets": [f"127.0.0.1:{cluster.metrics[n]}"], "labels": {"node": n}}
            for n in cluster.nodes
        ]
        (root / "targets" / "coordinator.json").write_text(json.dumps(coord))
        (root / "targets" / "agents.json").write_text(json.dumps(agents))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={root / 'prometheus.yml'}",
                    f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                cwd=root,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self._ready, 60, "prometheus ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{q}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return list(data["result"])

    def value(self, expr: str) -> float | None:
        """The single value of an instant vector, None if empty."""
        res = self.query(expr)
        assert len(res) <= 1, f"{expr}: {len(res)} series"
        return float(res[0]["value"][1]) if res else None

    def wait_value(self, expr: str, want: float, timeout: float = 30) -> None:
        last: list[float | None] = [None]

        def ok() -> bool:
            last[0] = self.value(expr)
            return last[0] == want

        try:
            wait_for(ok, timeout, f"{expr} == {want}")
        except AssertionError:
            raise AssertionError(f"{expr}: {last[0]}, want {want}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)


@pytest.fixture
def prom_cluster(
    tmp_path: Path, store_select: Callable[[Path], dict[str, Any]]
) -> Iterator[tuple[MetricsCluster, Prometheus]]:
    tool("prometheus")
    root = tmp_path / "cluster"
    c = MetricsCluster(root, nodes=("node-a", "node-b"), **store_select(root))
    c.root.mkdir(parents=True)
    p: Prometheus | None = None
    try:
        c.start()
        p = Prometheus(tmp_path / "prom", c)
        yield c, p
    finally:
        if p is not None:
            p.close()
        c.close()


def _checkpoint_popen(c: Cluster, job: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "cpcoord", "checkpoint", "--job", job, "--json",
            "--lease-ms", "3000", "--coordinator", c.address]  # fmt: skip
    return subprocess.Popen(
        argv, cwd=REPO, env=daemon_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    return out


@pytest.mark.slow
def test_prometheus_scrapes_checkpoints_agents_and_store(
    prom_cluster: tuple[MetricsCluster, Prometheus],
    target_factory: Callable[..., Target],
) -> None:
    c, prom = prom_cluster
    members = {
        "a": (target_factory(maps=["data:64"]), "node-a"),
        "b": (target_factory(maps=["data:32"]), "node-b"),
    }
    for name, (t, node) in members.items():
        m = t.mapping("data")
        c.cli("attach", "--job", "train", "--member", name, "--pid", str(t.pid), "--node", node,
              "--range", f"{m.addr:#x}-{m.end:#x}")  # fmt: skip

    results: list[dict] = []

    def commit() -> dict:
        r = c.cli_json("checkpoint", "--job", "train")
        assert r["state"] == "committed", r
        results.append(r)
        return r

    commit()
    ta, tb = members["a"][0], members["b"][0]
    ta.cmd("write", name="data", page=3, count=5, counter=2)
    commit()
    tb.cmd("write", name="data", page=0, count=2, counter=3)
    commit()

    # One abort: node-b's agent pauses once every member is frozen, and is killed there.
    c.restart_agent("node-b", pause=["agent.freeze"])
    c.wait_agents(c.nodes)
    wait_for(lambda: c.members_running("train"), 60, "members reattached")
    proc = _checkpoint_popen(c, "train")
    c.wait_fault("agent.freeze")
    c.agents["node-b"].kill()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 52, (out, err)
    reason = json.loads(out)["reason"]
    c.start_agent("node-b")
    c.wait_agents(c.nodes)
    wait_for(lambda: c.members_running("train"), 60, "members reattached")
    ta.cmd("write", name="data", page=60, count=4, counter=4)
    last = commit()

    gens = c.cli_json("generations", "--job", "train")["generations"]
    assert len(gens) == 4 and gens[0]["generation"] == last["generation"]

    # What Prometheus read must equal what happened.
    committed = 'sum(cpcoord_checkpoints_total{job="cpcoord-coordinator",outcome="committed"})'
    prom.wait_value(committed, 4)
    prom.wait_value('sum(cpcoord_checkpoints_total{outcome="aborted"})', 1)
    aborted = prom.query('cpcoord_checkpoints_total{outcome="aborted"}')
    assert aborted[0]["metric"]["reason"] == reason == "agent_lost"
    assert aborted[0]["metric"]["job_name"] == "train"
    prom.wait_value("cpcoord_agents_connected", 2)
    prom.wait_value('count(up{job="cpcoord-agent"} == 1)', 2)
    prom.wait_value('up{job="cpcoord-agent",node="node-b"}', 1)
    prom.wait_value('sum(cpcoord_agent_connected{job="cpcoord-agent"})', 2)
    prom.wait_value('cpcoord_last_generation_number{job_name="train"}', last["generation"])
    logical = prom.value('cpcoord_last_generation_logical_bytes{job_name="train"}')
    assert logical == (64 + 32) * PAGE
    assert logical == last["bytes_logical"]
    new = prom.value('cpcoord_last_generation_new_bytes{job_name="train"}')
    assert new is not None and new == last["bytes_stored_new"] > 0
    assert prom.value('sum(cpcoord_checkpoint_frozen_seconds_count{job_name="train"})') == 4
    frozen_sum = prom.value('sum(cpcoord_checkpoint_frozen_seconds_sum{job_name="train"})')
    assert frozen_sum is not None and 0 < frozen_sum < 4 * 3.0, "downtime within the lease"
    total_logical = prom.value('sum(cpcoord_generation_logical_bytes_total{job_name="train"})')
    assert total_logical == 4 * (64 + 32) * PAGE
    # Pages the coordinator received equal what the agents said they captured; the
    # first generation captured all 96.
    captured = prom.value('sum(cpcoord_pages_captured_total{job_name="train"})')
    assert captured == sum(r["pages_captured"] for r in results)
    assert results[0]["pages_captured"] == 96
    # The store-walking figures refresh at most every 10 s: give them one refresh.
    ratio = wait_for(lambda: prom.value("cpcoord_store_dedup_ratio"), 30, "a dedup ratio")
    assert ratio > 2, "four generations share most of their pages"
    assert (prom.value("cpcoord_store_chunks") or 0) > 0
    trackers = prom.query('cpcoord_member_captures_total{job_name="train"}')
    assert {t["metric"]["node"] for t in trackers} == {"node-a", "node-b"}
    in_use = prom.query("cpcoord_agent_tracker_default == 1")
    assert len(in_use) == 2 and {r["metric"]["node"] for r in in_use} == {"node-a", "node-b"}
    assert prom.value('sum(cpcoord_build_info{component="agent"})') == 2

    # The alert rules are loaded and evaluate without error.
    groups = prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    shipped = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    assert {r["name"] for r in rules} == {r["alert"] for g in shipped["groups"] for r in g["rules"]}
    wait_for(
        lambda: all(
            r.get("lastEvaluation", "").startswith("20")
            for r in prom.api("rules")["groups"][0]["rules"]
        ),
        20,
        "rules evaluated",
    )
    bad = [
        (r["name"], r.get("lastError"))
        for g in prom.api("rules")["groups"]
        for r in g["rules"]
        if r["health"] != "ok"
    ]
    assert not bad, bad

    # Every dashboard expression is valid PromQL here; size and downtime panels have data.
    for title, expr in dashboard_exprs():
        q = expr.replace("$job_name", ".*").replace("$__rate_interval", "1m")
        if "logical, stored and new" in title or "Frozen (downtime)" in title:
            # rate() needs two scrapes of a series: a fast run gets here after one.
            wait_for(lambda q=q: prom.query(q), 15, f"dashboard panel {title!r}: data for {q}")
        else:
            prom.query(q)
