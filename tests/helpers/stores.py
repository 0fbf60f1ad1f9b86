"""Which store a test's coordinator uses, chosen in one place: $CPCOORD_TEST_STORE.

`local` (the default): a directory in the test's tmp dir. `s3`: a fresh
`s3://BUCKET/PREFIX` on the session's SeaweedFS server (tests/helpers/seaweed.py), with
the catalog in a state directory of the test's own. The `store_select` fixture hands out
the store arguments (`store_url`, `extra_env`) of Cluster and InProcessCoordinator
(testbed/cluster.py) for either; testbed/stores.py reaches a store the way its
coordinator does, whatever it is.

Every test that uses `store_select` (directly or through `inproc` / `cluster_factory`),
unless marked `not_about_store` (slow tests whose subject is not the store: they would
add minutes to CI and nothing about S3), gets the `store` marker: scripts/test.sh runs
`-m store` a second time with CPCOORD_TEST_STORE=s3. Tests that start their own
SeaweedFS (`seaweed`, `seaweed_private` fixtures) are on S3 already and are left out of
that pass.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.stores import StoreArgs

STORE_ENV = "CPCOORD_TEST_STORE"
STORE_KINDS = ("local", "s3")
# Fixtures that already put their store on S3 themselves: not run twice by the S3 pass.
_OWN_S3 = frozenset({"seaweed", "seaweed_private"})


def store_kind() -> str:
    """`local` or `s3`, from $CPCOORD_TEST_STORE (the only place it is read)."""
    kind = os.environ.get(STORE_ENV, "").strip().lower() or "local"
    if kind not in STORE_KINDS:
        raise pytest.UsageError(f"{STORE_ENV}={kind!r}: use one of {', '.join(STORE_KINDS)}")
    return kind


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"store: starts a coordinator on a store (rerun with {STORE_ENV}=s3)"
    )
    config.addinivalue_line(
        "markers",
        "not_about_store: uses a store, but its subject is elsewhere (the mappings, the "
        "freeze): not rerun by the S3 pass",
    )
    store_kind()  # a typo in the variable fails the session at once


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        about_store = item.get_closest_marker("not_about_store") is None
        if "store_select" in names and not names & _OWN_S3 and about_store:
            item.add_marker(pytest.mark.store)


@pytest.fixture
def store_select(request: pytest.FixtureRequest) -> Callable[[Path], StoreArgs]:
    """`store_select(root)`: the store arguments for a coordinator whose files live
    under `root`; on S3 each call gives a fresh prefix and a state directory in root."""
    if store_kind() == "local":
        return lambda root: {}
    sw = request.getfixturevalue("seaweed")

    def s3(root: Path) -> StoreArgs:
        env = {**sw.env(), "CPCOORD_STATE_DIR": str(root / "state")}
        return {"store_url": sw.url(), "extra_env": env}

    return s3
