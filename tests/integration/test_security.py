"""Transport security and client auth against real `cpcoord coordinator` and `cpcoord
agent` processes on loopback: the start-up refusals, mTLS (no certificate, a foreign CA,
an agent that does not trust the coordinator), roles from client certificates and bearer
tokens, and a byte-exact checkpoint with every hop on mTLS. See docs/security.md."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509

from cpcoord.gen.v1 import agent_pb2_grpc, coordinator_pb2, coordinator_pb2_grpc
from cpcoord.grpcopts import make_channel
from cpcoord.image import load_image, region_bytes
from cpcoord.tls import TlsFiles, init_dev_pki
from testbed.cluster import Cluster
from testbed.daemons import REPO, Daemon, daemon_env, wait_for
from tests.helpers.e2e import attach

pytestmark = [pytest.mark.integration]

COORD_METHODS = [m.name for m in coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].methods]


def files(pki: Path, stem: str) -> TlsFiles:
    return TlsFiles(pki / f"{stem}.pem", pki / f"{stem}.key", pki / "ca.pem")


def tls_args(t: TlsFiles) -> list[str]:
    return ["--tls-cert", str(t.cert), "--tls-key", str(t.key), "--tls-ca", str(t.ca)]


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    init_dev_pki(tmp_path / "pki", agents=["node-a"])
    return tmp_path / "pki"


@pytest.fixture
def other_pki(tmp_path: Path) -> Path:
    init_dev_pki(tmp_path / "other", agents=["node-a"])
    return tmp_path / "other"


def cpcoord(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cpcoord", *args]
    return subprocess.run(
        argv, cwd=REPO, env=daemon_env(), capture_output=True, text=True, timeout=timeout
    )


@contextlib.contextmanager
def coordinator(tmp: Path, *extra: str) -> Iterator[str]:
    port_file = tmp / "port"
    port_file.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "cpcoord", "--log-level", "info", "coordinator"]
    argv += [
        "--listen",
        "127.0.0.1:0",
        "--store",
        str(tmp / "store"),
        "--port-file",
        str(port_file),
    ]
    d = Daemon("coordinator", [*argv, *extra], tmp / "coordinator.log", daemon_env())
    d.start()
    try:
        yield f"127.0.0.1:{d.wait_port(port_file)}"
    finally:
        d.stop()


def call(ch: grpc.Channel, method: str, timeout: float = 5) -> grpc.StatusCode:
    """Call a Coordinator method with an empty request; the status it ends with."""
    stub = coordinator_pb2_grpc.CoordinatorStub(ch)
    fn = getattr(stub, method)
    req_type = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].methods_by_name[method]
    req = getattr(coordinator_pb2, req_type.input_type.name)()
    try:
        r = fn(req, timeout=timeout)
        if hasattr(r, "__next__"):
            for _ in r:
                pass
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


# -- start-up refusals and certs ---------------------------------------------------------


def test_certs_init_writes_owner_only_pki(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    r = cpcoord("certs", "init", "--out", str(out), "--agent", "n1", "--san", "coord.example")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    names = sorted(p.name for p in out.iterdir())
    for want in (
        "ca.pem",
        "coordinator.key",
        "agent-n1.pem",
        "admin.token",
        "viewer.pem",
        "tokens",
    ):
        assert want in names
    assert all(stat.S_IMODE((out / n).stat().st_mode) == 0o600 for n in names)
    cert = x509.load_pem_x509_certificate((out / "coordinator.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coord.example" in san.get_values_for_type(x509.DNSName)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    # The token file stores digests only, never a token.
    tokens = (out / "tokens").read_text()
    assert (out / "admin.token").read_text().strip() not in tokens


def test_coordinator_without_tls_or_insecure_refuses_to_start(tmp_path: Path) -> None:
    r = cpcoord("coordinator", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "s"))
    assert r.returncode == 110, r.stderr
    assert "--insecure" in r.stderr and "--tls-cert" in r.stderr
    assert not (tmp_path / "s").exists()  # refused before touching the store


def test_plaintext_bind_any_needs_explicit_flag(tmp_path: Path) -> None:
    r = cpcoord(
        "coordinator", "--listen", "0.0.0.0:0", "--store", str(tmp_path / "s"), "--insecure"
    )
    assert r.returncode == 111, r.stderr
    assert "--insecure-bind-any" in r.stderr
    # Loopback plaintext still works.
    with coordinator(tmp_path, "--insecure") as addr, make_channel(addr, True) as ch:
        assert call(ch, "ListJobs") is grpc.StatusCode.OK


def test_agent_without_tls_or_insecure_refuses_to_start() -> None:
    r = cpcoord("agent", "--coordinator", "127.0.0.1:1", "--node", "n1", timeout=30)
    assert r.returncode == 110, r.stderr


# -- mTLS --------------------------------------------------------------------------------


def test_mtls_refuses_clients_without_a_trusted_certificate(
    tmp_path: Path, pki: Path, other_pki: Path
) -> None:
    with coordinator(tmp_path, *tls_args(files(pki, "coordinator"))) as addr:
        with make_channel(addr, True) as plain:  # plaintext to a TLS server
            assert call(plain, "ListJobs") is grpc.StatusCode.UNAVAILABLE
        ca = (pki / "ca.pem").read_bytes()
        no_cert = grpc.secure_channel(addr, grpc.ssl_channel_credentials(root_certificates=ca))
        with no_cert:
            for m in COORD_METHODS:
                assert call(no_cert, m) is grpc.StatusCode.UNAVAILABLE, m
        # A client certificate from another CA (which trusts our server: its CA is ours).
        foreign = TlsFiles(other_pki / "admin.pem", other_pki / "admin.key", pki / "ca.pem")
        with make_channel(addr, tls=foreign) as ch:
            assert call(ch, "ListJobs") is grpc.StatusCode.UNAVAILABLE
        # A client that trusts another CA refuses our server.
        with make_channel(addr, tls=files(other_pki, "admin")) as ch:
            assert call(ch, "ListJobs") is grpc.StatusCode.UNAVAILABLE
        with make_channel(addr, tls=files(pki, "admin")) as ch:
            assert call(ch, "ListJobs") is grpc.StatusCode.OK


def test_roles_from_client_certificates(tmp_path: Path, pki: Path) -> None:
    with coordinator(tmp_path, *tls_args(files(pki, "coordinator"))) as addr:
        with make_channel(addr, tls=files(pki, "viewer")) as ch:
            for m in ("ListJobs", "ListAgents", "ListGenerations", "StoreStats"):
                assert call(ch, m) is not grpc.StatusCode.PERMISSION_DENIED, m
            for m in (
                "Checkpoint",
                "Restore",
                "DeleteGeneration",
                "GarbageCollect",
                "AttachMember",
                "DetachMember",
                "ReadGeneration",
                "PinGeneration",
            ):
                assert call(ch, m) is grpc.StatusCode.PERMISSION_DENIED, m
        with make_channel(addr, tls=files(pki, "agent-node-a")) as ch:
            assert call(ch, "ListJobs") is grpc.StatusCode.PERMISSION_DENIED
        with make_channel(addr, tls=files(pki, "admin")) as ch:  # admin is no agent
            stub = agent_pb2_grpc.AgentControlStub(ch)
            with pytest.raises(grpc.RpcError) as ei:
                stub.MissingChunks(_missing(), timeout=5)
            assert ei.value.code() is grpc.StatusCode.PERMISSION_DENIED
        # The CLI: a viewer's checkpoint exits with Forbidden's code.
        env_args = ["--coordinator", addr, *tls_args(files(pki, "viewer"))]
        r = cpcoord("checkpoint", "--job", "j", *env_args)
        assert r.returncode == 114, (r.returncode, r.stderr)
        r = cpcoord("jobs", "--json", *env_args)
        assert r.returncode == 0, r.stderr


def _missing() -> Any:
    from cpcoord.gen.v1 import agent_pb2

    return agent_pb2.MissingChunksRequest()


# -- tokens ------------------------------------------------------------------------------


def test_tokens_every_rpc_refused_without_one_viewer_read_only(tmp_path: Path, pki: Path) -> None:
    admin = (pki / "admin.token").read_text().strip()
    viewer = (pki / "viewer.token").read_text().strip()
    with coordinator(tmp_path, "--insecure", "--tokens", str(pki / "tokens")) as addr:
        with make_channel(addr, True) as ch:
            for m in COORD_METHODS:
                assert call(ch, m) is grpc.StatusCode.UNAUTHENTICATED, m
        with make_channel(addr, True, token="not-a-token") as ch:
            assert call(ch, "ListJobs") is grpc.StatusCode.UNAUTHENTICATED
        with make_channel(addr, True, token=viewer) as ch:
            assert call(ch, "ListJobs") is grpc.StatusCode.OK
            for m in ("Checkpoint", "Restore", "DeleteGeneration", "GarbageCollect"):
                assert call(ch, m) is grpc.StatusCode.PERMISSION_DENIED, m
        with make_channel(addr, True, token=admin) as ch:
            assert call(ch, "ListJobs") is grpc.StatusCode.OK
            assert call(ch, "DeleteGeneration") not in (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
            )
        r = cpcoord("checkpoint", "--job", "j", "--coordinator", addr, "--token", viewer)
        assert r.returncode == 114, r.stderr
        r = cpcoord("jobs", "--coordinator", addr)
        assert r.returncode == 113, r.stderr
        log = (tmp_path / "coordinator.log").read_text()
        assert admin not in log and viewer not in log


# -- agents ------------------------------------------------------------------------------


class TlsCluster(Cluster):
    """tests/helpers/cluster.py's Cluster with every hop on mTLS: the daemons and the CLI
    get their certificates through $CPCOORD_TLS_* (TLS wins over the --insecure the base
    class passes)."""

    pki: Path = Path()

    @contextlib.contextmanager
    def _as(self, stem: str) -> Iterator[None]:
        t = files(self.pki, stem)
        saved = {
            k: os.environ.get(k) for k in ("CPCOORD_TLS_CERT", "CPCOORD_TLS_KEY", "CPCOORD_TLS_CA")
        }
        os.environ.update(
            CPCOORD_TLS_CERT=str(t.cert), CPCOORD_TLS_KEY=str(t.key), CPCOORD_TLS_CA=str(t.ca)
        )
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def start_coordinator(self, pause: Any = ()) -> None:
        with self._as("coordinator"):
            super().start_coordinator(pause)

    def start_agent(self, node: str, pause: Any = ()) -> Daemon:
        with self._as(f"agent-{node}"):
            return super().start_agent(node, pause)

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> Any:
        with self._as("admin"):
            return super().cli(*args, check=check, timeout=timeout)

    def agents_json(self) -> dict[str, bool]:
        with make_channel(self.address, tls=files(self.pki, "admin")) as ch:
            stub = coordinator_pb2_grpc.CoordinatorStub(ch)
            try:
                resp = stub.ListAgents(coordinator_pb2.ListAgentsRequest(), timeout=5)
            except grpc.RpcError:
                return {}
        return {a.node: a.connected for a in resp.agents}


@pytest.fixture
def tls_cluster(
    tmp_path: Path, pki: Path, store_select: Callable[[Path], dict[str, Any]]
) -> Iterator[TlsCluster]:
    root = tmp_path / "cluster"
    c = TlsCluster(root, nodes=("node-a",), **store_select(root))
    c.pki = pki
    c.root.mkdir(parents=True)
    try:
        yield c
    finally:
        c.close()


def test_agent_refuses_a_coordinator_it_does_not_trust(
    tls_cluster: TlsCluster, other_pki: Path
) -> None:
    c = tls_cluster
    c.faults.mkdir(parents=True, exist_ok=True)
    c.start_coordinator()
    # The agent's CA is another one: it must not accept our coordinator's certificate.
    argv = [sys.executable, "-m", "cpcoord", "--log-level", "info", "agent"]
    argv += ["--coordinator", c.address, "--node", "node-a"]
    argv += tls_args(files(other_pki, "agent-node-a"))
    d = Daemon("agent-untrusting", argv, c.root / "agent-untrusting.log", daemon_env())
    d.start()
    c.agents["node-a"] = d  # torn down with the cluster
    try:
        wait_for(
            lambda: "tls handshake failed" in d.log.read_text().lower() or not d.alive(), 30, "dial"
        )
        assert d.alive()
        assert c.agents_json() == {}  # never attached
    finally:
        d.kill()
    c.start_agent("node-a")  # the trusting agent connects
    c.wait_agents(["node-a"])


@pytest.mark.slow
def test_checkpoint_and_export_over_mtls(
    tls_cluster: TlsCluster, target_factory: Any, tmp_path: Path
) -> None:
    c = tls_cluster.start()
    t = target_factory(maps=["data:64:anon:random:7"])
    m = t.mapping("data")
    attach(c, "j", "m", t, "node-a")
    g = c.cli_json("checkpoint", "--job", "j")
    assert g["state"] == "committed", g
    out = tmp_path / "export"
    c.cli("export", "--job", "j", "--generation", str(g["generation"]), "--out", str(out))
    image = load_image(out)
    region = next(r for r in image.member("m").regions if r.start == m.addr)
    got = np.array(region_bytes(image, "m", region.name)).reshape(-1)
    want = t.read("data", 0, 64).reshape(-1)
    assert want.size == 64 * 4096
    assert np.array_equal(got, want)


def test_agent_certificate_binds_its_node_name(tls_cluster: TlsCluster, pki: Path) -> None:
    c = tls_cluster
    c.faults.mkdir(parents=True, exist_ok=True)
    c.start_coordinator()
    # node-a's certificate, claiming to be node-b: the coordinator refuses the stream.
    argv = [sys.executable, "-m", "cpcoord", "--log-level", "info", "agent"]
    argv += ["--coordinator", c.address, "--node", "node-b"]
    argv += tls_args(files(pki, "agent-node-a"))
    d = Daemon("agent-impostor", argv, c.root / "agent-impostor.log", daemon_env())
    d.start()
    c.agents["node-b"] = d
    try:
        wait_for(lambda: "certificate is for node" in d.log.read_text(), 30, "refusal")
        assert c.agents_json() == {}
    finally:
        d.kill()
