#!/usr/bin/env python3
"""Try cpcoord on one machine as if it were several: a coordinator and N agents, each in
its own network namespace, wired by veth pairs to a bridge in the coordinator's.

    sudo deploy/local/run.py --agents 3            # until Ctrl-C
    sudo deploy/local/run.py --agents 2 --duration 10

Layout (names carry this script's pid, so several runs and the test suite never clash):

    netns cpcl<pid>-c   bridge br0 10.77.0.1/24   cpcoord coordinator --listen 10.77.0.1:7420
                         |  |                       (/metrics on :7421)
    netns cpcl<pid>-n1  eth0 10.77.0.11/24        cpcoord agent --node node-1 (/metrics :7422)
    netns cpcl<pid>-n2  eth0 10.77.0.12/24        cpcoord agent --node node-2
    ...

Processes in the host namespace keep running where they are: an agent in a namespace
still sees every process of the machine (network namespaces do not hide pids), so any
process can be attached to any node. The script prints the commands to do that. It
waits until every agent is connected (read from the coordinator's /metrics), says so
(`agents connected: N/N`), and on Ctrl-C, SIGTERM or the end of --duration stops the
daemons (SIGTERM: members thaw), deletes the namespaces and, unless --store was given,
the store. Needs root and iproute2.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUBNET = "10.77.0"
COORD_IP = f"{SUBNET}.1"
GRPC_PORT, COORD_METRICS, AGENT_METRICS = 7420, 7421, 7422


class Stop(Exception):
    pass


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when this script dies, even by SIGKILL (the
    setting survives `ip netns exec`, which is not set-uid). Namespaces cannot be
    cleaned that way: `ip netns del` them (names start with cpcl<pid>-)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"run.py: {' '.join(argv)}: {r.stderr.strip()}")
    return r


class Local:
    def __init__(self, agents: int, store: Path | None, cpcoord: list[str], log_dir: Path) -> None:
        tag = f"cpcl{os.getpid()}"
        self.coord_ns = f"{tag}-c"
        self.node_ns = [f"{tag}-n{i}" for i in range(1, agents + 1)]
        self.veth = [f"cl{os.getpid() % 100000}n{i}" for i in range(1, agents + 1)]
        self.cpcoord = cpcoord
        self.log_dir = log_dir
        self.own_store = store is None
        self.store = store or Path(tempfile.mkdtemp(prefix="cpcoord-local-store-"))
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.made_ns: list[str] = []

    # -- network ----------------------------------------------------------------------

    def netns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.made_ns.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def build(self) -> None:
        self.netns(self.coord_ns)
        c = self.coord_ns
        sh("ip", "-n", c, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", c, "addr", "add", f"{COORD_IP}/24", "dev", "br0")
        sh("ip", "-n", c, "link", "set", "br0", "up")
        for i, (ns, veth) in enumerate(zip(self.node_ns, self.veth, strict=True), start=1):
            self.netns(ns)
            # Both ends are created in the coordinator's namespace, one is then moved:
            # nothing ever appears in the host's namespace.
            sh("ip", "-n", c, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
               "netns", ns)  # fmt: skip
            sh("ip", "-n", c, "link", "set", veth, "master", "br0")
            sh("ip", "-n", c, "link", "set", veth, "up")
            sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{10 + i}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")

    # -- daemons ----------------------------------------------------------------------

    def spawn(self, name: str, ns: str, args: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child's
        p = subprocess.Popen(
            ["ip", "netns", "exec", ns, *self.cpcoord, "--log-level", "info", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        self.procs.append((name, p))

    def start(self) -> None:
        port_file = self.log_dir / "coordinator.port"
        port_file.unlink(missing_ok=True)
        self.spawn("coordinator", self.coord_ns, [
            "coordinator", "--listen", f"{COORD_IP}:{GRPC_PORT}", "--store", str(self.store),
            "--metrics-port", str(COORD_METRICS), "--port-file", str(port_file), "--insecure",
            "--insecure-bind-any",  # plaintext on the namespaces' private link (docs/security.md)
        ])  # fmt: skip
        deadline = time.monotonic() + 60
        while not port_file.exists():
            self.check_alive()
            if time.monotonic() > deadline:
                raise SystemExit("run.py: the coordinator did not start; see coordinator.log")
            time.sleep(0.1)
        for i, ns in enumerate(self.node_ns, start=1):
            self.spawn(f"agent-node-{i}", ns, [
                "agent", "--coordinator", f"{COORD_IP}:{GRPC_PORT}", "--node", f"node-{i}",
                "--metrics-port", str(AGENT_METRICS), "--insecure",
            ])  # fmt: skip

    def check_alive(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                raise SystemExit(f"run.py: {name} exited ({p.returncode}); see {name}.log")

    def connected(self) -> int:
        """cpcoord_agents_connected from the coordinator's /metrics (read inside its
        namespace, where 10.77.0.1 lives)."""
        code = (
            "import urllib.request as u\n"
            f"t = u.urlopen('http://{COORD_IP}:{COORD_METRICS}/metrics', timeout=3).read()\n"
            "print(next((l.split()[1] for l in t.decode().splitlines()"
            " if l.startswith('cpcoord_agents_connected ')), '0'))\n"
        )
        r = sh("ip", "netns", "exec", self.coord_ns, sys.executable, "-c", code, check=False)
        try:
            return int(float(r.stdout.strip() or 0))
        except ValueError:
            return 0

    def wait_connected(self, timeout: float) -> int:
        want = len(self.node_ns)
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            self.check_alive()
            n = self.connected()
            if n == want:
                break
            time.sleep(0.3)
        print(f"agents connected: {n}/{want}", flush=True)
        return n

    # -- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        for _, p in reversed(self.procs):  # agents first: they thaw what they hold
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for _, p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=15)
        for ns in reversed(self.made_ns):
            sh("ip", "netns", "del", ns, check=False)
        if self.own_store:
            shutil.rmtree(self.store, ignore_errors=True)

    def hints(self) -> None:
        c = f"ip netns exec {self.coord_ns} {' '.join(self.cpcoord)}"
        addr = f"--coordinator {COORD_IP}:{GRPC_PORT} --insecure"
        print(
            f"""\
coordinator {COORD_IP}:{GRPC_PORT} in netns {self.coord_ns}, store {self.store}
logs in {self.log_dir}
try:
  {c} attach --job demo --member m1 --pid PID --node node-1 {addr}
  {c} checkpoint --job demo {addr}
  {c} generations --job demo {addr}
  ip netns exec {self.coord_ns} curl -s {COORD_IP}:{COORD_METRICS}/metrics | grep ^cpcoord_
Ctrl-C stops everything and removes the namespaces.""",
            flush=True,
        )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--agents", type=int, default=2, metavar="N", help="agents (1..50, default 2)")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument(
        "--store",
        type=Path,
        metavar="DIR",
        help="store directory (default: a temporary one, removed)",
    )
    p.add_argument(
        "--logs", type=Path, metavar="DIR", help="log directory (default: a temporary one, kept)"
    )
    p.add_argument("--cpcoord", default=f"{sys.executable} -m cpcoord",
                   help="how to run cpcoord (default: this Python's `-m cpcoord`)")  # fmt: skip
    p.add_argument("--connect-timeout", type=float, default=60, metavar="S")
    args = p.parse_args()
    if not 1 <= args.agents <= 50:
        p.error("--agents must be 1..50")
    if os.geteuid() != 0:
        p.error("needs root (network namespaces)")
    if shutil.which("ip") is None:
        p.error("needs iproute2 (`ip`)")
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="cpcoord-local-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[2]
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(repo), os.environ.get("PYTHONPATH")])
    )

    def on_signal(signum: int, frame: object) -> None:
        raise Stop

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    local = Local(args.agents, args.store, args.cpcoord.split(), log_dir)
    try:
        local.build()
        local.start()
        n = local.wait_connected(args.connect_timeout)
        if n != args.agents:
            return 1
        local.hints()
        end = time.monotonic() + args.duration if args.duration else None
        while end is None or time.monotonic() < end:
            local.check_alive()
            time.sleep(0.5)
        return 0
    except Stop:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # cleanup is not interrupted
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        local.close()
        print("stopped; namespaces removed", flush=True)


if __name__ == "__main__":
    sys.exit(main())
