"""The etcd client and one replica against a real etcd: leases and txns as the election
uses them; a follower refuses every call with the leader's address (NotLeader, exit 140)
and says so in health and metrics; it takes over when the leader's lease ends; stopping
it gives the lease back at once."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.ha.election import identity
from coordinator.ha.etcd import EtcdClient
from coordinator.store import Repository
from cpcoord.clientconn import Client
from cpcoord.errors import NotLeader
from cpcoord.gen.v1 import coordinator_pb2
from cpcoord.grpcopts import channel_options
from cpcoord.grpcutil import rpc_to_error
from testbed.daemons import REPO, Daemon, daemon_env, wait_for
from tests.helpers.etcd import EtcdServer, free_port
from tests.helpers.store_support import assert_restores, checkpoint, rand

pytestmark = [pytest.mark.integration]
PREFIX = "/ha-etcd-test"
KEY = f"{PREFIX}/leader".encode()


def test_client_leases_and_txns(etcd: EtcdServer) -> None:
    c = EtcdClient(f"http://127.0.0.1:{free_port()},{etcd.url}")  # a dead endpoint first
    lease, ttl = c.grant(3)
    assert ttl == 3
    won, kv = c.txn_create(b"/k", b"v1", lease)
    assert won and kv is not None and kv.lease == lease
    other, _ = c.grant(3)
    lost, holder = c.txn_create(b"/k", b"v2", other)
    assert not lost and holder is not None and holder.value == b"v1"
    assert holder.create_revision == kv.create_revision
    assert c.keepalive(lease) == 3
    assert c.txn_holds(b"/k", kv.create_revision, lease)
    assert not c.txn_holds(b"/k", kv.create_revision, other)
    assert not c.txn_holds(b"/k", kv.create_revision + 1, lease)
    c.revoke(lease)
    assert c.get(b"/k") is None  # the key went with its lease
    assert c.keepalive(lease) == 0
    c.revoke(lease)  # already gone: fine


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            out[name] = float(value)
    return out


def health(addr: str, service: str) -> int:
    with grpc.insecure_channel(addr, options=channel_options()) as ch:
        req = health_pb2.HealthCheckRequest(service=service)
        return int(health_pb2_grpc.HealthStub(ch).Check(req, timeout=5).status)


def test_follower_refuses_then_takes_over_then_resigns(etcd: EtcdServer, tmp_path: Path) -> None:
    client = EtcdClient(etcd.url)
    lease, _ = client.grant(3)
    won, _ = client.txn_create(KEY, identity("other.example:7420"), lease)
    assert won
    # "other" leads until the test lets its lease go: keep it alive meanwhile.
    let_go = threading.Event()

    def keep() -> None:
        while not let_go.wait(0.5):
            client.keepalive(lease)

    threading.Thread(target=keep, daemon=True).start()
    port_file, mport = tmp_path / "port", free_port()
    argv = [sys.executable, "-m", "cpcoord", "coordinator", "--listen", "127.0.0.1:0",
            "--store", str(tmp_path / "store"), "--port-file", str(port_file), "--insecure",
            "--etcd", etcd.url, "--etcd-prefix", PREFIX, "--metrics-port", str(mport)]  # fmt: skip
    d = Daemon("replica", argv, tmp_path / "replica.log", daemon_env())
    d.start()
    try:
        wait_for(port_file.exists, 30, "replica listening")
        addr = f"127.0.0.1:{int(port_file.read_text())}"
        wait_for(lambda: health(addr, "") == health_pb2.HealthCheckResponse.SERVING, 30, "up")

        # A follower: every call names the leader; the CLI exits 140.
        c = Client(addr, insecure=True, timeout=5)
        try:
            c.stub.ListJobs(coordinator_pb2.ListJobsRequest(), timeout=5)
            raise AssertionError("a follower answered ListJobs")
        except grpc.RpcError as rpc:
            err = rpc_to_error(rpc, "ListJobs", addr)
        assert isinstance(err, NotLeader) and err.leader == "other.example:7420"
        r = subprocess.run(
            [sys.executable, "-m", "cpcoord", "jobs", "--coordinator", addr, "--insecure",
             "--timeout", "2"],
            cwd=REPO, env=daemon_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode in (140, 70), r.stderr  # NotLeader, or the named leader unreachable
        assert health(addr, "cpcoord.v1.Coordinator") == health_pb2.HealthCheckResponse.NOT_SERVING
        m = scrape(mport)
        assert m["cpcoord_coordinator_is_leader"] == 0 and m["cpcoord_agents_connected"] == 0
        assert m["cpcoord_coordinator_term"] == 0

        # The leader's lease ends: this replica takes over.
        t0 = time.monotonic()
        let_go.set()
        client.revoke(lease)
        wait_for(lambda: scrape(mport)["cpcoord_coordinator_is_leader"] == 1, 15, "leading")
        assert time.monotonic() - t0 < 5
        m = scrape(mport)
        assert m["cpcoord_coordinator_term"] > 0 and m["cpcoord_coordinator_failovers_total"] == 1
        assert health(addr, "cpcoord.v1.Coordinator") == health_pb2.HealthCheckResponse.SERVING
        kv = client.get(KEY)
        assert kv is not None and json.loads(kv.value)["address"] == addr
        assert c.call("ListJobs", coordinator_pb2.ListJobsRequest()) is not None
        c.close()

        # SIGTERM: it resigns, the key is gone now, not after the TTL.
        t0 = time.monotonic()
        d.stop()
        assert d.proc is not None and d.proc.returncode == 0, d.tail()
        assert client.get(KEY) is None
        assert time.monotonic() - t0 < 3 + 10  # (stop itself waits up to 10 s)
    finally:
        let_go.set()
        d.kill()


def test_new_leader_adds_committed_generations_its_catalog_lacks(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """The store is the source of truth: a directory store whose catalog lost its newest
    generation (restored from an older backup) gets it back when a replica takes over."""
    store = tmp_path / "store"
    with Repository.open_local(store) as repo:
        checkpoint(repo, "j", {"m": {"r": rand(4, 1)}})
        checkpoint(repo, "j", {"m": {"r": rand(4, 2)}})
    db = sqlite3.connect(store / "catalog.sqlite")
    db.execute("DELETE FROM generations WHERE number = 2")
    db.commit()
    db.close()
    port_file = tmp_path / "port"
    argv = [sys.executable, "-m", "cpcoord", "--log-level", "info", "coordinator",
            "--listen", "127.0.0.1:0", "--store", str(store), "--port-file", str(port_file),
            "--insecure", "--etcd", etcd.url, "--etcd-prefix", PREFIX]  # fmt: skip
    d = Daemon("replica", argv, tmp_path / "replica.log", daemon_env())
    d.start()
    try:
        wait_for(port_file.exists, 30, "replica listening")
        addr = f"127.0.0.1:{int(port_file.read_text())}"
        with Client(addr, insecure=True, timeout=10) as c:
            req = coordinator_pb2.ListGenerationsRequest(job="j")
            got = wait_for(lambda: _generations(c, req), 30, "the replica leading")
        assert sorted(got) == [1, 2], got
        assert "restored=1" in d.log.read_text()
    finally:
        d.kill()
    with Repository.open_local(store) as repo:
        assert_restores(repo, "j", 2, {"m": {"r": rand(4, 2)}})


def _generations(c: Client, req: coordinator_pb2.ListGenerationsRequest) -> list[int] | None:
    try:
        return [g.number for g in c.call("ListGenerations", req).generations]
    except NotLeader:
        return None
