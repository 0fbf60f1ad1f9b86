"""Reach a coordinator's store from outside, whatever it is: a directory or an S3 prefix.

`open_store` opens the repository a coordinator started with the same store arguments
opens; `store_objects` lists everything the store holds (the S3 form of "grep its
files"); `state_dir` is the local state directory (catalog, lock) of an S3 store. Which
store a test uses is chosen in tests/helpers/stores.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from coordinator.store import Kind, Repository, StoreConfig
from coordinator.store.location import StoreLocation
from storecore.backend import Backend, LocalBackend
from storecore.s3 import S3Backend

StoreArgs = dict[str, Any]  # store_url / extra_env for Cluster and InProcessCoordinator


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


def store_backend(
    directory: Path, store_url: str | None = None, env: dict[str, str] | None = None
) -> Backend:
    """The backend of a test's store (a directory, or S3 with the daemons' variables)."""
    if store_url is None or not store_url.startswith("s3://"):
        return LocalBackend(Path(store_url) if store_url else directory, create=False)
    return _s3_backend(store_url, env or {})


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
