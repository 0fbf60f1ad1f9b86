"""Coordinators and agents for integration tests and benchmarks, torn down whatever happens.

- `InProcessCoordinator`: the real server (engine, servicers, store) on a loopback port
  inside this process; fast, for API and protocol tests with scripted agents.
- `Cluster`: real daemons as subprocesses, `cpcoord coordinator` and N `cpcoord agent`
  (loopback, plaintext), with their logs under its root, fault hooks through the
  environment (cpcoord/faults.py), kill/restart of any of them, and the `cpcoord` CLI
  run as a subprocess against them (`cli(...)`, `cli_json(...)`).

The store is a directory under the root unless `store_url` names another (the tests pick
one in tests/helpers/stores.py: $CPCOORD_TEST_STORE); `Cluster.open_repository()` and
`Cluster.store_objects()` reach it the same way whatever it is. The pytest fixtures
(`inproc`, `cluster_factory`) are in tests/helpers/cluster.py.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from coordinator.engine import Engine, Options
from coordinator.server import Deps, create_server
from coordinator.store import Repository, StoreConfig
from cpcoord.gen.v1 import coordinator_pb2_grpc
from cpcoord.grpcopts import channel_options
from testbed.daemons import REPO, Daemon, daemon_env, wait_for
from testbed.stores import open_store, state_dir, store_objects


def attach_args(
    job: str, member: str, pid: int, node: str | None = None, ranges: Iterable[tuple[int, int]] = ()
) -> list[str]:
    """`cpcoord attach` arguments (without --coordinator)."""
    args = ["attach", "--job", job, "--member", member, "--pid", str(pid)]
    if node is not None:
        args += ["--node", node]
    for start, end in ranges:
        args += ["--range", f"{start:#x}-{end:#x}"]
    return args


class InProcessCoordinator:
    def __init__(
        self,
        store: Path,
        options: Options | None = None,
        store_url: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.store = store
        self.options = options or Options(heartbeat_s=0.5)
        self.repo = open_store(store, store_url, extra_env)
        self.engine = Engine(self.repo, self.options)
        self.server, self.port = create_server("127.0.0.1:0", Deps(self.engine))
        self.engine.start()
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address, options=channel_options())
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.engine.close()
        self.server.stop(grace=1).wait()
        self.repo.close()


# -- subprocesses -------------------------------------------------------------------------


@dataclass
class Cluster:
    """A coordinator and agents as real processes. Start with `start()`."""

    root: Path
    nodes: Sequence[str] = ("node-a", "node-b")
    keep: int = 5
    heartbeat_ms: int = 1000  # agents lost after 3 silent intervals: generous under load
    log_level: str = "info"
    coordinator: Daemon | None = None
    agents: dict[str, Daemon] = field(default_factory=dict)
    agent_args: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per node, kept
    port: int = 0
    store_url: str | None = None  # e.g. s3://bucket/prefix; default: a directory under root
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. the AWS variables
    state_dir: Path | None = None  # the coordinator's --state-dir (catalog, lock)
    # Each agent's environment: extra_env (an S3 store's variables: agents on the direct
    # data path reach the store themselves), then its node's own (e.g. a bad endpoint).
    agent_env: dict[str, dict[str, str]] = field(default_factory=dict)
    coordinator_args: tuple[str, ...] = ()  # more `cpcoord coordinator` flags (--metrics-port)

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def faults(self) -> Path:
        return self.root / "faults"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def on_s3(self) -> bool:
        return bool(self.store_url and self.store_url.startswith("s3://"))

    @property
    def local_dir(self) -> Path:
        """What the store keeps on this machine: the store directory, or an S3 store's
        state directory (catalog, lock)."""
        if self.on_s3:
            assert self.store_url is not None
            return state_dir(self.store_url, self.extra_env)
        return self.store

    def open_repository(self, config: StoreConfig | None = None) -> Repository:
        """The store as the coordinator opens it (stop the coordinator first: the
        catalog is locked while it runs)."""
        return open_store(self.store, self.store_url, self.extra_env, config)

    def store_objects(self) -> Iterator[tuple[str, bytes]]:
        """(name, content) of every file or object of the store (see store_objects)."""
        return store_objects(self.store, self.store_url, self.extra_env)

    def start(self) -> Cluster:
        self.faults.mkdir(parents=True, exist_ok=True)
        self.start_coordinator()
        for n in self.nodes:
            self.start_agent(n)
        self.wait_agents(self.nodes)
        return self

    # -- coordinator ---------------------------------------------------------------------

    def start_coordinator(self, pause: Sequence[str] = ()) -> None:
        port_file = self.root / "coordinator.port"
        port_file.unlink(missing_ok=True)
        listen = f"127.0.0.1:{self.port}"  # the same port after a restart: agents redial it
        argv = [
            sys.executable,
            "-m",
            "cpcoord",
            "--log-level",
            self.log_level,
            "coordinator",
            "--listen",
            listen,
            "--store",
            self.store_url or str(self.store),
            "--keep",
            str(self.keep),
            "--port-file",
            str(port_file),
            "--heartbeat-ms",
            str(self.heartbeat_ms),
            "--insecure",
            *(["--state-dir", str(self.state_dir)] if self.state_dir is not None else []),
            *self.coordinator_args,
        ]
        env = daemon_env({"CPCOORD_FAULT_DIR": str(self.faults), **self.extra_env})
        if pause:
            env["CPCOORD_FAULT_PAUSE"] = ",".join(pause)
        if self.coordinator is None:
            self.coordinator = Daemon("coordinator", argv, self.root / "coordinator.log", env)
        else:
            self.coordinator.argv, self.coordinator.env = argv, env
        self.coordinator.start()
        self.port = self.coordinator.wait_port(port_file)

    # -- agents --------------------------------------------------------------------------

    def start_agent(
        self,
        node: str,
        pause: Sequence[str] = (),
        fail: Sequence[str] = (),
        args: Sequence[str] | None = None,
    ) -> Daemon:
        """Start (or restart) the agent of `node`; `args` (e.g. `--socket PATH`) are kept
        for its restarts."""
        if args is not None:
            self.agent_args[node] = tuple(args)
        argv = [
            sys.executable,
            "-m",
            "cpcoord",
            "--log-level",
            "info",
            "agent",
            "--coordinator",
            self.address,
            "--node",
            node,
            "--insecure",
            *self.agent_args.get(node, ()),
        ]
        own = self.agent_env.get(node, {})
        env = daemon_env({"CPCOORD_FAULT_DIR": str(self.faults), **self.extra_env, **own})
        if pause:
            env["CPCOORD_FAULT_PAUSE"] = ",".join(pause)
        if fail:  # failure points (cpcoord/faults.py): NAME[@K]
            env["CPCOORD_FAULT_FAIL"] = ",".join(fail)
        d = self.agents.get(node)
        if d is None:
            d = Daemon(f"agent-{node}", argv, self.root / f"agent-{node}.log", env)
            self.agents[node] = d
        else:
            d.argv, d.env = argv, env
        d.start()
        return d

    def restart_agent(self, node: str, pause: Sequence[str] = (), fail: Sequence[str] = ()) -> None:
        self.agents[node].kill()
        self.start_agent(node, pause, fail)

    def wait_agents(self, nodes: Sequence[str], timeout: float = 30) -> None:
        """Until each node's agent is connected and reconciled: a connected agent whose
        members are still being re-attached shows them `agent_disconnected`, and a
        checkpoint then would be refused (AgentUnavailable)."""

        def up() -> bool:
            try:
                got = self.cli_json("jobs")  # cheap liveness of the coordinator
            except AssertionError:
                return False
            agents = self.agents_json()
            if not all(agents.get(n, False) for n in nodes):
                return False
            return not any(
                m.get("node") in nodes and m.get("health") == "agent_disconnected"
                for j in got["jobs"]
                for m in j["members"]
            )

        wait_for(up, timeout, f"agents {list(nodes)} connected and reconciled")

    def agents_json(self) -> dict[str, bool]:
        from cpcoord.gen.v1 import coordinator_pb2

        with grpc.insecure_channel(self.address, options=channel_options()) as ch:
            stub = coordinator_pb2_grpc.CoordinatorStub(ch)
            try:
                resp = stub.ListAgents(coordinator_pb2.ListAgentsRequest(), timeout=5)
            except grpc.RpcError:
                return {}
        return {a.node: a.connected for a in resp.agents}

    def wait_fault(self, name: str, timeout: float = 30) -> None:
        path = self.faults / f"{name}.reached"
        wait_for(path.exists, timeout, f"fault point {name}")

    # -- CLI -----------------------------------------------------------------------------

    def cli(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "cpcoord", *args, "--coordinator", self.address]
        # extra_env: an S3 store's variables, so `export` can read the store itself.
        env = daemon_env(self.extra_env)
        r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:  # what the daemons said: an agent's error is there
            raise AssertionError(
                f"cpcoord {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}\n"
                f"{self.logs()}"
            )
        return r

    def cli_json(self, *args: str, check: bool = True) -> Any:
        r = self.cli(*args, "--json", check=check)
        return json.loads(r.stdout) if r.stdout.strip() else None

    def members_running(self, job: str) -> bool:
        jobs = self.cli_json("jobs", "--job", job)["jobs"]
        return all(m["health"] == "running" for j in jobs for m in j["members"])

    # -- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        for d in self.agents.values():
            with contextlib.suppress(Exception):
                d.kill()
        if self.coordinator is not None:
            with contextlib.suppress(Exception):
                self.coordinator.stop()
            with contextlib.suppress(Exception):
                self.coordinator.kill()

    def wait_prepared(self, nodes: Sequence[str], timeout: float = 120) -> float:
        """Wait until every agent of `nodes` has prepared what its member's next
        checkpoint writes into, as an agent does after each attach: the member's
        staging, then its pack space (arenas, the cache's spare files, or none for a
        store on tmpfs; one member per agent). Benchmarks time the checkpoint of an
        attached member, not the attach. Returns the seconds waited."""
        t0 = time.monotonic()

        def ready(node: str) -> bool:
            text = self.agents[node].log.read_text(errors="replace")
            space = any(w in text for w in ("cache spares ready", "pack arenas ready",
                                            "pack space ready"))  # fmt: skip
            return "staging prepared" in text and space

        wait_for(lambda: all(ready(n) for n in nodes), timeout, f"agents {list(nodes)} prepared")
        return time.monotonic() - t0

    def logs(self, n: int = 40) -> str:
        """The last `n` lines of the coordinator's log and of every agent's, each under
        its name: for the message of a failed CLI call or assertion."""
        daemons = [self.coordinator, *self.agents.values()]
        return "\n".join(f"== {d.name}\n{d.tail(n)}" for d in daemons if d)
