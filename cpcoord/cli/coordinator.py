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
streams end, the store is closed.

With --etcd, run as one of two or three replicas sharing one store: each listens on its
own address, one is elected leader through etcd and serves; the others answer every call
with the leader's address (clients and agents given all the addresses follow it) and
take over within seconds when it dies (docs/operations.md, "Replicas")."""
EPILOG = """\
examples:
  cpcoord coordinator --listen 0.0.0.0:7420 --store /var/lib/cpcoord \
      --tls-cert pki/coordinator.pem --tls-key pki/coordinator.key --tls-ca pki/ca.pem \
      --tokens pki/tokens
  cpcoord coordinator --listen 127.0.0.1:7420 --store /tmp/store --insecure
  # tests: any free port, written to a file once listening
  cpcoord coordinator --listen 127.0.0.1:0 --port-file /tmp/port --store /tmp/store
  # one of three replicas (the same on c2 and c3, each with its own --listen)
  cpcoord coordinator --listen c1.example:7420 --store /shared/cpcoord \
      --etcd http://e1:2379,http://e2:2379,http://e3:2379 --tls-cert ... --tokens ..."""


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
        "--no-direct-data-path",
        action="store_true",
        help="announce no store to agents: every page goes through the coordinator "
        "(default: agents that can open the store put their packs themselves)",
    )
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
    h = p.add_argument_group("replicas (high availability, see docs/operations.md)")
    h.add_argument(
        "--etcd",
        metavar="URL[,URL...]",
        help="run as a replica elected through etcd: http://HOST:PORT of its members",
    )
    h.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="the address clients and agents are sent to when this replica leads "
        "(default: the --listen host, or this host's name for 0.0.0.0, and the bound port)",
    )
    h.add_argument(
        "--etcd-prefix",
        default="/cpcoord",
        metavar="PREFIX",
        help="etcd key prefix of this set of replicas (default /cpcoord): one per store",
    )
    h.add_argument(
        "--leader-ttl",
        type=int,
        default=3,
        metavar="SECONDS",
        help="the leader's etcd lease; a dead leader is replaced within about this "
        "(default 3, 2..60)",
    )
    p.add_argument(
        "--rpc-threads",
        type=int,
        default=None,
        metavar="N",
        help="threads for the calls that block: uploads, exports, store reads, commands "
        "awaiting an agent (default 64); agents' control streams and Watch streams hold none",
    )


def run(args: argparse.Namespace) -> int:
    # numpy.ma: the first np.unique imports it (~8 ms), inside the first checkpoint.
    import numpy.ma  # noqa: F401

    from coordinator.engine import Options
    from coordinator.server import RPC_THREADS, ServeConfig, serve
    from storecore.crypt import load_key

    if args.keep < 1:
        raise InvalidArgument(f"--keep must be at least 1, got {args.keep}")
    if not 50 <= args.heartbeat_ms <= 60_000:
        raise InvalidArgument(f"--heartbeat-ms must be 50..60000, got {args.heartbeat_ms}")
    if args.metrics_port is not None and not 0 < args.metrics_port < 65536:
        raise InvalidArgument(f"--metrics-port must be 1..65535, got {args.metrics_port}")
    threads = RPC_THREADS if args.rpc_threads is None else args.rpc_threads
    if not 16 <= threads <= 65536:
        raise InvalidArgument(f"--rpc-threads must be 16..65536, got {threads}")
    opts = Options(
        keep=args.keep,
        heartbeat_s=args.heartbeat_ms / 1000,
        direct_data_path=not args.no_direct_data_path,
    )
    if args.advertise and not args.etcd:
        raise InvalidArgument("--advertise is for replicas: give --etcd too")
    config = ServeConfig(
        port_file=args.port_file,
        metrics_port=args.metrics_port,
        security=security(args),
        sealer=load_key(args.encryption_key_file),
        rpc_threads=threads,
        state_dir=args.state_dir,
    )
    if args.etcd:
        from coordinator.ha.serve import serve_replica

        return serve_replica(
            args.listen,
            args.store,
            opts,
            config,
            etcd=args.etcd,
            prefix=args.etcd_prefix,
            ttl_s=args.leader_ttl,
            advertise=args.advertise,
        )
    return serve(args.listen, args.store, opts, config)


def security(args: argparse.Namespace) -> Security:
    from coordinator.auth import Security
    from cpcoord.clientconn import tls_from_args
    from cpcoord.grpcopts import insecure_requested
    from cpcoord.tokens import load_tokens

    return Security(
        tls=tls_from_args(args),
        tokens=load_tokens(args.tokens) if args.tokens is not None else {},
        insecure=insecure_requested(args.insecure),
        bind_any=args.insecure_bind_any,
    )
