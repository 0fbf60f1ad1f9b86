"""`cpcoord coordinator`: run the coordinator daemon (gRPC server, engine, store)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cpcoord.errors import InvalidArgument

NAME = "coordinator"
HELP = "run the coordinator daemon"
DESCRIPTION = """\
Serve the agents' control streams and the clients' API on HOST:PORT, keep generations in
the store directory DIR (created if missing), and drive coordinated checkpoints. Stops
gracefully on SIGTERM or SIGINT: checkpoints in flight are aborted (every member thaws),
streams end, the store is closed."""
EPILOG = """\
examples:
  cpcoord coordinator --listen 0.0.0.0:7420 --store /var/lib/cpcoord --insecure
  # tests: any free port, written to a file once listening
  cpcoord coordinator --listen 127.0.0.1:0 --port-file /tmp/port --store /tmp/store"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to serve on")
    p.add_argument("--store", required=True, type=Path, metavar="DIR", help="store directory")
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
        help="plaintext gRPC (the only transport until TLS lands; also CPCOORD_INSECURE=1)",
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


def run(args: argparse.Namespace) -> int:
    from coordinator.engine import Options
    from coordinator.server import serve

    if args.keep < 1:
        raise InvalidArgument(f"--keep must be at least 1, got {args.keep}")
    if not 50 <= args.heartbeat_ms <= 60_000:
        raise InvalidArgument(f"--heartbeat-ms must be 50..60000, got {args.heartbeat_ms}")
    if args.metrics_port is not None and not 0 < args.metrics_port < 65536:
        raise InvalidArgument(f"--metrics-port must be 1..65535, got {args.metrics_port}")
    opts = Options(keep=args.keep, heartbeat_s=args.heartbeat_ms / 1000)
    return serve(
        args.listen, args.store, opts, port_file=args.port_file, metrics_port=args.metrics_port
    )
