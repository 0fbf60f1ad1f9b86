"""Shared pytest configuration: CI strictness."""

from __future__ import annotations

import os

# Before anything imports grpc: tests start children with a preexec_fn (fork, Python code,
# exec) while gRPC channels are live in this process; with gRPC's fork support on, its
# child-side fork handler restarts a poller whose epoll fd close_fds then closes, and the
# child aborts before exec (grpc/grpc#43055, "target exited (-6)" in the multinode tests).
# The daemons never fork without exec, and start children without a preexec_fn.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

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
