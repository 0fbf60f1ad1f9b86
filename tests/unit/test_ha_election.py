"""Leader election logic (coordinator/ha/election.py) against a scripted etcd and a
fake clock: when a leader may act, when it must stop, what the commit fence checks.
(The same code against a real etcd: tests/integration/test_ha_etcd.py.)"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from coordinator.ha.election import (
    EXPIRED,
    LAPSED,
    Elector,
    LeaseClock,
    Term,
    Timing,
    address_of,
    identity,
)
from coordinator.ha.etcd import KeyValue
from cpcoord.errors import EtcdUnavailable, InvalidArgument, LeadershipLost


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@dataclass
class FakeEtcd:
    """Just what the elector calls; `down` makes every call fail like a partition."""

    clock: Clock
    down: bool = False
    ttl_left: int = 3
    holder: KeyValue | None = None
    revision: int = 10
    calls: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "fake"

    def _check(self, what: str) -> None:
        self.calls.append(what)
        if self.down:
            raise EtcdUnavailable("fake", "partitioned")

    def get(self, key: bytes, timeout_s: float | None = None) -> KeyValue | None:
        self._check("get")
        return self.holder

    def grant(self, ttl_s: int, timeout_s: float | None = None) -> tuple[int, int]:
        self._check("grant")
        return 77, ttl_s

    def txn_create(
        self, key: bytes, value: bytes, lease: int, timeout_s: float | None = None
    ) -> tuple[bool, KeyValue | None]:
        self._check("txn_create")
        if self.holder is not None:
            return False, self.holder
        self.revision += 1
        self.holder = KeyValue(key, value, self.revision, self.revision, lease)
        return True, self.holder

    def keepalive(self, lease: int, timeout_s: float | None = None) -> int:
        self._check("keepalive")
        return self.ttl_left

    def txn_holds(
        self, key: bytes, create_revision: int, lease: int, timeout_s: float | None = None
    ) -> bool:
        self._check("txn_holds")
        h = self.holder
        return h is not None and (h.create_revision, h.lease) == (create_revision, lease)

    def revoke(self, lease: int, timeout_s: float | None = None) -> None:
        self._check("revoke")
        if self.holder is not None and self.holder.lease == lease:
            self.holder = None


@dataclass
class Owner:
    events: list[tuple[str, object]] = field(default_factory=list)

    def elected(self, term: Term) -> None:
        self.events.append(("elected", term))

    def deposed(self, kind: str, detail: str) -> None:
        self.events.append(("deposed", kind))

    def leader_seen(self, address: str) -> None:
        self.events.append(("leader", address))


def make() -> tuple[Elector, FakeEtcd, Owner, Clock]:
    clock = Clock()
    etcd = FakeEtcd(clock)
    owner = Owner()
    e = Elector(etcd, "/p", "me:1", owner, Timing(3), clock=clock)  # type: ignore[arg-type]
    e._stop.wait = lambda timeout=None: False  # type: ignore[method-assign]  # no sleeping
    return e, etcd, owner, clock


def test_timing_bounds_and_margin() -> None:
    t = Timing(3)
    assert t.keepalive_s == 0.75 and t.margin_s == 1.0
    assert t.keepalive_s < t.ttl_s - t.margin_s  # at least one renewal before stepping down
    for bad in (1, 61):
        with pytest.raises(InvalidArgument):
            Timing(bad)


def test_lease_clock_counts_from_when_the_keepalive_was_sent() -> None:
    c = LeaseClock(margin_s=1.0)
    assert not c.valid(0.0)
    c.renewed(sent_at=10.0, ttl_s=3)
    assert c.valid(11.99) and not c.valid(12.0)  # sent + TTL - margin
    c.renewed(sent_at=9.0, ttl_s=3)  # a late answer to an older keepalive never shortens
    assert c.valid(11.99)


def test_campaign_elects_and_names_itself() -> None:
    e, etcd, owner, _ = make()
    e._follow()
    term = e.term
    assert term is not None and term.number == 11 and term.lease == 77
    assert ("elected", term) in owner.events and ("leader", "me:1") in owner.events
    assert address_of(etcd.holder.value) == "me:1"  # type: ignore[union-attr]
    assert e.holds(term)


def test_follower_names_the_leader_and_does_not_campaign() -> None:
    e, etcd, owner, _ = make()
    etcd.holder = KeyValue(b"/p/leader", identity("other:2"), 5, 5, 9)
    e._follow()
    assert e.term is None and owner.events == [("leader", "other:2")]
    assert "grant" not in etcd.calls


def test_partitioned_leader_steps_down_before_its_lease_can_expire() -> None:
    e, etcd, owner, clock = make()
    e._follow()
    term = e.term
    assert term is not None
    e._lead()  # one successful renewal at t=100: valid until 102
    etcd.down = True
    clock.t = 101.0
    e._lead()  # fails, still valid
    assert e.holds(term)
    clock.t = 102.0  # sent + TTL - margin: the lease itself lasts until >= 103
    e._lead()
    assert e.term is None and ("deposed", LAPSED) in owner.events
    assert not e.holds(term)
    with pytest.raises(LeadershipLost):
        e.fence(term, ask_etcd=False)


def test_expired_lease_deposes_at_once() -> None:
    e, etcd, owner, _ = make()
    e._follow()
    etcd.ttl_left = 0
    e._lead()
    assert e.term is None and ("deposed", EXPIRED) in owner.events


def test_fence_asks_etcd_and_refuses_a_stale_term() -> None:
    e, etcd, _, clock = make()
    e._follow()
    term = e.term
    assert term is not None
    e.fence(term, ask_etcd=True)
    assert etcd.calls[-1] == "txn_holds"
    # Someone else's key now (the lease was lost and another replica won): refused.
    etcd.holder = KeyValue(b"/p/leader", identity("other:2"), 99, 99, 5)
    with pytest.raises(LeadershipLost, match="no longer belongs"):
        e.fence(term, ask_etcd=True)
    # etcd unreachable: refused too (a commit never goes ahead on a belief).
    etcd.holder, etcd.down = KeyValue(b"/p/leader", b"{}", term.number, term.number, 77), True
    with pytest.raises(LeadershipLost, match="did not confirm"):
        e.fence(term, ask_etcd=True)
    # Past the local deadline nothing is even asked.
    etcd.down, n = False, len(etcd.calls)
    clock.t += 10
    with pytest.raises(LeadershipLost):
        e.fence(term, ask_etcd=True)
    assert len(etcd.calls) == n


def test_resign_gives_the_key_back_and_sits_out_one_election() -> None:
    e, etcd, _, clock = make()
    e._follow()
    e.resign("cannot open the store")
    assert etcd.holder is None and e.term is None
    grants = etcd.calls.count("grant")
    e._follow()  # the key is free, but this replica stays out for a TTL
    assert e.term is None and etcd.calls.count("grant") == grants
    clock.t += 3
    e._follow()
    assert e.term is not None
