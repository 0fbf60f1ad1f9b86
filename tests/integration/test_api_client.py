"""The scheduler API end to end through `cpcoord.api.Client` only:
a real coordinator and real agents as processes, real targets with known memory.

Attach, checkpoint with its progress stream (freeze barrier, per-member staged and
uploaded, committed), generations, pages read back equal to the memory at the cut,
diff, pin, in-place restore, export, verify, gc, detach, and a Watch stream that saw it
all in order. Then the error cases, each mapped to its cpcoord error class, including a
checkpoint that aborts because an agent dies while it is in flight.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cpcoord.api import (
    AbortReason,
    Client,
    GenerationState,
    MemberHealth,
    ProgressEvent,
    ProgressKind,
    Watch,
    WatchEvent,
    WatchKind,
)
from cpcoord.errors import (
    CoordinatorStopping,
    CoordinatorUnavailable,
    DuplicateMember,
    GenerationAborted,
    GenerationStateError,
    InvalidArgument,
    JobBusy,
    NoCoordinatorAddress,
    NoSuchGeneration,
    NoSuchProcess,
    TooManyWatchers,
    UnknownJob,
)
from cpcoord.image import load_image, region_bytes
from testbed.cluster import Cluster, InProcessCoordinator
from testbed.daemons import wait_for
from testbed.driver import PAGE, Target, task_states

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Collector:
    """A Watch read on its own thread (as a dashboard would)."""

    def __init__(self, w: Watch) -> None:
        self.w = w
        self.events: list[WatchEvent] = []
        self.error: BaseException | None = None
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        try:
            for ev in self.w:
                self.events.append(ev)
        except BaseException as e:  # reported by stop()
            self.error = e

    def wait(
        self, kind: WatchKind, timeout: float = 60, after: int = 0, **match: object
    ) -> WatchEvent:
        """The first event of `kind` (with seq > `after`) whose fields match."""

        def found() -> WatchEvent | None:
            for ev in list(self.events):
                if ev.seq <= after or ev.kind is not kind:
                    continue
                if all(getattr(ev, k) == v for k, v in match.items()):
                    return ev
            return None

        return wait_for(found, timeout, f"watch event {kind} {match}")

    def stop(self) -> list[WatchEvent]:
        self.w.close()
        self.t.join(timeout=30)
        assert not self.t.is_alive(), "the watch did not end on close()"
        assert self.error is None, f"watch failed: {self.error!r}"
        return self.events


def attach(c: Client, job: str, member: str, t: Target, node: str) -> None:
    m = t.mapping("data")
    got = c.attach(job, member, t.pid, node=node, regions=[("data", m.addr, m.end)])
    assert got.name == member and got.node == node and got.pid == t.pid
    assert [(r.name, r.start, r.end) for r in got.regions] == [("data", m.addr, m.end)]


def assert_thawed(t: Target, what: str) -> None:
    """Not left stopped: no thread in a stop state within a few seconds (an agent may
    still be detaching right after the call returned), and it answers."""
    wait_for(
        lambda: not any(st in "tT" for st in task_states(t.pid).values()), 15, f"{what} thawed"
    )
    t.assert_running()


def memory_of(c: Client, job: str, n: int) -> dict[str, np.ndarray]:
    """Each member's region `data` of generation n, as (pages, PAGE) bytes."""
    out = {}
    for mp in c.read_generation(job, n):
        assert mp.generation == n and mp.page_size == PAGE
        r = mp.region("data")
        out[mp.member] = r.bytes_at(0, (r.end - r.start) // PAGE, PAGE)
    return out


def assert_progress(evs: list[ProgressEvent], members: set[str]) -> None:
    kinds = [e.kind for e in evs]
    assert kinds[0] is ProgressKind.FREEZE_SENT and kinds[-1] is ProgressKind.COMMITTED, kinds
    n = evs[0].generation
    assert all(e.generation == n for e in evs)
    barrier = kinds.index(ProgressKind.BARRIER)
    staged = {e.member: i for i, e in enumerate(evs) if e.kind is ProgressKind.MEMBER_STAGED}
    uploaded = {e.member: i for i, e in enumerate(evs) if e.kind is ProgressKind.MEMBER_UPLOADED}
    assert set(staged) == set(uploaded) == members, kinds
    assert all(barrier < staged[m] < uploaded[m] for m in members), kinds
    assert kinds.index(ProgressKind.CAPTURED) > max(uploaded.values())
    for e in evs:
        if e.kind in (ProgressKind.MEMBER_STAGED, ProgressKind.MEMBER_UPLOADED):
            assert e.node and e.stats is not None
    last = evs[-1]
    assert last.members_done == last.members_total == len(members)
    assert last.info is not None and last.info.committed and last.info.number == n


def test_whole_flow_through_the_client(
    cluster_factory: Callable[..., Cluster],
    target_factory: Callable[..., Target],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cl = cluster_factory(nodes=("node-a", "node-b"), keep=5)
    for k, val in cl.extra_env.items():  # an S3 store's variables: the client reads it too
        monkeypatch.setenv(k, val)
    ta = target_factory(maps=["data:64"])
    tb = target_factory(maps=["data:32:anon:random:5"])
    with Client(cl.address, insecure=True, timeout=60) as c:
        agents = {a.node: a for a in c.agents()}
        assert agents["node-a"].connected and agents["node-b"].connected
        assert any(t.available for t in agents["node-a"].trackers)
        watch = Collector(c.watch(["train"]))
        everything = Collector(c.watch(include_progress=True))

        attach(c, "train", "a", ta, "node-a")
        attach(c, "train", "b", tb, "node-b")
        (job,) = c.jobs()
        assert job.name == "train" and job.last_committed is None and job.in_flight == 0
        assert {m.name: m.health for m in job.members} == {
            "a": MemberHealth.RUNNING,
            "b": MemberHealth.RUNNING,
        }

        # 1: full, with the progress stream
        evs = list(c.checkpoint_events("train"))
        assert_progress(evs, {"a", "b"})
        g1 = evs[-1].info
        assert g1 is not None and g1.parent is None and g1.members == 2
        assert g1.pages_captured == 64 + 32 and g1.bytes_logical == (64 + 32) * PAGE
        cut1 = {"a": ta.read("data"), "b": tb.read("data")}

        # 2: incremental, through the blocking convenience
        ta.cmd("write", name="data", page=5, count=3, counter=7)
        seen: list[ProgressEvent] = []
        g2 = c.checkpoint("train", on_event=seen.append)
        assert_progress(seen, {"a", "b"})
        assert g2.committed and g2.number == 2 and g2.parent == 1
        assert 3 <= g2.pages_captured < 64 + 32
        cut2 = {"a": ta.read("data"), "b": tb.read("data")}
        assert not np.array_equal(cut1["a"], cut2["a"])

        gens = c.generations("train")
        assert [(g.number, g.state) for g in gens] == [
            (2, GenerationState.COMMITTED),
            (1, GenerationState.COMMITTED),
        ]
        d1 = c.generation("train", 1)
        assert d1.info.number == 1 and {m.member for m in d1.members} == {"a", "b"}
        ma = next(m for m in d1.members if m.member == "a")
        assert ma.node == "node-a" and ma.regions[0].start == ta.mapping("data").addr
        assert sum(n for _, n in ma.regions[0].pages) == 64
        assert c.job("train").last_committed is not None

        # pages read back equal the memory at each cut, byte for byte
        for n, cut in ((1, cut1), (2, cut2)):
            got = memory_of(c, "train", n)
            for name, want in cut.items():
                assert np.array_equal(got[name], want), f"generation {n} member {name} differs"
        assert np.array_equal(cut1["a"][:5], ta.expected("data", 0, 5))

        diff = {(d.member, d.region): d for d in c.diff("train", 1, 2)}
        assert diff[("a", "data")].changed == ((5, 3),) and diff[("a", "data")].pages_changed == 3
        assert sum(d.pages_changed for d in diff.values()) == 3

        # Both read paths (the packs read here, or through the coordinator) agree.
        for path in ("direct", "coordinator"):
            out = c.export("train", tmp_path / f"export-2-{path}", 2, data_path=path)
            im = load_image(out)
            assert np.array_equal(np.array(region_bytes(im, "a", "data")), cut2["a"])
        with pytest.raises(InvalidArgument, match="data path 'nearest'"):
            c.export("train", tmp_path / "export-x", 2, data_path="nearest")

        # pin, then in-place restore of generation 1 after scribbling over a
        assert c.pin("train", 1).pinned
        with pytest.raises(GenerationStateError) as ei:
            c.delete_generation("train", 1)
        assert ei.value.status == "FAILED_PRECONDITION" and "pinned" in str(ei.value)
        ta.cmd("write", name="data", page=0, count=64, counter=99)
        r = c.restore("train", 1)
        assert r.committed and r.generation == 1 and set(r.members) == {"a", "b"}
        assert np.array_equal(ta.read("data"), cut1["a"])
        assert np.array_equal(tb.read("data"), cut1["b"])
        assert_thawed(ta, "a after restore")
        assert_thawed(tb, "b after restore")

        # into a new process: member b's pages of generation 1, where its region lives now
        fresh = target_factory(maps=["data:32"])
        fm = fresh.mapping("data")
        ri = c.restore_into(
            "train",
            "b",
            fresh.pid,
            generation=1,
            node="node-b",
            regions=[("data", fm.addr, fm.end)],
        )
        assert ri.committed and ri.members == ("b",)
        assert np.array_equal(fresh.read("data"), cut1["b"])
        assert_thawed(fresh, "the process restored into")

        rep = c.verify()
        assert rep.ok and rep.generations == 2 and rep.chunks_checked > 0 and not rep.damage
        st = c.store_stats()
        assert st.generations == 2 and st.chunks > 0 and st.logical_bytes == 2 * (64 + 32) * PAGE

        assert not c.pin("train", 1, False).pinned
        gc = c.gc(keep=1)
        assert gc.dropped == (("train", 1),)
        assert [g.number for g in c.generations("train")] == [2]
        c.detach("train", "b")
        assert [m.name for m in c.job("train").members] == ["a"]

        watch.wait(WatchKind.MEMBER_DETACHED, member="b")
        everything.wait(WatchKind.MEMBER_DETACHED, member="b")
        events = watch.stop()
        full = everything.stop()

    # The job's watch: its events, in order, nothing lost, never a progress event.
    assert all(e.lost == 0 for e in events)
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(e.job == "train" or e.kind is WatchKind.GC_RAN for e in events)
    sequence: list[tuple[WatchKind, object]] = [(e.kind, e.member or e.generation) for e in events]
    expected: list[tuple[WatchKind, object]] = [
        (WatchKind.MEMBER_ATTACHED, "a"),
        (WatchKind.MEMBER_ATTACHED, "b"),
        (WatchKind.GENERATION_STARTED, 1),
        (WatchKind.GENERATION_FROZEN, 1),
        (WatchKind.GENERATION_COMMITTED, 1),
        (WatchKind.GENERATION_STARTED, 2),
        (WatchKind.GENERATION_FROZEN, 2),
        (WatchKind.GENERATION_COMMITTED, 2),
        (WatchKind.RESTORE_STARTED, 1),
        (WatchKind.RESTORE_ENDED, 1),
        (WatchKind.GENERATION_DELETED, 1),
        (WatchKind.GC_RAN, 0),
        (WatchKind.MEMBER_DETACHED, "b"),
    ]
    assert sequence == expected, sequence
    committed = [e for e in events if e.kind is WatchKind.GENERATION_COMMITTED]
    assert [e.info.number if e.info else 0 for e in committed] == [1, 2]
    assert committed[1].info is not None and committed[1].info.parent == 1
    gc_ev = next(e for e in events if e.kind is WatchKind.GC_RAN)
    assert gc_ev.gc is not None and gc_ev.gc.dropped == (("train", 1),)
    ended = next(e for e in events if e.kind is WatchKind.RESTORE_ENDED)
    assert ended.reason is AbortReason.UNSPECIFIED
    # The unfiltered watch with progress: every step of each checkpoint, as the caller saw.
    steps = [
        e.progress.kind
        for e in full
        if e.kind is WatchKind.CHECKPOINT_PROGRESS and e.progress and e.generation == 1
    ]
    assert steps == [e.kind for e in evs]
    assert any(e.kind is WatchKind.RESTORE_PROGRESS for e in full)


def test_errors_map_to_their_classes(
    cluster_factory: Callable[..., Cluster],
    target_factory: Callable[..., Target],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CPCOORD_COORDINATOR", raising=False)
    with pytest.raises(NoCoordinatorAddress):
        Client()
    with (
        Client("127.0.0.1:1", insecure=True, timeout=10) as dead,
        pytest.raises(CoordinatorUnavailable),
    ):
        dead.jobs()

    cl = cluster_factory(nodes=("node-a",))
    ta = target_factory(maps=["data:64"])
    with Client(cl.address, insecure=True, timeout=60) as c:
        with pytest.raises(UnknownJob):
            c.jobs("nope")
        with pytest.raises(UnknownJob):
            c.checkpoint("nope")
        with pytest.raises(InvalidArgument):
            c.attach("bad name!", "a", ta.pid)
        with pytest.raises(InvalidArgument):
            c.watch(["bad name!"])
        attach(c, "j", "a", ta, "node-a")
        with pytest.raises(DuplicateMember):
            attach(c, "j", "a", ta, "node-a")
        with pytest.raises(NoSuchProcess):
            c.attach("j", "ghost", 4_194_000, node="node-a")
        assert c.checkpoint("j").committed
        with pytest.raises(NoSuchGeneration):
            c.generation("j", 99)

        # A checkpoint in flight (the agent paused in its upload): the job is busy; the
        # agent dies; the generation aborts with AGENT_LOST, and the watch saw it all.
        w = Collector(c.watch())
        cl.restart_agent("node-a", pause=["agent.upload"])
        cl.wait_agents(["node-a"])
        wait_for(
            lambda: all(m.health is MemberHealth.RUNNING for m in c.job("j").members),
            60,
            "member running again",
        )
        result: list[BaseException] = []

        def run() -> None:
            try:
                c.checkpoint("j", lease_ms=5000)
            except BaseException as e:  # checked below
                result.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        cl.wait_fault("agent.upload", 60)
        with pytest.raises(JobBusy):
            c.checkpoint("j")
        with pytest.raises(JobBusy):
            c.detach("j", "a")
        cl.agents["node-a"].kill()
        t.join(timeout=120)
        assert not t.is_alive()
        assert len(result) == 1 and isinstance(result[0], GenerationAborted), result
        assert "agent_lost" in str(result[0])
        started = w.wait(WatchKind.GENERATION_STARTED, generation=2)
        gone = w.wait(WatchKind.AGENT_DISCONNECTED, after=started.seq, node="node-a")
        aborted = w.wait(WatchKind.GENERATION_ABORTED, generation=2)
        assert aborted.reason is AbortReason.AGENT_LOST
        assert gone.seq < aborted.seq  # the cause before its effect
        assert aborted.info is not None and aborted.info.state is GenerationState.ABORTED
        cl.start_agent("node-a")
        cl.wait_agents(["node-a"])
        w.wait(WatchKind.AGENT_CONNECTED, after=max(gone.seq, aborted.seq), node="node-a")
        assert [g.number for g in c.generations("j")] == [1]
        assert [g.number for g in c.generations("j", include_aborted=True)] == [2, 1]
        # A member whose process exits: MEMBER_GONE, and its health says so.
        doomed = target_factory(maps=["data:8"])
        attach(c, "j", "doomed", doomed, "node-a")
        doomed.close()  # SIGKILL
        ev = w.wait(WatchKind.MEMBER_GONE, member="doomed")
        assert ev.job == "j" and ev.node == "node-a" and ev.detail
        (m,) = [m for m in c.job("j").members if m.name == "doomed"]
        assert m.health is MemberHealth.GONE
        w.stop()
        ta.assert_running()


def test_watch_subscribes_before_returning_and_unsubscribes_on_close(
    inproc: InProcessCoordinator,
) -> None:
    bus = inproc.engine.events
    with Client(inproc.address, insecure=True, timeout=30) as c:
        w = c.watch(["j"])
        assert bus.watchers == 1  # subscribed once watch() returned: nothing is missed
        got = Collector(w)
        bus.publish("member_attached", job="j", member="m", node="n")
        bus.publish("member_attached", job="other", member="m", node="n")
        ev = got.wait(WatchKind.MEMBER_ATTACHED, job="j")
        assert ev.member == "m" and ev.node == "n"
        assert [e.job for e in got.stop()] == ["j"]
        wait_for(lambda: bus.watchers == 0, 30, "the server to drop the closed watch")

        # The coordinator stopping ends every watch with CoordinatorStopping.
        w2 = c.watch()
        bus.max_watchers = 1  # a full house: one more is refused, at watch() already
        with pytest.raises(TooManyWatchers):
            c.watch()
        failed: list[BaseException] = []

        def read() -> None:
            try:
                list(w2)
            except BaseException as e:  # checked below
                failed.append(e)

        t = threading.Thread(target=read, daemon=True)
        t.start()
        bus.close()
        t.join(timeout=30)
        assert not t.is_alive() and len(failed) == 1
        assert isinstance(failed[0], CoordinatorStopping), failed
