"""Shared pytest configuration: CI strictness."""

from __future__ import annotations

import os

import pytest

# Target-process fixtures (target, target_factory): tests/helpers/fixtures.py;
# SeaweedFS S3 servers (seaweed, seaweed_private): tests/helpers/seaweed.py;
# which store (store_select, CPCOORD_TEST_STORE): tests/helpers/stores.py;
# coordinators and agents (inproc, cluster_factory): tests/helpers/cluster.py;
# a real etcd (etcd): tests/helpers/etcd.py; the uffd C target (c_target):
# tests/helpers/uffd_target.py; a second user (other_user): tests/helpers/localapi.py.
pytest_plugins = [
    "tests.helpers.fixtures",
    "tests.helpers.seaweed",
    "tests.helpers.stores",
    "tests.helpers.cluster",
    "tests.helpers.etcd",
    "tests.helpers.uffd_target",
    "tests.helpers.localapi",
]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, why: str) -> None:
    """Skip locally when a component is missing; in CI a missing component fails."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required component missing in CI: {why}")
    pytest.skip(why)
