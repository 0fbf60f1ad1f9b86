"""`cpcoord coordinator`: run the coordinator daemon (gRPC server, engine, store)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cpcoord.errors import InvalidArgument

if TYPE_CHECKING:
    from coordinator.auth import Security

NAME = "coordinator"
HELP = "run the coordinator daemon"
DESCRIPTION = """\
Serve the agents' control streams and the clients' API on HOST:PORT, keep generations in
the store directory DIR (created if missing), and drive coordinated checkpoints. Stops
gracefully on SIGTERM or SIGINT: checkpoints in flight are aborted (every member thaws),
streams end, the store is closed."""
EPILOG = """\
examples:
  cpcoord coordinator --listen 0.0.0.0:7420 --store /var/lib/cpcoord \
      --tls-cert pki/coordinator.pem --tls-key pki/coordinator.key --tls-ca pki/ca.pem \
      --tokens pki/tokens
  cpcoord coordinator --listen 127.0.0.1:7420 --store /tmp/store --insecure
  # tests: any free port, written to a file once listening
  cpcoord coordinator --listen 127.0.0.1:0 --port-file /tmp/port --store /tmp/store"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to serve on")
    p.add_argument(
        "--store",
        required=True,
        metavar="DIR|s3://BUCKET/PREFIX",
        help="store directory, or an S3 bucket and prefix (endpoint and credentials from "
        "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... and ~/.aws; catalog under $CPCOORD_STATE_DIR)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="where the catalog and its lock live (default: in a store directory itself; "
        "for S3 under $CPCOORD_STATE_DIR); the catalog is bound to the store it describes "
        "and rebuilt from the store when opened against another one",
    )
    p.add_argument(
        "--keep",
        type=int,
        default=5,
        metavar="N",
        help="committed generations kept per job, plus pinned ones (default 5)",
    )
    p.add_argument("--metrics-port", type=int, metavar="P", help="serve Prometheus /metrics")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext gRPC without TLS (also CPCOORD_INSECURE=1); loopback only",
    )
    p.add_argument(
        "--insecure-bind-any",
        action="store_true",
        help="with --insecure, allow a non-loopback listen address",
    )
    from cpcoord.clientconn import add_tls_arguments

    g = p.add_argument_group("security (see docs/security.md)")
    add_tls_arguments(g)
    g.add_argument(
        "--encryption-key-file",
        type=Path,
        metavar="FILE",
        help="encrypt packs and manifests at rest with this 32-byte key (raw or 64 hex); "
        "default $CPCOORD_STORE_KEY; none: plaintext store",
    )
    g.add_argument(
        "--tokens",
        type=Path,
        metavar="FILE",
        help="client tokens, `ROLE sha256:HEX` lines (cpcoord certs init writes one)",
    )
    p.add_argument(
        "--port-file",
        type=Path,
        metavar="FILE",
        help="write the bound port here once listening (use with port 0)",
    )
    p.add_argument(
        "--heartbeat-ms",
        type=int,
        default=1000,
        metavar="MS",
        help="agents' heartbeat interval; an agent is lost after 3 silent ones (default 1000)",
    )
    p.add_argument(
        "--rpc-threads",
        type=int,
        default=None,
        metavar="N",
        help="gRPC server threads; each connected agent holds one (default 1024)",
    )


def run(args: argparse.Namespace) -> int:
    from coordinator.engine import Options
    from coordinator.server import RPC_THREADS, serve
    from coordinator.store.crypt import load_key

    if args.keep < 1:
        raise InvalidArgument(f"--keep must be at least 1, got {args.keep}")
    if not 50 <= args.heartbeat_ms <= 60_000:
        raise InvalidArgument(f"--heartbeat-ms must be 50..60000, got {args.heartbeat_ms}")
    if args.metrics_port is not None and not 0 < args.metrics_port < 65536:
        raise InvalidArgument(f"--metrics-port must be 1..65535, got {args.metrics_port}")
    threads = RPC_THREADS if args.rpc_threads is None else args.rpc_threads
    if not 16 <= threads <= 65536:
        raise InvalidArgument(f"--rpc-threads must be 16..65536, got {threads}")
    opts = Options(keep=args.keep, heartbeat_s=args.heartbeat_ms / 1000)
    return serve(
        args.listen,
        args.store,
        opts,
        port_file=args.port_file,
        metrics_port=args.metrics_port,
        security=security(args),
        sealer=load_key(args.encryption_key_file),
        rpc_threads=threads,
        state_dir=args.state_dir,
    )


def security(args: argparse.Namespace) -> Security:
    from coordinator.auth import Security
    from cpcoord.clientconn import tls_from_args
    from cpcoord.grpcutil import insecure_requested
    from cpcoord.tokens import load_tokens

    return Security(
        tls=tls_from_args(args),
        tokens=load_tokens(args.tokens) if args.tokens is not None else {},
        insecure=insecure_requested(args.insecure),
        bind_any=args.insecure_bind_any,
    )
