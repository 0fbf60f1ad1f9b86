"""Pytest fixtures over coordinators and agents (testbed/cluster.py): `inproc` (an
in-process coordinator) and `cluster_factory` (real daemons), both on the store the test
session selects (`store_select`, tests/helpers/stores.py), torn down whatever happens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.cluster import Cluster, InProcessCoordinator
from testbed.stores import StoreArgs


@pytest.fixture
def inproc(
    tmp_path: Path, store_select: Callable[[Path], StoreArgs]
) -> Iterator[InProcessCoordinator]:
    c = InProcessCoordinator(tmp_path / "store", **store_select(tmp_path))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def cluster_factory(
    tmp_path: Path, store_select: Callable[[Path], StoreArgs]
) -> Iterator[Callable[..., Cluster]]:
    """`make(**Cluster fields)`: a started cluster on the selected store, unless the test
    passes `store_url` itself."""
    made: list[Cluster] = []

    def make(**kw: Any) -> Cluster:
        root = tmp_path / f"cluster{len(made)}"
        if "store_url" not in kw:  # the selected store; the test's own variables on top
            sel = store_select(root)
            env = {**sel.get("extra_env", {}), **kw.get("extra_env", {})}
            kw = {**sel, **kw, "extra_env": env}
        c = Cluster(root, **kw)
        c.root.mkdir(parents=True, exist_ok=True)
        made.append(c)
        return c.start()

    try:
        yield make
    finally:
        for c in made:
            c.close()
