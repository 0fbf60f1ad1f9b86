"""Coordinator metrics as pure logic, each test on a fresh CollectorRegistry.

- the progress hook (`CoordinatorMetrics.on_progress`): phases, outcomes, abort reasons,
  per-flight marks dropped at the end, fed with made-up flights and progress items;
- the scrape-time collector (`StateCollector`) over a real engine on a real store in a
  temporary directory (generations committed through the store API, agent sessions added
  to the registry the way the servicer does): last generation per job, agents, the
  store's figures and their cache;
- conventions: names, units, `_total` counters, every metric documented in
  docs/metrics.md, and no library code on prometheus_client's global registry.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from coordinator import levels
from coordinator.agents import AgentSession
from coordinator.engine import Engine
from coordinator.flight import Progress, RunStats, Summary
from coordinator.ha.metrics import ReplicaCollector
from coordinator.membership import MemberRec
from coordinator.metrics import CoordinatorMetrics, StateCollector, install
from coordinator.protocol.messages import ProgressEvent
from coordinator.protocol.values import AbortReason, ProgressKind
from coordinator.store import Repository
from cpcoord.gen.v1 import agent_pb2
from nodeagent.daemon.metrics import install as agent_install
from tests.helpers.store_support import PS, checkpoint, rand

REPO = Path(__file__).resolve().parents[2]


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


@dataclass
class FakeUpload:
    node: str
    tracker: str
    full: bool
    pages: int
    zero_pages: int = 0


@dataclass
class FakeFlight:
    job: str
    number: int
    uploads: dict[str, Any] = field(default_factory=dict)


def prog(kind: ProgressKind, f: FakeFlight, elapsed: float, total: int = 2, **kw: Any) -> Progress:
    return Progress(ProgressEvent(kind, f.job, f.number, total=total, **kw), elapsed)


def test_phases_and_outcome_of_a_committed_generation() -> None:
    reg = CollectorRegistry()
    m = CoordinatorMetrics(reg)
    f = FakeFlight(
        "j",
        1,
        {"a": FakeUpload("n1", "uffd-wp", False, 7, 2), "b": FakeUpload("n2", "hash", True, 10)},
    )
    for kind, t in (
        (ProgressKind.FREEZE_SENT, 0.01),
        (ProgressKind.BARRIER, 0.1),
        (ProgressKind.MEMBER_STAGED, 0.2),
        (ProgressKind.MEMBER_STAGED, 0.35),
        (ProgressKind.MEMBER_UPLOADED, 0.5),
        (ProgressKind.MEMBER_UPLOADED, 0.6),
        (ProgressKind.CAPTURED, 0.6),
    ):
        m.on_progress(f, prog(kind, f, t))
    summary = Summary(None, "j", 1, None, "committed", run=RunStats(frozen_seconds=0.3))
    m.on_progress(f, Progress(ProgressEvent(ProgressKind.COMMITTED, "j", 1, total=2), 0.9, summary))

    def phase_sum(p: str) -> float | None:
        return sample(reg, "cpcoord_checkpoint_phase_seconds_sum", job_name="j", phase=p)

    assert phase_sum("freeze") == pytest.approx(0.1)
    assert phase_sum("capture") == pytest.approx(0.25)  # barrier to the second member staged
    assert phase_sum("upload") == pytest.approx(0.25)
    assert phase_sum("commit") == pytest.approx(0.3)
    assert (
        sample(reg, "cpcoord_checkpoints_total", job_name="j", outcome="committed", reason="") == 1
    )
    assert sample(reg, "cpcoord_checkpoint_frozen_seconds_sum", job_name="j") == pytest.approx(0.3)
    assert sample(
        reg, "cpcoord_checkpoint_duration_seconds_sum", job_name="j", outcome="committed"
    ) == pytest.approx(0.9)
    assert sample(reg, "cpcoord_pages_captured_total", job_name="j") == 17
    assert (
        sample(reg, "cpcoord_pages_changed_total", job_name="j") == 7
    )  # the full capture is not "changed"
    assert sample(reg, "cpcoord_pages_zero_total", job_name="j") == 2
    labels = {"job_name": "j", "node": "n1", "tracker": "uffd-wp", "mode": "incremental"}
    assert sample(reg, "cpcoord_member_captures_total", **labels) == 1
    labels = {"job_name": "j", "node": "n2", "tracker": "hash", "mode": "full"}
    assert sample(reg, "cpcoord_member_captures_total", **labels) == 1
    assert not m._marks, "a finished flight leaves no marks behind"


def test_aborts_by_reason_and_no_phase_that_did_not_end() -> None:
    reg = CollectorRegistry()
    m = CoordinatorMetrics(reg)
    f = FakeFlight("j", 3)
    m.on_progress(f, prog(ProgressKind.FREEZE_SENT, f, 0.0))
    m.on_progress(f, prog(ProgressKind.ABORTED, f, 2.0, reason=AbortReason.FREEZE_TIMEOUT))
    g = FakeFlight("j", 4)
    m.on_progress(g, prog(ProgressKind.BARRIER, g, 0.05))
    # No reason on the event: the summary's (e.g. the store's words after a restart).
    s = Summary(None, "j", 4, None, "aborted", reason="store_error")
    m.on_progress(g, Progress(ProgressEvent(ProgressKind.ABORTED, "j", 4), 0.4, s))
    assert (
        sample(
            reg,
            "cpcoord_checkpoints_total",
            job_name="j",
            outcome="aborted",
            reason="freeze_timeout",
        )
        == 1
    )
    assert (
        sample(
            reg, "cpcoord_checkpoints_total", job_name="j", outcome="aborted", reason="store_error"
        )
        == 1
    )
    assert (
        sample(reg, "cpcoord_checkpoints_total", job_name="j", outcome="committed", reason="")
        is None
    )
    assert sample(reg, "cpcoord_checkpoint_phase_seconds_count", job_name="j", phase="freeze") == 1
    assert (
        sample(reg, "cpcoord_checkpoint_phase_seconds_count", job_name="j", phase="capture") is None
    )
    assert sample(reg, "cpcoord_checkpoint_frozen_seconds_count", job_name="j") is None
    assert sample(reg, "cpcoord_generation_logical_bytes_total", job_name="j") is None
    assert not m._marks


@pytest.fixture
def engine(tmp_path: Path) -> Any:
    repo = Repository.open_local(tmp_path / "store")
    try:
        yield Engine(repo)
    finally:
        repo.close()


def hello(node: str, trackers: dict[str, bool]) -> agent_pb2.Hello:
    backends = [agent_pb2.TrackerBackend(name=n, available=ok) for n, ok in trackers.items()]
    return agent_pb2.Hello(node=node, protocol_version=1, trackers=backends)


def test_collector_last_generation_per_job_and_agents(engine: Engine) -> None:
    reg = CollectorRegistry()
    install(engine, reg, stats_min_interval_s=0)
    repo = engine.repo
    for job, seeds in (("a", (1, 2, 3)), ("b", (4,))):
        for s in seeds:
            checkpoint(repo, job, {"m": {"r": rand(8, s) + bytes(2 * PS)}})
    repo.pin("a", 2, True)
    for n in ("n1", "n2"):
        engine.agents.add(AgentSession(hello(n, {"uffd-wp": True, "soft-dirty": False}), "peer"))
    gone = engine.agents.current("n2")
    assert gone is not None
    gone.close("test")
    engine.agents.drop(gone)

    last_a = repo.catalog.get("a", 3)
    assert sample(reg, "cpcoord_last_generation_number", job_name="a") == 3
    assert sample(reg, "cpcoord_last_generation_number", job_name="b") == 1
    assert sample(reg, "cpcoord_last_generation_logical_bytes", job_name="a") == 10 * PS
    assert (
        sample(reg, "cpcoord_last_generation_stored_bytes", job_name="a")
        == last_a.sizes.bytes_stored
    )
    assert (
        sample(reg, "cpcoord_last_generation_new_bytes", job_name="a") == last_a.sizes.bytes_new > 0
    )
    assert sample(reg, "cpcoord_last_generation_pages", job_name="a") == 10
    assert sample(reg, "cpcoord_last_generation_zero_pages", job_name="a") == 2
    assert sample(reg, "cpcoord_last_generation_timestamp_seconds", job_name="a") == last_a.finished
    assert sample(reg, "cpcoord_generations", job_name="a") == 3
    assert sample(reg, "cpcoord_generations_pinned", job_name="a") == 1
    assert sample(reg, "cpcoord_agents_connected") == 1
    assert sample(reg, "cpcoord_node_connected", node="n1") == 1
    assert sample(reg, "cpcoord_node_connected", node="n2") == 0
    assert sample(reg, "cpcoord_node_tracker_available", node="n1", tracker="uffd-wp") == 1
    assert sample(reg, "cpcoord_node_tracker_available", node="n1", tracker="soft-dirty") == 0
    assert sample(reg, "cpcoord_node_tracker_available", node="n2", tracker="uffd-wp") is None

    st = repo.stats()
    assert sample(reg, "cpcoord_store_chunks") == st.chunks > 0
    assert sample(reg, "cpcoord_store_size_bytes") == st.pack_bytes
    assert sample(reg, "cpcoord_store_logical_bytes") == 4 * 10 * PS
    assert sample(reg, "cpcoord_store_dedup_ratio") == pytest.approx(st.dedup_ratio)
    assert sample(reg, "cpcoord_store_compression_ratio") == pytest.approx(st.compression_ratio)


def test_store_figures_exact_and_the_index_walk_throttled(engine: Engine) -> None:
    now = [0.0]
    reg = CollectorRegistry()
    col = StateCollector(engine, stats_min_interval_s=10, stats_max_age_s=60, clock=lambda: now[0])
    reg.register(col)
    calls = []
    real = engine.repo.stats

    def counting() -> Any:
        calls.append(1)
        return real()

    engine.repo.stats = counting  # type: ignore[method-assign]
    assert sample(reg, "cpcoord_store_chunks") == 0
    assert sample(reg, "cpcoord_store_dedup_ratio") is None  # an empty store has none
    assert len(calls) == 1
    checkpoint(engine.repo, "a", {"m": {"r": rand(4, 9)}})
    chunks = real().chunks
    now[0] = 5.0
    # Counts and sizes are exact at once; the walk waits for its minimum interval.
    assert sample(reg, "cpcoord_store_chunks") == chunks > 0
    assert sample(reg, "cpcoord_store_index_memory_bytes") == chunks * 49
    assert sample(reg, "cpcoord_store_dedup_ratio") is None and len(calls) == 1
    now[0] = 10.0
    assert sample(reg, "cpcoord_store_dedup_ratio") == pytest.approx(1.0)
    assert len(calls) == 2, "changed and 10 s old: walked again"
    now[0] = 59.0
    sample(reg, "cpcoord_store_chunks")
    assert len(calls) == 2, "unchanged: the last walk serves"
    now[0] = 70.0
    sample(reg, "cpcoord_store_chunks")
    assert len(calls) == 3, "60 s old: walked again"


def test_a_scrape_survives_a_closed_store(engine: Engine) -> None:
    reg = CollectorRegistry()
    install(engine, reg)
    engine.agents.add(AgentSession(hello("n1", {}), "peer"))
    engine.repo.close()
    assert sample(reg, "cpcoord_agents_connected") == 1  # the engine part still reports
    assert sample(reg, "cpcoord_last_generation_number", job_name="a") is None


# -- conventions ------------------------------------------------------------------------

NAME = re.compile(r"^cpcoord_[a-z][a-z0-9_]*[a-z0-9]$")
UNITS = ("_seconds", "_bytes", "_ratio", "_total", "_info")


def families(engine: Engine) -> list[Any]:
    reg = CollectorRegistry()
    m = install(engine, reg)
    checkpoint(engine.repo, "a", {"m": {"r": rand(4, 5)}})
    engine.agents.add(AgentSession(hello("n1", {"hash": True}), "peer"))
    engine.members.add(MemberRec(job="a", name="m", node="n1", pid=1))
    engine.recent[("a", 1)] = RunStats(frozen_seconds=0.01)  # what Engine._finish keeps
    engine.dataplane.record(
        [SimpleNamespace(data_path="direct", node="n1", bytes_stored_new=1, bytes_received=0)]
    )  # type: ignore[list-item]
    engine.dataplane.record_read("n1", 0, 4096)
    # Touch every labelled family once so it shows in a scrape.
    f = FakeFlight(
        "a", 1, {"m": FakeUpload("n1", "hash", True, 4), "m2": FakeUpload("n1", "hash", False, 1)}
    )
    for kind in (ProgressKind.BARRIER, ProgressKind.MEMBER_STAGED, ProgressKind.CAPTURED):
        m.on_progress(f, prog(kind, f, 0.1, total=1))
    info = engine.repo.catalog.get("a", 1)
    done = Summary(info, "a", 1, None, "committed", run=RunStats(frozen_seconds=0.01))
    m.on_progress(f, Progress(ProgressEvent(ProgressKind.COMMITTED, "a", 1, total=1), 0.2, done))
    m.on_progress(
        FakeFlight("a", 2),
        prog(ProgressKind.ABORTED, FakeFlight("a", 2), 0.1, reason=AbortReason.CANCELLED),
    )
    areg = CollectorRegistry()
    am = agent_install(areg, "hash")
    am.upload_chunks.labels("sent").inc()
    am.failures.labels("capture_failed").inc()
    am.captures.labels("hash", "full").inc()
    am.restore_read_bytes.labels("direct").inc()
    am.observe(  # an agent with --cache: its cache gauges and drain counters
        SimpleNamespace(  # type: ignore[arg-type]
            is_connected=lambda: True,
            members_held=lambda: 0,
            members_frozen=lambda: 0,
            cache_stats=lambda: (4096, 1, 8192, 0),
            partner_stats=lambda: (2048, 4096, 1),
        )
    )
    levels.STATS.add("n1", 4096, True)  # the coordinator's drain counters, labelled by node
    # A replica's own families (coordinator/ha/metrics.py), leading with this engine.
    hreg = CollectorRegistry()
    replica = SimpleNamespace(engine=engine, term=7, failovers=2, lost={"lease_lapsed": 1})
    hreg.register(ReplicaCollector(replica))  # type: ignore[arg-type]
    return [*reg.collect(), *areg.collect(), *hreg.collect()]


def documented() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, labels) from the tables of docs/metrics.md."""
    text = (REPO / "docs" / "metrics.md").read_text()
    rows = re.findall(r"^\|\s*`(cpcoord_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|([^|]*)\|", text, re.M)
    return {n: (t, {x.strip() for x in labels.split(",") if x.strip()}) for n, t, labels in rows}


def test_names_units_and_documentation(engine: Engine) -> None:
    fams = families(engine)
    docs = documented()
    seen = set()
    for fam in fams:
        name = fam.name + ("_total" if fam.type == "counter" else "")
        name = name + ("_info" if fam.type == "info" else "")
        seen.add(name)
        assert NAME.match(name), name
        assert not re.search(r"_(ms|milliseconds|kb|mb|percent)(_|$)", name), f"{name}: base units"
        if fam.type == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), f"{name}: only counters end in _total"
        if fam.type == "histogram":
            assert name.endswith("_seconds"), f"{name}: histograms here measure time"
        assert name in docs, f"{name} is not in docs/metrics.md"
        kind, labels = docs[name]
        assert kind == fam.type, f"{name}: docs say {kind}, it is a {fam.type}"
        got = {k for smp in fam.samples for k in smp.labels} - {"le"}
        assert got == labels, f"{name}: labels {sorted(got)}, docs say {sorted(labels)}"
        assert "job" not in got, f"{name}: `job` is Prometheus's own target label"
    # Documented but never exported (renamed or removed): the docs lie. The agent-only
    # families of the default instance are exported too (fresh AgentMetrics above).
    assert not set(docs) - seen, f"documented, not exported: {sorted(set(docs) - seen)}"
    assert any(n.endswith(UNITS) for n in seen)


def test_replica_metrics_follower_and_leader(engine: Engine) -> None:
    def scrape(r: SimpleNamespace) -> dict[str, float]:
        reg = CollectorRegistry()
        reg.register(ReplicaCollector(r))  # type: ignore[arg-type]
        return {
            s.name + "".join(f"{{{v}}}" for v in s.labels.values()): s.value
            for fam in reg.collect()
            for s in fam.samples
        }

    follower = scrape(SimpleNamespace(engine=None, term=0, failovers=1, lost={"resigned": 1}))
    assert follower["cpcoord_coordinator_is_leader"] == 0
    assert follower["cpcoord_coordinator_term"] == 0
    assert follower["cpcoord_agents_connected"] == 0  # agents stream to the leader only
    assert follower["cpcoord_coordinator_leadership_lost_total{resigned}"] == 1
    assert "cpcoord_jobs" not in follower  # no store open: no job or store figures
    engine.agents.add(AgentSession(hello("n1", {}), "peer"))
    leader = scrape(SimpleNamespace(engine=engine, term=9, failovers=2, lost={}))
    assert leader["cpcoord_coordinator_is_leader"] == 1
    assert leader["cpcoord_coordinator_term"] == 9
    assert leader["cpcoord_coordinator_failovers_total"] == 2
    assert leader["cpcoord_agents_connected"] == 1 and "cpcoord_jobs" in leader


KINDS = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}


def global_registry_uses(source: str, where: str) -> list[str]:
    """Places in `source` that would put metrics on prometheus_client's global registry."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "REGISTRY"
            and isinstance(node.value, ast.Name)
            and node.value.id == "prometheus_client"
        ):
            problems.append(f"{line}: prometheus_client.REGISTRY")
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == "prometheus_client"
            and any(a.name == "REGISTRY" for a in node.names)
        ):
            problems.append(f"{line}: imports REGISTRY")
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        name = fn.id if isinstance(fn, ast.Name) else getattr(fn, "attr", "")
        keywords = {k.arg for k in node.keywords}
        if name in KINDS and "registry" not in keywords and len(node.args) >= 2:
            problems.append(f"{line}: {name}(...) without registry=")
        if name == "start_http_server" and "registry" not in keywords:
            problems.append(f"{line}: start_http_server without registry=")
    return problems


def test_the_global_registry_scan_finds_offenders() -> None:
    bad = (
        "from prometheus_client import Counter, start_http_server\n"
        "C = Counter('x_total', 'doc', ['job'])\n"
        "start_http_server(9000)\n"
    )
    assert len(global_registry_uses(bad, "bad.py")) == 2
    good = "C = Counter('x_total', 'doc', registry=r)\nstart_http_server(1, registry=r)\n"
    assert global_registry_uses(good, "good.py") == []


def test_library_code_never_uses_the_global_registry() -> None:
    problems = []
    for pkg in ("cpcoord", "coordinator", "nodeagent"):
        for path in (REPO / pkg).rglob("*.py"):
            if "gen" in path.relative_to(REPO).parts:
                continue
            problems += global_registry_uses(path.read_text(), str(path.relative_to(REPO)))
    assert not problems, "\n".join(problems)
