"""The demo's script: start daemons and members, checkpoint, roll back, report, clean up.

Everything it starts is a child process tagged with CPCOORD_DEMO_ID in its environment
(tests look for leftovers by it) and is killed in `finally`, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cpcoord.errors import DemoFailed
from cpcoord.humanize import format_bytes

PAGE = os.sysconf("SC_PAGE_SIZE")
JOB = "demo"


@dataclass
class Member:
    name: str
    proc: subprocess.Popen[str]
    addr: int
    pages: int

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if not answer:
            raise DemoFailed(f"member {self.name} stopped answering")
        return answer

    @property
    def range(self) -> str:
        return f"0x{self.addr:x}-0x{self.addr + self.pages * PAGE:x}"


def _demo_id() -> str:
    """Tag of every child's environment; a caller (the tests) may choose it."""
    return os.environ.get("CPCOORD_DEMO_ID") or uuid.uuid4().hex


@dataclass
class Demo:
    store: Path
    out: IO[str]
    pages: int = 256
    demo_id: str = field(
        default_factory=lambda: os.environ.get("CPCOORD_DEMO_ID") or uuid.uuid4().hex
    )
    children: list[subprocess.Popen[Any]] = field(default_factory=list)
    address: str = ""

    # -- processes ------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, CPCOORD_DEMO_ID=self.demo_id, CPCOORD_INSECURE="1")
        env.pop("CPCOORD_CONFIG", None)
        return env

    def _spawn(self, argv: list[str], log: Path | None = None, **kw: Any) -> subprocess.Popen[Any]:
        if log is not None:
            kw.setdefault("stdout", log.open("ab"))
            kw.setdefault("stderr", subprocess.STDOUT)
        p = subprocess.Popen(argv, env=self._env(), start_new_session=True, **kw)
        self.children.append(p)
        return p

    def cli(self, *args: str) -> Any:
        argv = [sys.executable, "-m", "cpcoord", *args, "--coordinator", self.address, "--json"]
        r = subprocess.run(argv, env=self._env(), capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise DemoFailed(f"cpcoord {args[0]} failed ({r.returncode}): {r.stderr.strip()}")
        return json.loads(r.stdout) if r.stdout.strip() else {}

    def start_daemons(self) -> None:
        port_file = self.store.parent / f".demo-{self.demo_id}.port"
        self._spawn(
            [sys.executable, "-m", "cpcoord", "coordinator", "--listen", "127.0.0.1:0",
             "--store", str(self.store), "--port-file", str(port_file), "--insecure"],
            log=self.store.parent / "coordinator.log",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if time.monotonic() > deadline or self.children[0].poll() is not None:
                raise DemoFailed("the coordinator did not start (see coordinator.log)")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{int(port_file.read_text())}"
        port_file.unlink()
        self._spawn(
            [sys.executable, "-m", "cpcoord", "agent", "--coordinator", self.address,
             "--node", "local", "--insecure"],
            log=self.store.parent / "agent.log",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not self.agent_connected("local"):
            if time.monotonic() > deadline:
                raise DemoFailed("the agent did not connect (see agent.log)")
            time.sleep(0.2)

    def agent_connected(self, node: str) -> bool:
        import grpc

        from cpcoord.gen.v1 import coordinator_pb2, coordinator_pb2_grpc
        from cpcoord.grpcopts import channel_options

        with grpc.insecure_channel(self.address, options=channel_options()) as ch:
            stub = coordinator_pb2_grpc.CoordinatorStub(ch)
            try:
                resp = stub.ListAgents(coordinator_pb2.ListAgentsRequest(), timeout=5)
            except grpc.RpcError:
                return False
        return any(a.node == node and a.connected for a in resp.agents)

    def start_member(self, name: str, seed: int) -> Member:
        p = self._spawn(
            [sys.executable, "-m", "cpcoord.demo.member", "--pages", str(self.pages),
             "--seed", str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert p.stdout is not None
        hello = json.loads(p.stdout.readline())
        m = Member(name, p, hello["addr"], hello["pages"])
        self.cli("attach", "--job", JOB, "--member", name, "--pid", str(p.pid),
                 "--range", m.range)  # fmt: skip
        return m

    def cleanup(self) -> None:
        for p in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in self.children:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    # -- the story ----------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self) -> list[dict[str, Any]]:
        self.say(f"store: {self.store}")
        self.start_daemons()
        self.say(f"coordinator on {self.address}, agent 'local' connected")
        members = [self.start_member("rank-0", 1), self.start_member("rank-1", 2)]
        self.say(f"job '{JOB}': members rank-0 and rank-1, {self.pages} pages each")
        rows: list[dict[str, Any]] = []
        digests: dict[int, dict[str, str]] = {}
        for i, (kind, steps) in enumerate([("full", 0), ("incremental", 8), ("incremental", 3)]):
            for m in members:
                for _ in range(steps):
                    m.ask("step 4")
            args = ["checkpoint", "--job", JOB] + (["--full"] if kind == "full" else [])
            r = self.cli(*args)
            gen = int(r["generation"])
            digests[gen] = {m.name: m.ask("digest") for m in members}
            rows.append({"generation": gen, "kind": kind, **r})
            self.say(f"generation {gen} ({kind}) {r['state']}")
            if i == 0:
                first = gen
        self.check_exports(digests)
        self.roll_back(members, first, digests[first])
        return rows

    def check_exports(self, digests: dict[int, dict[str, str]]) -> None:
        for gen, want in digests.items():
            out = self.store.parent / f"export-{gen}"
            self.cli("export", "--job", JOB, "--generation", str(gen), "--out", str(out))
            for name, digest in want.items():
                files = list((out / name).glob("*.raw"))
                got = hashlib.sha256(files[0].read_bytes()).hexdigest() if files else "missing"
                if got != digest:
                    raise DemoFailed(f"export of generation {gen} member {name} differs")
        self.say("export: every generation equals what the members held at its cut")

    def roll_back(self, members: list[Member], gen: int, want: dict[str, str]) -> None:
        for m in members:  # move away from the cut first
            m.ask("step 16")
        self.cli("restore", "--job", JOB, "--generation", str(gen))
        for m in members:
            if m.ask("digest") != want[m.name]:
                raise DemoFailed(f"member {m.name} does not hold generation {gen} after restore")
        self.say(f"restore: both members rolled back to generation {gen} in place; checked")


def table(rows: list[dict[str, Any]]) -> str:
    head = ["generation", "kind", "pages", "logical", "stored new", "frozen ms", "seconds"]
    body = [
        [
            str(r["generation"]),
            r["kind"],
            str(r.get("pages_captured", "")),
            format_bytes(int(r.get("bytes_logical", 0))),
            format_bytes(int(r.get("bytes_stored_new", 0))),
            f"{float(r.get('frozen_seconds', 0)) * 1000:.1f}",
            f"{float(r.get('seconds', 0)):.2f}",
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] +
                     [fmt.format(*row) for row in body])  # fmt: skip


@contextlib.contextmanager
def store_dir(store: Path | None) -> Iterator[Path]:
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
        (store / "demo-work").mkdir(exist_ok=True)
        yield store / "demo-work" / "store"
        return
    with tempfile.TemporaryDirectory(prefix="cpcoord-demo-") as tmp:
        yield Path(tmp) / "store"


def run_demo(store: Path | None, pages: int, out: IO[str]) -> int:
    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        with store_dir(store) as path:
            demo = Demo(path, out, pages)
            try:
                rows = demo.run()
            finally:
                demo.cleanup()
            print("\n" + table(rows), file=out)
            print("\ndemo finished: every process it started has exited", file=out)
            return 0
    finally:
        signal.signal(signal.SIGTERM, old)
