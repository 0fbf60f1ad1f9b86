"""Which store a test's coordinator uses, chosen in one place: $CPCOORD_TEST_STORE.

`local` (the default): a directory in the test's tmp dir. `s3`: a fresh
`s3://BUCKET/PREFIX` on the session's SeaweedFS server (tests/helpers/seaweed.py), with
the catalog in a state directory of the test's own. The `store_select` fixture hands out
the store arguments (`store_url`, `extra_env`) of Cluster and InProcessCoordinator
(tests/helpers/cluster.py) for either; `open_store` and `store_objects` reach a store the
way its coordinator does, whatever it is (the S3 form of "open the store directory" and
"grep its files").

Every test that uses `store_select` (directly or through `inproc` / `cluster_factory`)
gets the `store` marker: scripts/test.sh runs `-m store` a second time with
CPCOORD_TEST_STORE=s3. Tests that start their own SeaweedFS (`seaweed`,
`seaweed_private` fixtures) are on S3 already and are left out of that pass.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from coordinator.store import Kind, Repository, StoreConfig
from coordinator.store.location import StoreLocation
from coordinator.store.s3 import S3Backend

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
    store_kind()  # a typo in the variable fails the session at once


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if "store_select" in names and not names & _OWN_S3:
            item.add_marker(pytest.mark.store)


StoreArgs = dict[str, Any]  # store_url / extra_env for Cluster and InProcessCoordinator


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


def _s3_backend(url: str, env: dict[str, str]) -> S3Backend:
    """The S3 backend of a store URL, with the endpoint and keys a daemon would take
    from `env` (the AWS variables), not from this process's environment."""
    loc = StoreLocation.parse(url)
    return S3Backend(
        loc.bucket,
        loc.prefix,
        endpoint_url=env.get("AWS_ENDPOINT_URL"),
        region=env.get("AWS_REGION"),
        access_key=env.get("AWS_ACCESS_KEY_ID"),
        secret_key=env.get("AWS_SECRET_ACCESS_KEY"),
    )


def state_dir(url: str, env: dict[str, str]) -> Path:
    """The local state directory (catalog, lock) of an S3 store a daemon opens with env."""
    assert "CPCOORD_STATE_DIR" in env, "an S3 test store needs CPCOORD_STATE_DIR in its env"
    # The coordinator's own rule (location.py), with the state directory it was given.
    with mock.patch.dict(os.environ, {"CPCOORD_STATE_DIR": env["CPCOORD_STATE_DIR"]}):
        return StoreLocation.parse(url).default_state_dir()


def open_store(
    directory: Path,
    store_url: str | None = None,
    env: dict[str, str] | None = None,
    config: StoreConfig | None = None,
) -> Repository:
    """The repository a coordinator started with these store arguments opens."""
    if store_url is None or not store_url.startswith("s3://"):
        return Repository.open_local(Path(store_url) if store_url else directory, config)
    env = env or {}
    backend = _s3_backend(store_url, env)
    try:
        return Repository(backend, state_dir(store_url, env), config)
    except BaseException:
        backend.close()
        raise


def store_objects(
    directory: Path, store_url: str | None = None, env: dict[str, str] | None = None
) -> Iterator[tuple[str, bytes]]:
    """(name, content) of everything a store holds: the files of a store directory, or
    every object under an S3 store's prefix plus the files of its local state directory
    (catalog, lock)."""
    if store_url is None or not store_url.startswith("s3://"):
        root = Path(store_url) if store_url else directory
        for p in sorted(root.rglob("*")):
            if p.is_file():
                yield str(p.relative_to(root)), p.read_bytes()
        return
    env = env or {}
    backend = _s3_backend(store_url, env)
    try:
        for kind in Kind:
            for o in list(backend.list(kind)):
                yield f"{kind.value}/{o.name}", backend.get(kind, o.name)
    finally:
        backend.close()
    state = state_dir(store_url, env)
    for p in sorted(state.rglob("*")) if state.exists() else ():
        if p.is_file():
            yield f"state/{p.relative_to(state)}", p.read_bytes()
