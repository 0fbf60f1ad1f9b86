"""Address lists and following the leader (cpcoord/endpoints.py): what is retried where."""

from __future__ import annotations

import pytest

from cpcoord.endpoints import Endpoints, Failover, parse
from cpcoord.errors import (
    CoordinatorUnavailable,
    InvalidArgument,
    NoCoordinatorAddress,
    NotLeader,
    UnknownJob,
)


def test_parse() -> None:
    assert parse("a:1") == ("a:1",)
    assert parse(" a:1 , b:2,a:1,") == ("a:1", "b:2")
    assert parse("[::1]:7420") == ("[::1]:7420",)
    for bad in ("a", "a:", ":1", "a:x"):
        with pytest.raises(InvalidArgument):
            parse(bad)
    with pytest.raises(NoCoordinatorAddress):
        parse(" , ")


class Time:
    def __init__(self) -> None:
        self.t = 0.0
        self.slept: list[float] = []

    def sleep(self, d: float) -> None:
        self.slept.append(d)
        self.t += d


def failover(addrs: str, budget: float = 10.0) -> tuple[Endpoints, Failover, Time]:
    t = Time()
    eps = Endpoints(addrs)
    return eps, Failover(eps, budget, sleep=t.sleep, clock=lambda: t.t), t


def test_follows_the_named_leader_even_outside_the_list() -> None:
    eps, fo, t = failover("a:1,b:2")
    assert fo.retry(NotLeader("c:3"))
    assert eps.current == "c:3" and eps.addresses == ["a:1", "b:2", "c:3"]
    assert not t.slept


def test_unreachable_or_leaderless_moves_on_then_pauses_per_round() -> None:
    eps, fo, t = failover("a:1,b:2,c:3")
    assert fo.retry(CoordinatorUnavailable("a:1", "down")) and eps.current == "b:2"
    assert fo.retry(NotLeader("unknown")) and eps.current == "c:3"  # an election runs
    assert not t.slept
    assert fo.retry(CoordinatorUnavailable("c:3", "down")) and eps.current == "a:1"
    assert t.slept == [0.1]  # a whole round failed: wait, doubling
    for _ in range(3):
        fo.retry(NotLeader("unknown"))
    assert t.slept == [0.1, 0.2]


def test_a_stale_hint_naming_the_current_address_moves_on() -> None:
    eps, fo, _ = failover("a:1,b:2")
    assert fo.retry(NotLeader("a:1")) and eps.current == "b:2"


def test_gives_up_when_the_budget_is_spent() -> None:
    eps, fo, t = failover("a:1,b:2", budget=1.0)
    tries = 0
    while fo.retry(CoordinatorUnavailable(eps.current, "down")):
        tries += 1
        assert tries < 100
    assert t.t <= 1.0


def test_single_unreachable_address_fails_at_once_and_answers_are_final() -> None:
    _, fo, _ = failover("a:1")
    assert not fo.retry(CoordinatorUnavailable("a:1", "down"))
    _, fo, _ = failover("a:1,b:2")
    assert not fo.retry(UnknownJob("j"))  # the leader answered: not retried
