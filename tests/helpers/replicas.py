"""Coordinator replicas on a real etcd, as real daemons (tests/helpers/cluster.py's
`Cluster` with several coordinators). Torn down whatever happens.

    c = ReplicaCluster(root, etcd_url=etcd.url, replicas=3, nodes=("node-a",)).start()
    c.leader()                   # index of the replica that leads (from etcd's leader key)
    c.address                    # every replica's HOST:PORT, the first leader first
    c.kill_replica(i)            # SIGKILL
    c.wait_leader(exclude={i})   # (index, seconds) once another replica serves

The first replica starts alone and is waited for until it leads, so tests know the
first leader (and can give only it a fault hook); the others start after it. Agents and
the CLI get the whole address list, so they exercise following the leader.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Sequence, Set
from dataclasses import dataclass, field

import grpc

from coordinator.ha.etcd import EtcdClient
from cpcoord.clientconn import Client
from cpcoord.errors import CpcoordError
from cpcoord.gen.v1 import coordinator_pb2, coordinator_pb2_grpc
from cpcoord.grpcopts import channel_options
from testbed.cluster import Cluster
from testbed.daemons import Daemon, daemon_env, wait_for

PREFIX = "/cpcoord-test"


@dataclass
class ReplicaCluster(Cluster):
    etcd_url: str = ""
    replicas: int = 3
    leader_ttl: int = 3
    replica_daemons: list[Daemon] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # the address list, first leader first
    first_pause: Sequence[str] = ()  # fault hooks of replica 0 (the first leader) only
    first_hold: Sequence[str] = ()

    @property
    def address(self) -> str:
        return ",".join(self.order)

    def replica_address(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    # -- replicas -----------------------------------------------------------------------

    def start_coordinator(self, pause: Sequence[str] = (), hold: Sequence[str] = ()) -> None:
        """Replica 0 (with the fault hooks) until it leads, then the others."""
        pause, hold = pause or self.first_pause, hold or self.first_hold
        self.ports = [0] * self.replicas
        for i in range(self.replicas):
            self.start_replica(i, pause if i == 0 else (), hold if i == 0 else ())
            if i == 0:
                self.wait_leader(timeout=30)
        self.order = [self.replica_address(i) for i in range(self.replicas)]
        self.coordinator = self.replica_daemons[0]

    def start_replica(self, i: int, pause: Sequence[str] = (), hold: Sequence[str] = ()) -> None:
        port_file = self.root / f"replica{i}.port"
        port_file.unlink(missing_ok=True)
        argv = [
            sys.executable, "-m", "cpcoord", "--log-level", self.log_level, "coordinator",
            "--listen", f"127.0.0.1:{self.ports[i]}", "--store", str(self.store),
            "--keep", str(self.keep), "--port-file", str(port_file),
            "--heartbeat-ms", str(self.heartbeat_ms), "--insecure",
            "--etcd", self.etcd_url, "--etcd-prefix", PREFIX,
            "--leader-ttl", str(self.leader_ttl),
        ]  # fmt: skip
        env = daemon_env({"CPCOORD_FAULT_DIR": str(self.faults)})
        if pause:
            env["CPCOORD_FAULT_PAUSE"] = ",".join(pause)
        if hold:
            env["CPCOORD_FAULT_HOLD"] = ",".join(hold)
        d = Daemon(f"replica{i}", argv, self.root / f"replica{i}.log", env)
        if i < len(self.replica_daemons):
            self.replica_daemons[i] = d
        else:
            self.replica_daemons.append(d)
        d.start()
        self.ports[i] = d.wait_port(port_file)

    def leader_address(self) -> str:
        kv = EtcdClient(self.etcd_url, timeout_s=2).get(f"{PREFIX}/leader".encode())
        return str(json.loads(kv.value)["address"]) if kv is not None else ""

    def serving(self, i: int) -> bool:
        """Replica i answers the client API itself (as leader: a follower refuses)."""
        with grpc.insecure_channel(self.replica_address(i), options=channel_options()) as ch:
            try:
                coordinator_pb2_grpc.CoordinatorStub(ch).ListJobs(
                    coordinator_pb2.ListJobsRequest(), timeout=2
                )
            except grpc.RpcError:
                return False
        return True

    def leader(self) -> int | None:
        addr = self.leader_address()
        for i in range(len(self.ports)):
            if self.replica_address(i) == addr and self.replica_daemons[i].alive():
                return i
        return None

    def wait_leader(
        self, exclude: Set[int] = frozenset(), timeout: float = 30
    ) -> tuple[int, float]:
        """(replica index, seconds waited) once a replica not in `exclude` serves."""
        t0 = time.monotonic()
        found: list[int] = []

        def serves() -> bool:
            i = self.leader()
            if i is not None and i not in exclude and self.serving(i):
                found.append(i)
                return True
            return False

        wait_for(serves, timeout, "a serving leader")
        return found[-1], time.monotonic() - t0

    def kill_replica(self, i: int) -> None:
        self.replica_daemons[i].kill()

    # -- what Cluster does through "the" coordinator ---------------------------------------

    def agents_json(self) -> dict[str, bool]:
        try:
            with Client(self.address, insecure=True, timeout=5) as c:
                resp = c.call("ListAgents", coordinator_pb2.ListAgentsRequest())
        except CpcoordError:
            return {}
        return {a.node: a.connected for a in resp.agents}

    def stop_all(self) -> None:
        for d in self.replica_daemons:
            with contextlib.suppress(Exception):
                d.stop()

    def close(self) -> None:
        for d in self.agents.values():
            with contextlib.suppress(Exception):
                d.kill()
        for d in self.replica_daemons:
            with contextlib.suppress(Exception):
                d.kill()
        self.coordinator = None

    def logs(self) -> str:
        ds = [*self.replica_daemons, *self.agents.values()]
        return "\n".join(f"== {d.name}\n{d.tail()}" for d in ds)
