"""The engine driven directly: agent sessions without gRPC (their outbound queues read by
the test, their messages handed to agent_events), a real store in a temp dir.

Pins down what the engine adds to the protocol core: commands reach the right streams,
a broken stream aborts every generation in flight that needs the node (and only the
current stream of a node counts), full captures are asked for exactly the members whose
tracker does not count from the parent, deadlines and heartbeats fire from the timer,
an abort that races a commit never leaves the generation visible, and retention.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest

from coordinator import agent_events, ingest
from coordinator.agents import AgentSession
from coordinator.engine import CheckpointOptions, Engine, Options
from coordinator.flight import Flight, Subscription
from coordinator.membership import MemberRec, RegionDef
from coordinator.protocol import Generation
from coordinator.protocol.values import AbortReason, Spec
from coordinator.store import Manifest, MemberMap, PageTable, RegionMap, Repository, State
from cpcoord.errors import NoSuchGeneration
from cpcoord.gen.v1 import agent_pb2, common_pb2, manifest_pb2, types_pb2

PAGE = 4096
START = 0x10000000


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    repo = Repository.open_local(tmp_path / "store")
    e = Engine(repo, Options(keep=2, heartbeat_s=5.0))
    e.start()
    yield e
    e.close()
    repo.close()


class Node:
    """The agent end of one session, synchronous."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.name = name
        self.s: AgentSession = engine.connect(
            agent_pb2.Hello(node=name, protocol_version=1, page_size=PAGE), "test"
        )
        self.s.ready = True
        self.inbox: list[agent_pb2.CoordinatorMessage] = []

    def take(self, kind: str) -> list[Any]:
        while True:
            try:
                m = self.s._out.get_nowait()
            except Exception:
                break
            if m is not None:
                self.inbox.append(m)
        return [getattr(m, kind) for m in self.inbox if m.WhichOneof("body") == kind]

    def say(self, **body: object) -> None:
        agent_events.handle(self.engine, self.s, agent_pb2.AgentMessage(**body))  # type: ignore[arg-type]


def member(engine: Engine, job: str, name: str, node: str, pages: int = 4) -> None:
    with engine.lock:
        engine.members.add(
            MemberRec(job, name, node, 100, 1, (RegionDef("r", START, START + pages * PAGE),))
        )


def upload(engine: Engine, job: str, n: int, name: str, node: str, data: bytes) -> None:
    rows = np.frombuffer(data, np.uint8).reshape(-1, PAGE)
    k = rows.shape[0]
    ids = [blake3.blake3(r.tobytes()).digest() for r in rows]
    entries = manifest_pb2.PageEntries(
        page_offsets=np.arange(k, dtype="<u8").tobytes(),
        page_counts=np.ones(k, "<u4").tobytes(),
        chunk_skips=np.zeros(k, "<u4").tobytes(),
        chunk_ids=b"".join(ids),
    )
    sizes = np.full(k, PAGE, "<u4").tobytes()
    chunks = common_pb2.ChunkData(
        ids=b"".join(ids), methods=bytes(k), raw_sizes=sizes, stored_sizes=sizes, data=data
    )
    run = [types_pb2.PageRun(offset=0, count=k)]
    header = common_pb2.PagesHeader(
        job=job,
        generation=n,
        member=name,
        node=node,
        page_size=PAGE,
        full=True,
        regions=[
            types_pb2.Region(name="r", start=START, end=START + k * PAGE, pages=run, all_pages=run)
        ],
    )
    ingest.upload(
        engine,
        iter(
            [
                agent_pb2.UploadRequest(header=header),
                agent_pb2.UploadRequest(batch=common_pb2.PageBatch(entries=entries, chunks=chunks)),
                agent_pb2.UploadRequest(end=agent_pb2.UploadEnd()),
            ]
        ),
    )


def run_member(node: Node, job: str, n: int, name: str, data: bytes) -> None:
    node.say(staged=agent_pb2.Staged(job=job, generation=n, member=name))
    upload(node.engine, job, n, name, node.name, data)
    node.say(uploaded=agent_pb2.Uploaded(job=job, generation=n, member=name))


def outcome(sub: Subscription, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = sub.get(timeout=0.1)
        if p is not None and p.summary is not None:
            return p.summary.state + (f":{p.summary.reason}" if p.summary.reason else "")
    raise AssertionError("no outcome")


def test_checkpoint_flow_and_who_captures_in_full(engine: Engine) -> None:
    a, b = Node(engine, "node-a"), Node(engine, "node-b")
    member(engine, "j", "m1", "node-a")
    member(engine, "j", "m2", "node-b")
    data = {"m1": bytes(range(256)) * 64, "m2": bytes(4 * PAGE)}
    fulls = []
    for gen in (1, 2, 3):
        sub = engine.checkpoint(CheckpointOptions("j"))
        assert [f.members for f in a.take("freeze")][-1] == ["m1"]
        assert [f.members for f in b.take("freeze")][-1] == ["m2"]
        a.say(frozen=agent_pb2.Frozen(job="j", generation=gen))
        b.say(frozen=agent_pb2.Frozen(job="j", generation=gen))
        fulls.append((a.take("capture")[-1].full, b.take("capture")[-1].full))
        run_member(a, "j", gen, "m1", data["m1"])
        run_member(b, "j", gen, "m2", data["m2"])
        assert outcome(sub) == "committed"
        assert [c.generation for c in b.take("committed")][-1] == gen
        if gen == 2:  # m2's agent restarted: its tracker starts over
            with engine.lock:
                rec = engine.members.get("j", "m2")
                assert rec is not None and rec.committed == 2
                engine.members.update(replace(rec, committed=0))
    assert fulls == [(True, True), (False, False), (False, True)]
    assert engine.repo.manifest("j", 3).member("m1").region("r").pages.page_count == 4


def test_a_broken_stream_aborts_every_generation_that_needs_the_node(engine: Engine) -> None:
    a, b = Node(engine, "node-a"), Node(engine, "node-b")
    member(engine, "j1", "m1", "node-a")
    member(engine, "j1", "m2", "node-b")
    member(engine, "j2", "m3", "node-a")
    member(engine, "j3", "m4", "node-b")
    subs = {j: engine.checkpoint(CheckpointOptions(j)) for j in ("j1", "j2", "j3")}
    engine.disconnect(a.s, "connection reset")
    assert outcome(subs["j1"]) == outcome(subs["j2"]) == "aborted:agent_lost"
    assert [x.job for x in b.take("abort")] == ["j1"]
    assert engine.repo.catalog.get("j1", 1).state is State.ABORTED
    assert "j3" in engine.flights  # node-b's own job is untouched
    engine.cancel(engine.flights["j3"], "test over")
    assert outcome(subs["j3"]) == "aborted:cancelled"


def test_only_the_current_stream_of_a_node_counts(engine: Engine) -> None:
    old = Node(engine, "node-a")
    engine.disconnect(old.s, "gone")
    new = Node(engine, "node-a")
    member(engine, "j", "m", "node-a")
    sub = engine.checkpoint(CheckpointOptions("j"))
    engine.disconnect(old.s, "the old stream's callback fires late")
    assert engine.agents.current("node-a") is new.s
    assert "j" in engine.flights
    engine.cancel(engine.flights["j"], "done")
    assert outcome(sub) == "aborted:cancelled"


def test_deadlines_fire_from_the_timer(engine: Engine) -> None:
    Node(engine, "node-a")
    member(engine, "j", "m", "node-a")
    t0 = time.monotonic()
    sub = engine.checkpoint(CheckpointOptions("j", lease_ms=200, freeze_timeout_ms=100))
    assert outcome(sub) == "aborted:freeze_timeout"
    assert time.monotonic() - t0 < 2


def test_silent_agents_are_lost(tmp_path: Path) -> None:
    repo = Repository.open_local(tmp_path / "s")
    e = Engine(repo, Options(heartbeat_s=0.05))
    e.start()
    try:
        n = Node(e, "node-a")
        time.sleep(0.5)
        assert e.agents.current("node-a") is None
        assert n.take("heartbeat"), "heartbeats went out while it was connected"
    finally:
        e.close()
        repo.close()


def test_reports_about_another_nodes_member_are_refused(engine: Engine) -> None:
    a, b = Node(engine, "node-a"), Node(engine, "node-b")
    member(engine, "j", "m1", "node-a")
    member(engine, "j", "m2", "node-b")
    sub = engine.checkpoint(CheckpointOptions("j"))
    for n in (a, b):
        n.say(frozen=agent_pb2.Frozen(job="j", generation=1))
    a.say(staged=agent_pb2.Staged(job="j", generation=1, member="m2"))  # not a's member
    snap = engine.flights["j"].gen.snapshot
    assert snap.member("m2").state.value == "frozen"  # type: ignore[union-attr]
    b.say(staged=agent_pb2.Staged(job="j", generation=1, member="m2"))
    b.say(uploaded=agent_pb2.Uploaded(job="j", generation=1, member="m2"))  # no stream
    assert outcome(sub) == "aborted:bad_data"


def _commit_directly(repo: Repository, job: str) -> int:
    n = repo.begin(job)
    ids = np.zeros(1, dtype="V32")
    table = PageTable.of([0], [1], ids)
    m = Manifest(
        job,
        n,
        repo.catalog.get(job, n).parent,
        0,
        PAGE,
        (MemberMap("m", (RegionMap("r", START, START + PAGE, table),)),),
    )
    repo.commit(m)
    return n


def test_an_abort_racing_the_commit_never_leaves_it_visible(engine: Engine) -> None:
    n = _commit_directly(engine.repo, "j")  # the store flipped the row...
    spec = Spec("j", n, (("m", "node-a"),))
    f = Flight(Generation(spec), None, frozenset())
    engine._drop(f, AbortReason.COMMIT_TIMEOUT)  # ...and then the deadline fired
    with pytest.raises(NoSuchGeneration):
        engine.repo.catalog.get("j", n)
    assert engine.repo.generations("j") == []


def test_retention_keeps_the_newest_and_the_pinned(engine: Engine) -> None:
    nums = [_commit_directly(engine.repo, "j") for _ in range(5)]
    engine.repo.pin("j", nums[0], True)
    assert engine.retain("j") == nums[1:3]
    assert [g.number for g in engine.repo.generations("j")] == [nums[0], nums[3], nums[4]]
