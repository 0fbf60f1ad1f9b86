"""Coordinator replicas in network namespaces, so one can be cut off from etcd alone.

    netns cpha<pid>x<n>-hub   bridge br0 10.214.0.1/24: etcd, the agents, the CLI
    netns ...-r1             eth0 10.214.0.11/24: replica 1 (the first leader)
    netns ...-r2             eth0 10.214.0.12/24: replica 2

`partition(i)` adds an nftables table inside replica i's namespace that drops its
traffic to and from etcd's port only: agents and clients still reach it, it cannot renew
its lease. Namespaces carry the test's pid (parallel runs never clash); they are deleted
at teardown (their nft tables with them), and stale ones of dead runs at setup. The store
is one directory on the host: namespaces share the file system (and its flocks).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from testbed.daemons import REPO, Daemon, daemon_env
from tests.helpers.etcd import EtcdServer, free_port
from tests.helpers.netns import die_with_parent, sh

SUBNET = "10.214.0"
HUB_IP = f"{SUBNET}.1"
PREFIX = "cpha"
NFT_TABLE = "cpha_partition"


def remove_stale() -> None:
    r = sh("ip", "netns", "list", check=False)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        pid = name[len(PREFIX) :].partition("x")[0] if name.startswith(PREFIX) else ""
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            sh("ip", "netns", "del", name, check=False)


@dataclass
class NetnsReplicas:
    root: Path
    tag: str
    replicas: int = 2
    leader_ttl: int = 3
    made: list[str] = field(default_factory=list)
    etcd: EtcdServer | None = None
    daemons: list[Daemon] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    agents: list[Daemon] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"{self.tag}-hub"

    def ns(self, i: int) -> str:
        return f"{self.tag}-r{i + 1}"

    def ip(self, i: int) -> str:
        return f"{SUBNET}.{11 + i}"

    def replica_address(self, i: int) -> str:
        return f"{self.ip(i)}:{self.ports[i]}"

    @property
    def address(self) -> str:
        return ",".join(self.replica_address(i) for i in range(len(self.ports)))

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def faults(self) -> Path:
        return self.root / "faults"

    # -- network ------------------------------------------------------------------------

    def build(self) -> None:
        self.faults.mkdir(parents=True, exist_ok=True)
        self._netns(self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "addr", "add", f"{HUB_IP}/24", "dev", "br0")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i in range(self.replicas):
            ns, veth = self.ns(i), f"v{i + 1}"
            self._netns(ns)
            sh("ip", "-n", self.hub, "link", "add", veth, "type", "veth", "peer", "name",
               "eth0", "netns", ns)  # fmt: skip
            sh("ip", "-n", self.hub, "link", "set", veth, "master", "br0")
            sh("ip", "-n", self.hub, "link", "set", veth, "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        self.etcd = EtcdServer(
            self.root / "etcd", host=HUB_IP, netns=self.hub, ports=(free_port(), free_port())
        )

    def _netns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.made.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def partition(self, i: int) -> None:
        """Replica i can no longer talk to etcd (and etcd not to it); nothing else changes."""
        assert self.etcd is not None
        port = int(self.etcd.url.rpartition(":")[2])
        out = f"ip daddr {HUB_IP} tcp dport {port} counter drop"
        inp = f"ip saddr {HUB_IP} tcp sport {port} counter drop"
        script = (
            f"table inet {NFT_TABLE} {{\n"
            f"  chain out {{ type filter hook output priority 0; policy accept; {out}; }}\n"
            f"  chain in {{ type filter hook input priority 0; policy accept; {inp}; }}\n"
            "}\n"
        )
        subprocess.run(["ip", "netns", "exec", self.ns(i), "nft", "-f", "-"], input=script,
                       text=True, check=True, capture_output=True, timeout=30)  # fmt: skip

    def dropped(self, i: int) -> int:
        r = sh("ip", "netns", "exec", self.ns(i), "nft", "list", "table", "inet", NFT_TABLE)
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", r.stdout))

    # -- processes ------------------------------------------------------------------------

    def _spawn(self, name: str, ns: str, argv: list[str], env: dict[str, str]) -> Daemon:
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "cpcoord", "--log-level",
                "info", *argv]  # fmt: skip
        log = self.root / f"{name}.log"
        d = Daemon(name, argv, log, env)
        out = open(log, "ab")  # noqa: SIM115 - owned by the child
        d.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True, preexec_fn=die_with_parent)  # fmt: skip
        out.close()
        return d

    def start_replica(self, i: int, hold: tuple[str, ...] = ()) -> None:
        assert self.etcd is not None
        port_file = self.root / f"replica{i}.port"
        argv = ["coordinator", "--listen", f"{self.ip(i)}:0", "--store", str(self.store),
                "--port-file", str(port_file), "--insecure", "--insecure-bind-any",
                "--etcd", self.etcd.url, "--etcd-prefix", f"/{self.tag}",
                "--leader-ttl", str(self.leader_ttl)]  # fmt: skip
        env = daemon_env({"CPCOORD_FAULT_DIR": str(self.faults)})
        if hold:
            env["CPCOORD_FAULT_HOLD"] = ",".join(hold)
        d = self._spawn(f"replica{i}", self.ns(i), argv, env)
        self.daemons.append(d)
        self.ports.append(d.wait_port(port_file))

    def start_agent(self, node: str) -> Daemon:
        argv = ["agent", "--coordinator", self.address, "--node", node, "--insecure", "--no-socket"]
        d = self._spawn(f"agent-{node}", self.hub, argv, daemon_env())
        self.agents.append(d)
        return d

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["ip", "netns", "exec", self.hub, sys.executable, "-m", "cpcoord", *args,
                "--coordinator", self.address]  # fmt: skip
        r = subprocess.run(
            argv, cwd=REPO, env=daemon_env(), capture_output=True, text=True, timeout=120
        )
        if check and r.returncode != 0:
            raise AssertionError(f"cpcoord {' '.join(args)} exited {r.returncode}:\n{r.stderr}")
        return r

    def popen_cli(self, *args: str) -> subprocess.Popen[str]:
        argv = ["ip", "netns", "exec", self.hub, sys.executable, "-m", "cpcoord", *args,
                "--coordinator", self.address]  # fmt: skip
        return subprocess.Popen(argv, cwd=REPO, env=daemon_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=die_with_parent)  # fmt: skip

    def log_lines(self, i: int, msg: str) -> list[str]:
        """Lines of replica i's log with `msg=MSG` (structured logs)."""
        text = self.daemons[i].log.read_text(errors="replace")
        want = (f"msg={msg} ", f'msg="{msg}"')
        return [ln for ln in text.splitlines() if any(w in ln or ln.endswith(w.strip())
                                                    for w in want)]  # fmt: skip

    # -- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        for d in [*self.agents, *self.daemons]:
            with contextlib.suppress(Exception):
                d.kill()
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                self.etcd.close()
        for ns in reversed(self.made):
            with contextlib.suppress(Exception):
                sh("ip", "netns", "del", ns, check=False)
        self.made.clear()


def log_time(line: str) -> float:
    """Seconds since the epoch of a structured log line (ts=...Z, millisecond precision)."""
    m = re.search(r"ts=(\S+)Z", line)
    assert m, line
    return datetime.fromisoformat(m.group(1) + "+00:00").timestamp()


def tag_for(n: int) -> str:
    return f"{PREFIX}{os.getpid()}x{n}"
