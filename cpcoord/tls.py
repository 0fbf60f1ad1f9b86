"""Transport security material: the development PKI (`cpcoord certs init`), loading the
`--tls-cert/--tls-key/--tls-ca` triple, and gRPC credentials built from it.

Identities live in the certificate's common name, so the coordinator's one auth
interceptor (coordinator/auth.py) can map a verified peer to a role without a lookup:
`cpcoord-agent:NODE` for agents, `cpcoord-admin` / `cpcoord-viewer` for clients, and
`cpcoord-coordinator` for the server. Private keys and tokens are written 0600 in a 0700
directory; nothing here logs key material.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cpcoord.errors import InvalidArgument, TlsConfigInvalid

CN_AGENT_PREFIX = "cpcoord-agent:"
CN_ADMIN = "cpcoord-admin"
CN_VIEWER = "cpcoord-viewer"
CN_SERVER = "cpcoord-coordinator"
VALID_DAYS = 825


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one peer: its certificate, its key, and the CA it trusts."""

    cert: Path
    key: Path
    ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        out = []
        for what, p in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            try:
                out.append(p.read_bytes())
            except OSError as e:
                raise TlsConfigInvalid(f"cannot read {what} {p}: {e.strerror}") from None
        return out[0], out[1], out[2]


def tls_files(cert: Path | None, key: Path | None, ca: Path | None) -> TlsFiles | None:
    """The triple, or None when none was given; a partial triple is an error."""
    given = [x is not None for x in (cert, key, ca)]
    if not any(given):
        return None
    if not all(given):
        raise TlsConfigInvalid("--tls-cert, --tls-key and --tls-ca must be given together")
    assert cert is not None and key is not None and ca is not None
    return TlsFiles(cert, key, ca)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server side of mTLS: every peer must present a certificate signed by the CA."""
    cert, key, ca = files.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def agent_server_name(node: str) -> str:
    """The DNS name an agent's certificate carries for its partner listener
    (`cpcoord agent --partner-listen`): a partner is dialled by address and verified by
    this name, so a copy goes only to the node the coordinator chose."""
    return f"{node.replace('_', '-').lower()}.agent.cpcoord"


def peer_agent(context: object) -> str | None:
    """The agent node named by a verified client certificate (CN cpcoord-agent:NODE) of
    a sync servicer context; None when the peer is no agent or presented nothing."""
    auth = getattr(context, "auth_context", None)
    for cn in (auth() if auth is not None else {}).get("x509_common_name", ()):
        name = cn.decode(errors="replace") if isinstance(cn, bytes) else str(cn)
        if name.startswith(CN_AGENT_PREFIX):
            return name[len(CN_AGENT_PREFIX) :]
    return None


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Client side of mTLS: verify the server against the CA, present our certificate."""
    cert, key, ca = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


# -- development PKI --------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cpcoord"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _write(path: Path, data: bytes) -> None:
    # O_EXCL-free but created 0600 from the start: the key never exists world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
    return k.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _new_ca() -> Ca:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    name = _name("cpcoord development CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Ca(key, cert)


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(out)


def _issue(ca: Ca, cn: str, *, server: bool, sans: Iterable[str] = ()) -> tuple[bytes, bytes]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
    if cn.startswith(CN_AGENT_PREFIX):  # an agent also serves partner copies
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        server, sans = True, [agent_server_name(cn[len(CN_AGENT_PREFIX) :])]
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if server:
        b = b.add_extension(_san(sans), critical=False)
    cert = b.sign(ca.key, hashes.SHA256())
    return _pem_cert(cert), _pem_key(key)


def check_name(name: str, what: str) -> None:
    ok = name and len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name)
    if not ok:
        raise InvalidArgument(f"{what} must be 1-64 of [A-Za-z0-9._-], got {name!r}")


@dataclass(frozen=True)
class InitResult:
    out: Path
    files: tuple[str, ...]


def token_digest(token: str) -> str:
    """What a token file stores: the SHA-256 of the token, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def init_dev_pki(out: Path, sans: Iterable[str] = (), agents: Iterable[str] = ()) -> InitResult:
    """Write ca.pem (+ca.key), coordinator.pem/.key, agent-NAME.pem/.key, admin.pem/.key,
    viewer.pem/.key, and tokens (hashes) plus admin.token/viewer.token into `out`."""
    agents = list(agents)
    sans = ["127.0.0.1", "localhost", *sans]
    for a in agents:
        check_name(a, "--agent NAME")
    for s in sans:
        if not s or len(s) > 253 or any(c.isspace() for c in s):
            raise InvalidArgument(f"--san must be a host name or IP address, got {s!r}")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    ca = _new_ca()
    written: list[str] = []

    def put(name: str, data: bytes) -> None:
        _write(out / name, data)
        written.append(name)

    put("ca.pem", _pem_cert(ca.cert))
    put("ca.key", _pem_key(ca.key))
    issued = [("coordinator", CN_SERVER, True)]
    issued += [(f"agent-{a}", CN_AGENT_PREFIX + a, False) for a in agents]
    issued += [("admin", CN_ADMIN, False), ("viewer", CN_VIEWER, False)]
    for stem, cn, server in issued:
        cert, key = _issue(ca, cn, server=server, sans=sans)
        put(f"{stem}.pem", cert)
        put(f"{stem}.key", key)
    lines = []
    for role in ("admin", "viewer"):
        # Hex, not urlsafe base64: a token that starts with '-' cannot follow `--token`
        # on a command line (argparse reads it as an option; CI met one).
        tok = secrets.token_hex(32)
        put(f"{role}.token", (tok + "\n").encode())
        lines.append(f"{role} sha256:{token_digest(tok)}\n")
    put("tokens", ("# ROLE sha256:HEX (cpcoord coordinator --tokens)\n" + "".join(lines)).encode())
    return InitResult(out, tuple(written))
