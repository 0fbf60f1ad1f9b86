"""A real etcd for tests (Debian's `etcd-server`), torn down whatever happens.

    e = EtcdServer(tmp_path / "etcd")            # loopback, free ports, its own data dir
    e = EtcdServer(root, host="10.214.0.1", netns="cpha123-hub")   # inside a namespace
    e.url                                         # http://HOST:PORT for --etcd
    e.close()

One member, started with a fresh data directory under the test's tmp dir; ready once a
range request answers. `etcd` fixture: one per test (requires the binary; in CI its
absence fails the test, tests/conftest.require).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.ha.etcd import EtcdClient
from cpcoord.errors import EtcdUnavailable
from tests.conftest import require


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EtcdServer:
    def __init__(
        self,
        root: Path,
        host: str = "127.0.0.1",
        netns: str | None = None,
        ports: tuple[int, int] | None = None,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        client_port, peer_port = ports or (free_port(), free_port())
        self.url = f"http://{host}:{client_port}"
        peer = f"http://{host}:{peer_port}"
        name = f"t{os.getpid()}"
        argv = [
            shutil.which("etcd") or "etcd",
            "--name", name,
            "--data-dir", str(root / "data"),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{name}={peer}",
            "--initial-cluster-token", f"cpcoord-test-{os.getpid()}",
            "--log-level", "warn",
        ]  # fmt: skip
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.log = root / "etcd.log"
        out = open(self.log, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()
        self._wait_ready(netns)

    def _wait_ready(self, netns: str | None, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"etcd exited {self.proc.returncode}:\n{self.tail()}")
            if netns is None:
                try:
                    EtcdClient(self.url, timeout_s=1).get(b"/ready")
                    return
                except EtcdUnavailable:
                    pass
            else:  # probe from inside the namespace
                code = "import sys; from coordinator.ha.etcd import EtcdClient as E; "
                code += f"E('{self.url}').get(b'/r')"
                r = subprocess.run(
                    ["ip", "netns", "exec", netns, sys.executable, "-c", code],
                    capture_output=True,
                    env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])),
                    timeout=30,
                )
                if r.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"etcd not ready after {timeout}s:\n{self.tail()}")
            time.sleep(0.1)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    require(shutil.which("etcd") is not None, "etcd (Debian package etcd-server)")
    e = EtcdServer(tmp_path / "etcd")
    try:
        yield e
    finally:
        e.close()
