"""Pytest fixtures over the target program (registered in tests/conftest.py).

    def test_x(target_factory):
        t = target_factory(maps=["hot:64", "cold:16:anon:zero"], writers=["hot:4"])

`target_factory(**kwargs)` takes Target's arguments (testbed/driver.py) and kills
every target it made at teardown; `target` is one default target (mapping `data`, 64
stamped pages). File-backed mappings keep their files in the test's tmp_path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.driver import Target


@pytest.fixture
def target_factory(tmp_path: Path) -> Iterator[Callable[..., Target]]:
    made: list[Target] = []

    def make(**kwargs: Any) -> Target:
        kwargs.setdefault("tmpdir", tmp_path)
        t = Target(**kwargs)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


@pytest.fixture
def target(target_factory: Callable[..., Target]) -> Target:
    return target_factory()
