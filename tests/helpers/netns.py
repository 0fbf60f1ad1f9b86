"""Multi-node clusters in network namespaces, torn down whatever happens.

    def test_x(netns_cluster):
        c = netns_cluster()                      # coordinator + agents node-1..node-3
        t = c.target("node-2", maps=["data:64"])  # a member process inside node-2's netns
        c.link_down("node-2"); c.link_up("node-2")
        c.drop("node-2", percent=20); c.undrop("node-2")
        c.throttle("node-2", "20mbit"); c.unthrottle("node-2")

Layout (names carry the test process's pid, so parallel runs never clash):

    netns cpmn<pid>-c    c0 10.213.0.1/24 (cpcoord coordinator) = cbr -- bridge br0
                                                                     |   |   |
    netns cpmn<pid>-n1   eth0 10.213.0.11/24  cpcoord agent --node node-1, its members
    netns cpmn<pid>-n2   eth0 10.213.0.12/24  ...
    netns cpmn<pid>-n3   eth0 10.213.0.13/24  ...
    netns cpmn<pid>-s    eth0 10.213.0.2/24   a shared store's server (`add_host`), if any

The coordinator's own link is the veth pair c0 (its address) = cbr (its bridge port), so
`throttle_coordinator` shapes both directions with tbf on egress: c0 (what it sends) and
cbr (what the bridge delivers to it); traffic between the other hosts never crosses it.
br0 itself has no address and answers no ARP, so nothing reaches the coordinator but
through c0.
The other veth pairs are created inside the coordinator's namespace and one end moved:
the test range never appears in the host's namespace, and every fault (link down,
nftables drop rules, tc qdiscs) is applied inside our namespaces, on our links only.
The CLI runs inside the coordinator's namespace. Every child gets PR_SET_PDEATHSIG so a
killed test run leaves no daemon behind; namespaces (and with them their nft tables and
qdiscs) are deleted at teardown, and stale ones of dead test runs at the next setup.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from testbed import driver
from testbed.cluster import Cluster
from testbed.daemons import REPO, Daemon, daemon_env, wait_for
from testbed.driver import Target
from tests.conftest import require
from tests.helpers.e2e import attach

SUBNET = "10.213.0"
COORD_IP = f"{SUBNET}.1"
STORE_IP = f"{SUBNET}.2"  # add_host("s", STORE_IP): a shared store's server
PREFIX = "cpmn"
NFT_TABLE = "cpmn_fault"


def die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies (survives the exec
    of `ip netns exec`, which is not set-uid)."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}")
    return r


def _tbf(ns: str, dev: str, rate: str) -> None:
    sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "32kbit",
       "latency", "400ms")  # fmt: skip


def _tbf_stats(ns: str, dev: str) -> tuple[int, int]:
    r = sh("tc", "-n", ns, "-s", "qdisc", "show", "dev", dev)
    m = re.search(r"Sent (\d+) bytes .*overlimits (\d+)", r.stdout)
    assert m and "tbf" in r.stdout, r.stdout
    return int(m.group(1)), int(m.group(2))


def tools_missing() -> list[str]:
    return [t for t in ("ip", "nft", "tc") if shutil.which(t) is None]


def remove_stale_namespaces() -> None:
    """Delete namespaces of earlier test runs whose process is gone (a killed run)."""
    r = sh("ip", "netns", "list", check=False)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX) or "-" not in name:
            continue
        pid = name[len(PREFIX) :].partition("x")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            sh("ip", "netns", "del", name, check=False)


class NsTarget(Target):
    """A target process (testbed/target.py) started inside a network namespace;
    `ip netns exec` execs, so `pid` is the target's own pid."""

    def __init__(self, ns: str, maps: Sequence[str] = ("data:64",), tmpdir: Path | None = None):
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "testbed.target"]
        for m in maps:
            argv += ["--map", m]
        if tmpdir is not None:
            argv += ["--tmpdir", str(tmpdir)]
        self.timeout = 60.0
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            preexec_fn=die_with_parent,
        )
        self.pid = self.proc.pid
        self._buf = b""
        self._info = self._reply()
        self.mappings = self._parse(self._info)
        self.ns = ns


@dataclass
class NetnsCluster(Cluster):
    """A Cluster (tests/helpers/cluster.py) whose coordinator and agents each live in a
    network namespace of their own. Nodes are node-1..node-N."""

    tag: str = ""
    made_ns: list[str] = field(default_factory=list)
    targets: list[NsTarget] = field(default_factory=list)
    lease_s: float = 10.0
    on_close: list[Callable[[], None]] = field(default_factory=list)  # before the netns go
    # By default the store is a directory in the coordinator's namespace: the agents'
    # namespaces see the same filesystem, but a real node would not, and these tests are
    # about the network between them. So pages go over the links. With a store every
    # node reaches over the network (store_url, e.g. SeaweedFS S3 in a namespace of its
    # own: tests/helpers/netns_s3.py) the agents can take the direct data path.
    data_path: str = "coordinator"

    @property
    def coord_ns(self) -> str:
        return f"{self.tag}-c"

    def ns(self, node: str) -> str:
        return f"{self.tag}-n{self.nodes.index(node) + 1}"

    def ip(self, node: str) -> str:
        return f"{SUBNET}.{11 + self.nodes.index(node)}"

    @property
    def address(self) -> str:
        return f"{COORD_IP}:{self.port}"

    # -- network --------------------------------------------------------------------

    def build(self) -> None:
        c = self.coord_ns
        self._netns(c)
        sh("ip", "-n", c, "link", "add", "br0", "type", "bridge")
        # No ARP on br0: Linux answers ARP for any local address on any interface, so br0
        # would answer for c0's and take the coordinator's traffic around its link.
        sh("ip", "-n", c, "link", "set", "br0", "arp", "off")
        sh("ip", "-n", c, "link", "set", "br0", "up")
        sh("ip", "-n", c, "link", "add", "c0", "type", "veth", "peer", "name", "cbr")
        sh("ip", "-n", c, "link", "set", "cbr", "master", "br0")
        sh("ip", "-n", c, "link", "set", "cbr", "up")
        sh("ip", "-n", c, "addr", "add", f"{COORD_IP}/24", "dev", "c0")
        sh("ip", "-n", c, "link", "set", "c0", "up")
        for i, node in enumerate(self.nodes, start=1):
            self._attach(self.ns(node), f"v{i}", self.ip(node))

    def add_host(self, suffix: str, ip: str) -> str:
        """Another namespace on the bridge (e.g. a store's server), its link unshaped;
        returns its name."""
        ns = f"{self.tag}-{suffix}"
        self._attach(ns, f"v{suffix}", ip)
        return ns

    def _attach(self, ns: str, veth: str, ip: str) -> None:
        c = self.coord_ns
        self._netns(ns)
        sh("ip", "-n", c, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
           "netns", ns)  # fmt: skip
        sh("ip", "-n", c, "link", "set", veth, "master", "br0")
        sh("ip", "-n", c, "link", "set", veth, "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")

    def _netns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.made_ns.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def link_down(self, node: str) -> None:
        sh("ip", "-n", self.ns(node), "link", "set", "eth0", "down")

    def link_up(self, node: str) -> None:
        sh("ip", "-n", self.ns(node), "link", "set", "eth0", "up")

    def drop(self, node: str, percent: int) -> None:
        """Drop `percent`% of the node's packets both ways (nftables numgen random)."""
        share = f"numgen random mod 100 < {percent} " if percent < 100 else ""
        rule = f"meta nfproto ipv4 ip saddr {SUBNET}.0/24 {share}counter drop"
        script = (
            f"table inet {NFT_TABLE} {{\n"
            f"  chain in {{ type filter hook input priority 0; policy accept; {rule}; }}\n"
            f"  chain out {{ type filter hook output priority 0; policy accept; "
            f"{rule.replace('saddr', 'daddr')}; }}\n"
            "}\n"
        )
        subprocess.run(["ip", "netns", "exec", self.ns(node), "nft", "-f", "-"], input=script,
                       text=True, check=True, capture_output=True, timeout=30)  # fmt: skip

    def dropped(self, node: str) -> int:
        """Packets the node's drop rules have dropped so far (proof the fault happened)."""
        r = sh("ip", "netns", "exec", self.ns(node), "nft", "list", "table", "inet", NFT_TABLE)
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", r.stdout))

    def undrop(self, node: str) -> None:
        sh("ip", "netns", "exec", self.ns(node), "nft", "delete", "table", "inet", NFT_TABLE,
           check=False)  # fmt: skip

    def throttle(self, node: str, rate: str) -> None:
        """Shape the node's uplink (its eth0 egress: the upload direction) with tbf."""
        _tbf(self.ns(node), "eth0", rate)

    def shaped(self, node: str) -> tuple[int, int]:
        """(bytes sent, overlimits) of the node's tbf qdisc: overlimits > 0 means packets
        had to wait for tokens, i.e. the shaper was in effect."""
        return _tbf_stats(self.ns(node), "eth0")

    def unthrottle(self, node: str) -> None:
        sh("tc", "-n", self.ns(node), "qdisc", "del", "dev", "eth0", "root", check=False)

    def throttle_coordinator(self, rate: str) -> None:
        """Shape the coordinator's link both ways with tbf: c0 egress is what it sends,
        cbr egress what the bridge delivers to it."""
        for dev in ("c0", "cbr"):
            _tbf(self.coord_ns, dev, rate)

    def coordinator_shaped(self) -> dict[str, tuple[int, int]]:
        """(bytes sent, overlimits) of the coordinator's two shapers, by direction."""
        return {"out": _tbf_stats(self.coord_ns, "c0"), "in": _tbf_stats(self.coord_ns, "cbr")}

    def unthrottle_coordinator(self) -> None:
        for dev in ("c0", "cbr"):
            sh("tc", "-n", self.coord_ns, "qdisc", "del", "dev", dev, "root", check=False)

    # -- processes ------------------------------------------------------------------

    def _daemon(self, name: str, ns: str, argv: list[str], log: Path, env: dict[str, str],
                pause: Sequence[str], fail: Sequence[str] = ()) -> Daemon:  # fmt: skip
        env = dict(env, CPCOORD_FAULT_DIR=str(self.faults))
        if pause:
            env["CPCOORD_FAULT_PAUSE"] = ",".join(pause)
        if fail:  # failure points (cpcoord/faults.py): NAME[@K]
            env["CPCOORD_FAULT_FAIL"] = ",".join(fail)
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "cpcoord", "--log-level",
                self.log_level, *argv]  # fmt: skip
        d = Daemon(name, argv, log, env)
        out = open(log, "ab")  # noqa: SIM115 - owned by the child
        out.write(f"--- start {' '.join(argv)}\n".encode())
        out.flush()
        d.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True, preexec_fn=die_with_parent)  # fmt: skip
        out.close()
        return d

    def start_coordinator(self, pause: Sequence[str] = ()) -> None:
        port_file = self.root / "coordinator.port"
        port_file.unlink(missing_ok=True)
        # The same port after a restart: agents redial it.
        argv = ["coordinator", "--listen", self.address, "--store",
                self.store_url or str(self.store),
                "--keep", str(self.keep), "--port-file", str(port_file),
                "--heartbeat-ms", str(self.heartbeat_ms), "--insecure",
                "--insecure-bind-any"]  # fmt: skip
        log, env = self.root / "coordinator.log", daemon_env(self.extra_env)
        self.coordinator = self._daemon("coordinator", self.coord_ns, argv, log, env, pause)
        self.port = self.coordinator.wait_port(port_file)

    def start_agent(self, node: str, pause: Sequence[str] = (), fail: Sequence[str] = ()) -> Daemon:
        argv = ["agent", "--coordinator", self.address, "--node", node, "--insecure",
                "--lease", str(self.lease_s), "--data-path", self.data_path]  # fmt: skip
        argv += self.agent_args.get(node, ())  # e.g. --cache, --partner-listen
        # The store's endpoint and credentials reach each agent in its own environment.
        env = daemon_env({**self.extra_env, **self.agent_env.get(node, {})})
        d = self._daemon(f"agent-{node}", self.ns(node), argv,
                         self.root / f"agent-{node}.log", env, pause, fail)  # fmt: skip
        self.agents[node] = d
        return d

    def target(self, node: str, maps: Sequence[str] = ("data:64",)) -> NsTarget:
        t = NsTarget(self.ns(node), maps, tmpdir=self.root)
        self.targets.append(t)
        return t

    def attach(self, job: str, member: str, t: Target, node: str, mapping: str = "data") -> None:
        attach(self, job, member, t, node, mapping)

    # -- CLI and queries, from inside the coordinator's namespace ------------------------

    def cli(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        argv = ["ip", "netns", "exec", self.coord_ns, sys.executable, "-m", "cpcoord", *args,
                "--coordinator", self.address]  # fmt: skip
        r = subprocess.run(argv, cwd=REPO, env=daemon_env(), capture_output=True, text=True,
                           timeout=timeout)  # fmt: skip
        if check and r.returncode != 0:
            raise AssertionError(
                f"cpcoord {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
            )
        return r

    def popen_cli(self, *args: str) -> subprocess.Popen[str]:
        argv = ["ip", "netns", "exec", self.coord_ns, sys.executable, "-m", "cpcoord", *args,
                "--coordinator", self.address]  # fmt: skip
        return subprocess.Popen(argv, cwd=REPO, env=daemon_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=die_with_parent)  # fmt: skip

    def agents_json(self) -> dict[str, bool]:
        code = (
            "import json, grpc\n"
            "from cpcoord.gen.v1 import coordinator_pb2 as p, coordinator_pb2_grpc as g\n"
            "from cpcoord.grpcopts import channel_options\n"
            f"ch = grpc.insecure_channel('{self.address}', options=channel_options())\n"
            "r = g.CoordinatorStub(ch).ListAgents(p.ListAgentsRequest(), timeout=5)\n"
            "print(json.dumps({a.node: a.connected for a in r.agents}))\n"
        )
        r = subprocess.run(["ip", "netns", "exec", self.coord_ns, sys.executable, "-c", code],
                           cwd=REPO, env=daemon_env(), capture_output=True, text=True,
                           timeout=30)  # fmt: skip
        if r.returncode != 0:
            return {}
        got: dict[str, bool] = json.loads(r.stdout)
        return got

    def wait_agents(self, nodes: Sequence[str], timeout: float = 60) -> None:
        wait_for(lambda: all(self.agents_json().get(n) for n in nodes), timeout,
                 f"agents {list(nodes)} connected")  # fmt: skip

    def no_member_frozen(self) -> bool:
        for t in self.targets:
            try:
                states = driver.task_states(t.pid)
            except FileNotFoundError:  # exited meanwhile: nothing of it is stopped
                continue
            if any(s in "tT" for s in states.values()):
                return False
        return True

    def watch_frozen(self, until: Callable[[], bool], timeout: float) -> float:
        """Poll until `until()`; return the longest stretch (s) any member was frozen."""
        longest, since = 0.0, None
        deadline = time.monotonic() + timeout
        while not until():
            now = time.monotonic()
            if now > deadline:
                raise AssertionError(f"timed out after {timeout}s")
            if self.no_member_frozen():
                since = None
            else:
                since = now if since is None else since
                longest = max(longest, now - since)
            time.sleep(0.05)
        return longest

    # -- teardown -------------------------------------------------------------------

    def close(self) -> None:
        for t in self.targets:
            with contextlib.suppress(Exception):
                t.close()
        super().close()
        for stop in reversed(self.on_close):
            with contextlib.suppress(Exception):
                stop()
        self.on_close.clear()
        for ns in reversed(self.made_ns):
            # Deleting a namespace removes its nft tables and qdiscs too; remove them
            # first anyway, so a namespace kept alive by a stray process is clean.
            for node in self.nodes:
                if ns == self.ns(node):
                    with contextlib.suppress(Exception):
                        self.undrop(node)
                    with contextlib.suppress(Exception):
                        self.unthrottle(node)
            with contextlib.suppress(Exception):
                sh("ip", "netns", "del", ns, check=False)
        self.made_ns.clear()


@pytest.fixture
def netns_cluster(tmp_path: Path) -> Iterator[Callable[..., NetnsCluster]]:
    """Factory of one NetnsCluster per test (three nodes by default)."""
    require(os.geteuid() == 0, "root (network namespaces)")
    missing = tools_missing()
    require(not missing, f"{', '.join(missing)} (iproute2, nftables)")
    remove_stale_namespaces()
    made: list[NetnsCluster] = []

    def make(setup: Callable[[NetnsCluster], None] | None = None, **kw: Any) -> NetnsCluster:
        """`setup(c)` runs once the network is built, before the daemons start."""
        kw.setdefault("nodes", ("node-1", "node-2", "node-3"))
        root = tmp_path / f"mn{len(made)}"
        root.mkdir(parents=True, exist_ok=True)
        c = NetnsCluster(root, tag=f"{PREFIX}{os.getpid()}x{len(made)}", **kw)
        made.append(c)
        c.build()
        if setup is not None:
            setup(c)
        c.start()
        return c

    try:
        yield make
    finally:
        for c in made:
            c.close()
