"""Random event orders against the protocol core's invariants (hypothesis state machines).

Two machines. `Chaos` fires any well-formed event in any order, legal or not, and checks
that refusals change nothing and that the invariants hold whatever gets through. `World`
plays agents that follow the protocol, with failures (lost agents, dead members, store
errors, stalls) injected at random points, and checks liveness: with no failure the
generation commits; with one it aborts; with time it never stays in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from coordinator.protocol import Generation
from coordinator.protocol.messages import (
    AgentFrozen,
    AgentLost,
    Begin,
    Cancel,
    Command,
    Commit,
    DropGeneration,
    EmitProgress,
    Event,
    FreezeFailed,
    MemberFailed,
    MemberGone,
    MemberRestored,
    MemberStaged,
    MemberUploaded,
    SendAbort,
    SendCapture,
    SendCommitted,
    SendFreeze,
    SendRestore,
    SendThaw,
    StoreCommitted,
    StoreFailed,
    Tick,
)
from coordinator.protocol.values import (
    AGENT_REASONS,
    AbortReason,
    GenState,
    Kind,
    MemberState,
    ProgressKind,
    Spec,
    Stats,
    Timing,
)
from cpcoord.errors import CpcoordError

TERMINAL = (GenState.COMMITTED, GenState.ABORTED)
ABORT_COMMANDS = (SendAbort, DropGeneration)
NODES = ("n1", "n2", "n3")


@st.composite
def layouts(draw: st.DrawFn) -> dict[str, str]:
    n = draw(st.integers(1, 5))
    return {f"m{i}": draw(st.sampled_from(NODES)) for i in range(n)}


@dataclass
class Record:
    """Everything that went in and came out, for the invariants."""

    begun_at: float | None = None
    commands: list[tuple[GenState, Command]] = field(default_factory=list)
    aborted_seen: bool = False
    store_committed: bool = False
    lost: set[str] = field(default_factory=set)


class Base(RuleBasedStateMachine):
    gen: Generation
    now: float
    rec: Record

    def setup_gen(self, layout: dict[str, str], kind: Kind, full: bool) -> None:
        timing = Timing(lease_s=10.0, freeze_timeout_s=5.0, commit_timeout_s=30.0)
        self.gen = Generation(Spec.of("job", 3, layout, kind=kind, full=full, timing=timing))
        self.layout = layout
        self.now = 0.0
        self.rec = Record()

    def fire(self, event: Event) -> list[Command]:
        before = self.gen.snapshot
        was_terminal = self.gen.terminal
        try:
            cmds = self.gen.handle(event)
        except CpcoordError:
            assert self.gen.snapshot == before, "a refused event changed the state"
            return []
        after = self.gen.snapshot
        if was_terminal:
            assert after.state is before.state, "a terminal state changed"
        if isinstance(event, Begin):
            self.rec.begun_at = event.now
        if isinstance(event, AgentLost):
            self.rec.lost.add(event.node)
        if isinstance(event, StoreCommitted) and after.state is GenState.COMMITTED:
            self.rec.store_committed = True
        self.check_step(before.state, after.state, event, cmds)
        self.rec.commands += [(after.state, c) for c in cmds]
        self.rec.aborted_seen = self.rec.aborted_seen or after.state is GenState.ABORTED
        return cmds

    def check_step(
        self, before: GenState, after: GenState, event: Event, cmds: list[Command]
    ) -> None:
        snap = self.gen.snapshot
        if (before is GenState.ABORTED or self.rec.aborted_seen) and cmds:
            raise AssertionError(f"commands after ABORTED: {cmds}")
        if after is GenState.ABORTED and before is not GenState.ABORTED:
            for c in cmds:  # the abort transition emits only abort-related commands
                assert isinstance(c, ABORT_COMMANDS) or (
                    isinstance(c, EmitProgress) and c.event.kind is ProgressKind.ABORTED
                ), c
        for c in cmds:
            node = getattr(c, "node", None)
            assert node is None or node not in snap.lost, f"{c} sent to a lost node"
            if isinstance(c, SendCapture | SendRestore):  # the barrier
                assert all(m.state is MemberState.FROZEN for m in snap.members)
            if isinstance(c, Commit):
                assert all(m.state is MemberState.UPLOADED for m in snap.members)
            if isinstance(c, SendFreeze):
                assert isinstance(event, Begin)
        if isinstance(event, Tick) and self.rec.begun_at is not None:
            d = snap.deadlines
            assert d is not None
            if event.now >= d.commit_at:
                assert self.gen.terminal, "past the commit deadline and still in flight"
            if event.now >= d.freeze_at:
                assert snap.state is not GenState.PREPARING
            if event.now >= d.lease_at and not self.gen.terminal:
                frozen = [
                    m for m in snap.members if m.state in (MemberState.PENDING, MemberState.FROZEN)
                ]
                assert not frozen and snap.spec.kind is Kind.CHECKPOINT, "past the lease"

    @invariant()
    def outcomes_are_whole(self) -> None:
        snap = self.gen.snapshot
        sent = [c for _, c in self.rec.commands]
        commits = [c for c in sent if isinstance(c, Commit)]
        once = [(type(c), getattr(c, "node", "")) for c in sent if not isinstance(c, EmitProgress)]
        assert len(once) == len(set(once)), f"a command went twice to one node: {once}"
        if snap.state is GenState.COMMITTED:
            assert all(m.state is snap.spec.done_state for m in snap.members)
            if snap.spec.kind is Kind.CHECKPOINT:
                assert commits and self.rec.store_committed
        if any(isinstance(c, SendCommitted | SendThaw) for c in sent):
            assert snap.state is GenState.COMMITTED
        if self.gen.terminal:
            self.every_frozen_member_was_released(sent)

    def every_frozen_member_was_released(self, sent: list[Command]) -> None:
        """Each member sent Freeze got Capture (Restore) or Abort, or its agent is gone
        (the kernel releases a dead tracer's tracees)."""
        for c in sent:
            if not isinstance(c, SendFreeze):
                continue
            for m in c.members:
                released = any(
                    getattr(x, "node", None) == c.node
                    and (isinstance(x, SendAbort) or m in getattr(x, "members", ()))
                    and isinstance(x, SendAbort | SendCapture | SendRestore)
                    for x in sent
                )
                assert released or c.node in self.gen.snapshot.lost, (m, c.node)

    def legal_events(self) -> list[Event]:
        snap = self.gen.snapshot
        if snap.state is GenState.CAPTURED:
            return [StoreCommitted()]
        out: list[Event] = []
        for m in snap.members:
            if m.node in snap.lost:
                continue
            if m.state is MemberState.PENDING:
                out.append(AgentFrozen(m.node, (m.name,)))
            elif snap.state is GenState.FROZEN and snap.spec.kind is Kind.RESTORE:
                if m.state is MemberState.FROZEN:
                    out.append(MemberRestored(m.node, m.name))
            elif snap.state is GenState.FROZEN and m.state is MemberState.FROZEN:
                out.append(MemberStaged(m.node, m.name, Stats(pages=1)))
            elif snap.state is GenState.FROZEN and m.state is MemberState.STAGED:
                out.append(MemberUploaded(m.node, m.name))
        return out

    def teardown(self) -> None:
        # No generation stays in flight: time alone ends it.
        if self.gen.state is GenState.NEW:
            return
        self.fire(Tick(self.now + 1e6))
        assert self.gen.terminal
        self.every_frozen_member_was_released([c for _, c in self.rec.commands])


class Chaos(Base):
    @initialize(
        layout=layouts(), kind=st.sampled_from(Kind), full=st.booleans(), begun=st.booleans()
    )
    def init(self, layout: dict[str, str], kind: Kind, full: bool, begun: bool) -> None:
        self.setup_gen(layout, kind, full)
        if begun:
            self.fire(Begin(0.0))

    @staticmethod
    def rare(data: st.DataObject) -> bool:
        """Failures fire on one draw in six, so that runs also get deep into the flow."""
        return data.draw(st.sampled_from((False,) * 5 + (True,)))

    def pick(self, data: st.DataObject) -> tuple[str, str]:
        member = data.draw(st.sampled_from(sorted(self.layout)))
        wrong = data.draw(st.integers(0, 9)) == 0  # sometimes a member on the wrong node
        return member, data.draw(st.sampled_from(NODES)) if wrong else self.layout[member]

    @rule(data=st.data(), burst=st.integers(1, 8))
    def legal(self, data: st.DataObject, burst: int) -> None:
        """Steps the protocol expects, so that runs get deep into the flow."""
        for _ in range(burst):
            new = self.gen.state is GenState.NEW
            todo: list[Event] = [Begin(self.now)] if new else self.legal_events()
            # The store answers through its own rule, so a run may sit in CAPTURED.
            todo = [e for e in todo if not isinstance(e, StoreCommitted)]
            if not todo:
                return
            self.fire(data.draw(st.sampled_from(todo)))

    @rule(eps=st.sampled_from([-1e-3, 0.0, 1e-3]))
    def deadline(self, eps: float) -> None:
        """Time jumps to just before, at or after the next deadline."""
        at = self.gen.next_deadline()
        if at is not None and at + eps >= self.now:
            self.now = at + eps
            self.fire(Tick(self.now))

    @rule(dt=st.floats(0, 20))
    def begin(self, dt: float) -> None:
        self.now += dt
        self.fire(Begin(self.now))

    @rule(data=st.data(), everything=st.booleans())
    def frozen(self, data: st.DataObject, everything: bool) -> None:
        m, n = self.pick(data)
        self.fire(AgentFrozen(n, () if everything else (m,)))

    @rule(data=st.data(), kind=st.sampled_from([MemberStaged, MemberUploaded, MemberRestored]))
    def report(self, data: st.DataObject, kind: type[MemberStaged]) -> None:
        m, n = self.pick(data)
        self.fire(kind(n, m, Stats(pages=data.draw(st.integers(0, 9)))))

    @rule(data=st.data(), reason=st.sampled_from(sorted(AGENT_REASONS)))
    def failed(self, data: st.DataObject, reason: object) -> None:
        if not self.rare(data):
            return
        m, n = self.pick(data)
        self.fire(MemberFailed(n, m, reason))  # type: ignore[arg-type]

    @rule(data=st.data())
    def freeze_failed(self, data: st.DataObject) -> None:
        if not self.rare(data):
            return
        self.fire(FreezeFailed(*self.pick(data)[::-1]))

    @rule(data=st.data())
    def gone(self, data: st.DataObject) -> None:
        if not self.rare(data):
            return
        m, n = self.pick(data)
        self.fire(MemberGone(n, m))

    @rule(data=st.data(), node=st.sampled_from(NODES))
    def lost(self, data: st.DataObject, node: str) -> None:
        if self.rare(data):
            self.fire(AgentLost(node))

    @rule(dt=st.one_of(st.floats(0, 1), st.floats(0, 40)))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.fire(Tick(self.now))

    @rule()
    def store_committed(self) -> None:
        self.fire(StoreCommitted())

    @rule(data=st.data())
    def store_failed(self, data: st.DataObject) -> None:
        if self.rare(data):
            self.fire(StoreFailed("disk"))

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        if self.rare(data):
            self.fire(Cancel())


class World(Base):
    """Agents that follow the protocol; `fault` decides if and when something breaks."""

    @initialize(
        layout=layouts(),
        kind=st.sampled_from(Kind),
        fault=st.sampled_from(["none", "lost", "gone", "failed", "store", "stall"]),
        when=st.integers(0, 12),
    )
    def init(self, layout: dict[str, str], kind: Kind, fault: str, when: int) -> None:
        self.setup_gen(layout, kind, full=False)
        self.fault, self.when, self.steps = fault, when, 0
        self.fire(Begin(0.0))

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        if self.gen.terminal:
            self.fire(Tick(self.now))  # late ticks change nothing
            return
        self.steps += 1
        self.now += data.draw(st.floats(0, 0.2))
        if self.steps == self.when and self.fault != "none":
            self.inject(data)
            return
        if self.fault == "stall" and self.steps > self.when:
            self.fire(Tick(self.now + 5.0))  # the world stopped answering: only time
            self.now += 5.0
            return
        todo = self.legal_events()
        self.fire(data.draw(st.sampled_from(todo)) if todo else Tick(self.now))

    def inject(self, data: st.DataObject) -> None:
        if self.fault == "stall":
            return  # from now on only time passes (see step)
        m = data.draw(st.sampled_from(sorted(self.layout)))
        n = self.layout[m]
        event: Event = {
            "lost": AgentLost(n),
            "gone": MemberGone(n, m),
            "failed": MemberFailed(n, m, AbortReason.CAPTURE_FAILED),
            "store": StoreFailed("EIO"),
        }[self.fault]
        rec = self.gen.snapshot.member(m)
        assert rec is not None
        fatal = rec.state is not self.gen.snapshot.spec.done_state
        if self.fault == "gone" and self.gen.snapshot.spec.kind is Kind.CHECKPOINT:
            fatal = rec.state in (MemberState.PENDING, MemberState.FROZEN)
        if self.fault == "store":
            fatal = True
        self.fire(event)
        if fatal and self.gen.state is not GenState.COMMITTED:
            assert self.gen.state is GenState.ABORTED, (self.fault, rec.state)

    def teardown(self) -> None:
        injected = self.fault != "none" and self.steps >= self.when
        if not (self.fault == "stall" and injected):
            # The agents play on: every generation ends by itself, and one that met no
            # failure commits.
            for _ in range(100):
                if self.gen.terminal:
                    break
                todo = self.legal_events()
                assert todo, f"stuck without a failure: {self.gen.snapshot}"
                self.fire(todo[0])
            assert self.gen.terminal
            if not injected:
                assert self.gen.state is GenState.COMMITTED, self.gen.snapshot
        super().teardown()


SETTINGS = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestChaos = Chaos.TestCase
TestChaos.settings = SETTINGS
TestWorld = World.TestCase
TestWorld.settings = SETTINGS
