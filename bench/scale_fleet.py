"""Processes of the scale benchmark (bench/scale.py): one coordinator, N agents and one
small target per member, all real processes on loopback, always torn down.

Every child runs in its own session (process group) with a parent-death signal, so a
`close()` that never runs (the benchmark SIGKILLed) still takes them down with it; `close()`
kills each group and reaps it. Agents are started in batches and counted as attached
only when ListAgents says they are connected; startup is bounded and a child that dies
meanwhile fails the run with its log tail.

A target is a bare Python process (no NumPy: ~10 MB resident) holding one anonymous
private mapping of SIZE bytes filled from a seed; a line "SEED" on its stdin refills it
(so every repetition uploads new, incompressible bytes) and it answers "ok".
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import grpc

from cpcoord.gen.v1 import coordinator_pb2, coordinator_pb2_grpc, types_pb2
from cpcoord.grpcopts import channel_options

REPO = Path(__file__).resolve().parents[1]
BATCH = 8  # agents started at once: 2 cores, each import of grpc costs ~1 s of CPU

TARGET_SRC = r"""
import ctypes, mmap, random, sys
n = int(sys.argv[1])
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
def fill(seed):
    r = random.Random(seed)
    for off in range(0, n, 1 << 24):
        m[off:off + (1 << 24)] = r.randbytes(min(1 << 24, n - off))
fill(int(sys.argv[2]))
print(addr, flush=True)
for line in sys.stdin:
    fill(int(line))
    print("ok", flush=True)
"""


def seeded_bytes(seed: int, n: int) -> bytes:
    """The bytes a target of `n` bytes holds after filling from `seed` (the same stream as
    one `randbytes(n)`, drawn in 16 MiB pieces: one call cannot draw 256 MiB or more)."""
    r = random.Random(seed)
    return b"".join(r.randbytes(min(1 << 24, n - off)) for off in range(0, n, 1 << 24))


def _pdeathsig(argv: Sequence[str]) -> list[str]:
    """`setpriv --pdeathsig KILL` in front: the child dies with this process. (Not a
    preexec_fn: forking a process whose gRPC threads run can break the child.)"""
    setpriv = shutil.which("setpriv")  # util-linux
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else list(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    for k in ("CPCOORD_FAULT_PAUSE", "CPCOORD_COORDINATOR", "CPCOORD_FAULT_DIR"):
        env.pop(k, None)
    return env


def spawn(
    argv: Sequence[str], log: Path | None, stdin: bool = False, errlog: Path | None = None
) -> subprocess.Popen[bytes]:
    """stdout and stderr to `log`, or stdout to a pipe and stderr to `errlog`."""
    out: IO[bytes] | int = open(log, "ab") if log else subprocess.PIPE  # noqa: SIM115
    err: IO[bytes] | int = subprocess.STDOUT if log else subprocess.DEVNULL
    if errlog is not None and log is None:
        err = open(errlog, "ab")  # noqa: SIM115
    try:
        return subprocess.Popen(
            _pdeathsig(argv),
            cwd=REPO,
            env=_env(),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    finally:
        for f in (out, err):
            if not isinstance(f, int):
                f.close()


def kill(p: subprocess.Popen[bytes], term_first: bool = False) -> None:
    """The child's whole process group, then reap it. The group is signalled only while
    the child is unreaped, so its id cannot have been reused by then."""
    if term_first and p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)
    if p.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    for f in (p.stdin, p.stdout):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=30)


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Target:
    proc: subprocess.Popen[bytes]
    addr: int
    size: int

    def refill(self, seed: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{seed}\n".encode())
        self.proc.stdin.flush()
        if self.proc.stdout.readline().strip() != b"ok":
            raise RuntimeError(f"target {self.proc.pid} did not refill (exit {self.proc.poll()})")


@dataclass
class Fleet:
    """The coordinator, agents `scale-000`... and targets of one benchmark run."""

    root: Path
    heartbeat_ms: int = 2000
    lease_s: float = 60.0
    coordinator: subprocess.Popen[bytes] | None = None
    port: int = 0
    agents: list[tuple[str, subprocess.Popen[bytes], int]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    channel: grpc.Channel | None = None
    agent_args: tuple[str, ...] = ()  # more `cpcoord agent` options, e.g. --data-path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def stub(self) -> coordinator_pb2_grpc.CoordinatorStub:
        if self.channel is None:
            self.channel = grpc.insecure_channel(self.address, options=channel_options())
        return coordinator_pb2_grpc.CoordinatorStub(self.channel)

    def start_coordinator(self, rpc_threads: int | None = None) -> None:
        port_file = self.root / "coordinator.port"
        argv = [sys.executable, "-m", "cpcoord", "--log-level", "info", "coordinator"]
        argv += ["--listen", "127.0.0.1:0", "--store", str(self.root / "store")]
        argv += ["--port-file", str(port_file), "--heartbeat-ms", str(self.heartbeat_ms)]
        argv += ["--insecure"]
        if rpc_threads is not None:
            argv += ["--rpc-threads", str(rpc_threads)]
        log = self.root / "coordinator.log"
        self.coordinator = spawn(argv, log)
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.coordinator.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("coordinator did not start:\n" + tail(log))
            time.sleep(0.05)
        self.port = int(port_file.read_text())

    def agent_log(self, node: str) -> Path:
        return self.root / f"agent-{node}.log"

    def grow(self, n: int, timeout_per_agent: float = 5.0) -> None:
        """Start agents until there are `n`, in batches; wait until all are connected."""
        while len(self.agents) < n:
            batch = []
            for _ in range(min(BATCH, n - len(self.agents))):
                node = f"scale-{len(self.agents):03d}"
                mport = free_port()
                argv = [sys.executable, "-m", "cpcoord", "--log-level", "info", "agent"]
                argv += ["--coordinator", self.address, "--node", node, "--insecure"]
                argv += ["--metrics-port", str(mport), "--lease", str(self.lease_s)]
                argv += ["--upload-threads", "1", "--no-socket"]  # no shared default socket
                argv += self.agent_args
                self.agents.append((node, spawn(argv, self.agent_log(node)), mport))
                batch.append(node)
            self.wait_connected(batch, 60 + timeout_per_agent * len(batch))
        self.wait_connected([a[0] for a in self.agents], 60 + timeout_per_agent * n)

    def wait_connected(self, nodes: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        want = set(nodes)
        while True:
            for node, p, _ in self.agents:
                if p.poll() is not None:
                    raise RuntimeError(f"agent {node} exited:\n{tail(self.agent_log(node))}")
            try:
                resp = self.stub.ListAgents(coordinator_pb2.ListAgentsRequest(), timeout=10)
                up = {a.node for a in resp.agents if a.connected}
            except grpc.RpcError:
                up = set()
            if want <= up:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"agents not connected after {timeout:.0f} s: {want - up}")
            time.sleep(0.2)

    def add_target(self, size: int, seed: int) -> Target:
        log = self.root / "targets.log"
        argv = [sys.executable, "-c", TARGET_SRC, str(size), str(seed)]
        p = spawn(argv, None, stdin=True, errlog=log)
        assert p.stdout is not None
        line = p.stdout.readline().strip()
        if not line:
            kill(p)
            raise RuntimeError(f"target did not start (exit {p.returncode}):\n{tail(log)}")
        t = Target(p, int(line), size)
        self.targets.append(t)
        return t

    def attach(self, job: str, member: str, node: str, t: Target) -> None:
        region = types_pb2.Region(name="data", start=t.addr, end=t.addr + t.size)
        req = coordinator_pb2.AttachMemberRequest(
            job=job,
            member=member,
            process=types_pb2.ProcessIdentity(pid=t.proc.pid),
            node=node,
            regions=[region],
        )
        self.stub.AttachMember(req, timeout=60)

    def detach(self, job: str, member: str) -> None:
        req = coordinator_pb2.DetachMemberRequest(job=job, member=member)
        self.stub.DetachMember(req, timeout=60)

    def drop_targets(self) -> None:
        for t in self.targets:
            kill(t.proc)
        self.targets.clear()

    def rss(self) -> dict[str, int]:
        """Resident bytes of the coordinator, all agents and all targets."""
        return {
            "coordinator": rss_bytes(self.coordinator.pid) if self.coordinator else 0,
            "agents": sum(rss_bytes(p.pid) for _, p, _ in self.agents),
            "targets": sum(rss_bytes(t.proc.pid) for t in self.targets),
        }

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.drop_targets()
        for _, p, _ in self.agents:
            kill(p)
        if self.coordinator is not None:
            kill(self.coordinator, term_first=True)


def scrape(port: int) -> dict[str, float]:
    """The agent's /metrics: every `name value` sample without labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def log_fields(path: Path, msg: str) -> list[dict[str, str]]:
    """key=value fields of the log lines with `msg=MSG` (values without spaces)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if f"msg={msg} " in line or line.endswith(f"msg={msg}"):
            out.append(dict(x.split("=", 1) for x in line.split() if "=" in x))
    return out


# -- what the scale benchmarks (bench/scale.py, bench/scale_real.py) share --------------

Modes = dict[str, tuple[str, int]]  # mode -> (agent counts, measured checkpoints per count)


def scale_parser(doc: str, name: str, modes: Modes, example: str) -> argparse.ArgumentParser:
    """The options every scale benchmark takes; each adds its own."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--agents", default=None, help=f"agent counts, e.g. {example}")
    ap.add_argument("--reps", type=int, default=None, help="measured checkpoints per count")
    ap.add_argument("--quick", action="store_true", help=f"agents {modes['quick'][0]}")
    ap.add_argument("--tiny", action="store_true", help=f"agents {modes['tiny'][0]}")
    ap.add_argument("--store-dir", type=Path, default=None, help="parent dir of the store")
    ap.add_argument("--name", default=name, help="results file stem")
    return ap


def scale_plan(a: argparse.Namespace, modes: Modes) -> tuple[str, list[int], int]:
    """(mode, agent counts, repetitions) of parsed options; SIGTERM from now on ends
    the run through the finally blocks (every child taken down)."""
    mode = "tiny" if a.tiny else "quick" if a.quick else "full"
    counts = sorted({int(x) for x in (a.agents or modes[mode][0]).split(",")})
    reps = a.reps or modes[mode][1]
    signal.signal(signal.SIGTERM, _on_term)
    return mode, counts, reps


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # the finally blocks take every child down


def run_extra(
    reps: int, mode: str, raw: dict[str, Any], points: list[dict[str, Any]], load_start: Any
) -> dict[str, Any]:
    """The results' `extra` every scale benchmark writes."""
    return {
        "reps": reps,
        "mode": mode,
        "raw": raw,
        "points": points,
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
    }
