"""MemberTracker's arming rules (nodeagent/capture/trackstate.py), with fake backends: the one
`auto` fallback of the agent and the CLI chain (no process is touched)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from cpcoord.errors import TrackerFailed, TrackerUnavailable
from nodeagent.capture.trackstate import MemberTracker
from nodeagent.trackers import registry


class _Fake:
    def __init__(self, name: str, fails: dict[str, list[BaseException | None]]) -> None:
        self.name = name
        self._fails = fails
        self.forgotten = False

    def arm(self, fp: Any, mappings: Sequence[Any], maps: Sequence[Any] | None = None) -> None:
        e = self._fails[self.name].pop(0) if self._fails.get(self.name) else None
        if e is not None:
            raise e

    def collect(self, fp: Any, mappings: Sequence[Any], maps: Sequence[Any] | None = None) -> Any:
        raise TrackerFailed(self.name, "lost")

    def forget(self, fp: Any) -> None:
        self.forgotten = True


@pytest.fixture
def fails(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[BaseException | None]]:
    plan: dict[str, list[BaseException | None]] = {}

    def choose(name: str, exclude: frozenset[str] = frozenset()) -> str:
        if name != registry.AUTO:
            return name
        return next((n for n in registry.AUTO_ORDER if n not in exclude), registry.NONE)

    def create(name: str) -> Any:
        return None if name == registry.NONE else _Fake(name, plan)

    monkeypatch.setattr(registry, "choose", choose)
    monkeypatch.setattr(registry, "create", create)
    return plan


def test_auto_skips_a_failing_or_unavailable_backend_for_this_arm_only(
    fails: dict[str, list[BaseException | None]],
) -> None:
    fails["uffd-wp"] = [TrackerFailed("uffd-wp", "x"), None]
    fails["soft-dirty"] = [TrackerUnavailable("soft-dirty", "y")]
    t = MemberTracker(registry.AUTO)
    assert t.arm(None, [], []) == ""  # type: ignore[arg-type]
    assert t.armed and t.name == "hash"
    got = t.collect_or_arm(None, [], [], incremental=True)  # type: ignore[arg-type]
    assert isinstance(got, str) and "lost" in got  # lost track: dropped, armed afresh
    assert t.armed and t.name == "uffd-wp"  # the best one again, not excluded for good


def test_a_named_backend_that_fails_leaves_the_member_untracked_and_retries(
    fails: dict[str, list[BaseException | None]],
) -> None:
    fails["soft-dirty"] = [TrackerFailed("soft-dirty", "x"), None]
    t = MemberTracker("soft-dirty")
    assert t.arm(None, [], []).startswith("soft-dirty")  # type: ignore[arg-type]
    assert not t.armed and t.name == "soft-dirty"
    assert t.collect_or_arm(None, [], [], incremental=True) == ""  # type: ignore[arg-type]
    assert t.armed and t.arm_error == ""


def test_auto_with_nothing_that_arms_is_none(fails: dict[str, list[BaseException | None]]) -> None:
    for n in registry.AUTO_ORDER:
        fails[n] = [TrackerUnavailable(n, "no")]
    t = MemberTracker(registry.AUTO)
    assert t.arm(None, [], []) == "" and not t.armed  # type: ignore[arg-type]
    assert t.tracker is None and t.name == registry.NONE
