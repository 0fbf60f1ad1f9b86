"""`cpcoord agent`: run the node agent daemon (nodeagent/daemon/agent.py)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from cpcoord.errors import InvalidArgument
from cpcoord.humanize import parse_bytes
from cpcoord.ranges import check_name

if TYPE_CHECKING:  # imported in `run`: `cpcoord --help` must not pay for them
    from nodeagent.daemon.agent import Agent

NAME = "agent"
HELP = "run the node agent daemon"
DESCRIPTION = """\
Dial the coordinator at HOST:PORT as node NAME and hold one control stream: attach and
detach members on command, freeze them for a checkpoint, copy their changed pages while
frozen, thaw each as soon as its copy is staged, upload after the thaw. Reconnects with
exponential backoff; a broken stream thaws everything at once. A member is never held
frozen longer than its lease (the coordinator's, at most --lease), and if the agent dies
the kernel releases every process it held.

Trackers (--tracker): auto (uffd-wp, else soft-dirty, else hash), uffd-wp, soft-dirty,
hash, none (every capture full). `--check` prints what this kernel supports and exits.
Stops on SIGTERM or SIGINT: thaws everything, disarms trackers.

Local API (docs/local-api.md): processes on this node register their memory, checkpoint
themselves or their job and restore after a restart over the Unix socket --socket
(default /run/cpcoord/agent.sock; a default socket that cannot be served is a warning,
an explicit one an error; --no-socket serves none). The agent takes attach and
checkpoint requests to the coordinator's client API with --local-api-token-file (an
admin token) when the coordinator enforces auth."""
EPILOG = """\
examples:
  cpcoord agent --coordinator coord.example:7420 --node $(hostname) --insecure
  cpcoord agent --coordinator 127.0.0.1:7420 --node n1 --insecure --lease 5 --tracker hash
  cpcoord agent --check"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--coordinator",
        metavar="HOST:PORT[,...]",
        help="the coordinator to dial; every replica's address when it runs as replicas",
    )
    p.add_argument("--node", metavar="NAME", help="this node's name, unique per coordinator")
    p.add_argument("--metrics-port", type=int, metavar="P", help="serve Prometheus /metrics")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC without TLS (also CPCOORD_INSECURE=1)",
    )
    _add_security_arguments(p)
    p.add_argument(
        "--lease",
        type=float,
        default=10.0,
        metavar="S",
        help="longest any member stays frozen, seconds (default 10; the coordinator's "
        "lease applies when shorter)",
    )
    p.add_argument(
        "--tracker",
        default="auto",
        metavar="T",
        help="default tracker for members that name none: auto, uffd-wp, soft-dirty, hash, none",
    )
    p.add_argument(
        "--data-path",
        choices=("auto", "direct", "coordinator"),
        default="auto",
        help="how pages reach the store: direct (this agent puts packs into the store the "
        "coordinator announces, S3 endpoint and credentials from this agent's environment), "
        "coordinator (through the coordinator), auto (direct when the store opens from "
        "here and its id matches, else the coordinator; default)",
    )
    p.add_argument(
        "--store-key-file",
        type=Path,
        metavar="FILE",
        help="an encrypted store's key for the direct data path when the coordinator does "
        "not send it (it does only over mTLS); also $CPCOORD_STORE_KEY",
    )
    p.add_argument(
        "--cache",
        type=Path,
        metavar="DIR",
        help="node cache (tmpfs or local NVMe): checkpoints commit once packs are durable "
        "here (level local) and drain to the store in the background (docs/multilevel.md); "
        "needs the direct data path",
    )
    p.add_argument(
        "--cache-size",
        type=_size,
        default=0,
        metavar="BYTES",
        help="bound of the cache (e.g. 8G; default: the file system's free space); when a "
        "pack does not fit it goes to the store directly",
    )
    p.add_argument(
        "--cache-keep",
        type=int,
        default=2,
        metavar="K",
        help="drained generations kept in the cache per job (default 2)",
    )
    p.add_argument(
        "--drain-rate",
        type=_size,
        default=0,
        metavar="BYTES/s",
        help="bound of the drain to the store (e.g. 200M; default unlimited)",
    )
    p.add_argument(
        "--partner-listen",
        metavar="HOST:PORT",
        help="take partner copies of other nodes' cached packs here (level partner, "
        "docs/multilevel.md; mTLS with this agent's certificate; port 0: any free port; "
        "needs --cache)",
    )
    p.add_argument(
        "--compress",
        choices=("auto", "zstd", "none"),
        default="auto",
        help="compress uploaded chunks (auto: zstd unless the coordinator is on loopback)",
    )
    p.add_argument(
        "--upload-threads", type=int, default=2, metavar="N", help="members uploaded at once"
    )
    p.add_argument("--check", action="store_true", help="print the tracker report and exit")
    p.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help="serve the local API here (default /run/cpcoord/agent.sock)",
    )
    p.add_argument("--no-socket", action="store_true", help="serve no local API")


def _add_security_arguments(p: argparse.ArgumentParser) -> None:
    from cpcoord.clientconn import add_tls_arguments

    g = p.add_argument_group("security (see docs/security.md)")
    add_tls_arguments(g)
    g.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="an `agent` role token, for a plaintext coordinator with --tokens",
    )
    g.add_argument(
        "--local-api-token-file",
        type=Path,
        metavar="FILE",
        help="an `admin` token for the local API's attach and checkpoint requests "
        "(default: the agent's own credential, which an enforcing coordinator refuses)",
    )


def _channel_factory(args: argparse.Namespace) -> Callable[[str, bool], Any]:
    """mTLS (verifying the coordinator against --tls-ca) unless --insecure; refuses to
    run with neither, so an agent never obeys a coordinator it cannot authenticate."""
    from cpcoord import grpcopts
    from cpcoord.clientconn import tls_from_args
    from cpcoord.errors import InsecureRefused
    from cpcoord.tokens import client_token

    tls = tls_from_args(args)
    if tls is None and not grpcopts.insecure_requested(args.insecure):
        raise InsecureRefused()
    token = client_token(None, args.token_file) if args.token_file is not None else None
    return lambda addr, insecure: grpcopts.make_channel(addr, insecure, tls=tls, token=token)


def run(args: argparse.Namespace) -> int:
    if args.check:
        from cpcoord.cli import check

        return check.run(argparse.Namespace(json=False, verbose=True))
    # Imported here: `cpcoord --help` must not pay for NumPy and gRPC. numpy.ma: the
    # first np.unique imports it (~8 ms), inside the first checkpoint otherwise.
    import numpy.ma  # noqa: F401
    from prometheus_client import CollectorRegistry

    from cpcoord import clientconn, grpcopts
    from nodeagent.daemon import metrics
    from nodeagent.daemon.agent import Agent, AgentConfig
    from nodeagent.trackers import registry

    if not args.coordinator or not args.node:
        raise InvalidArgument("--coordinator HOST:PORT and --node NAME are required")
    check_name(args.node)
    from cpcoord.endpoints import parse

    parse(args.coordinator)  # HOST:PORT[,HOST:PORT...] (replicas)
    if not 0.1 <= args.lease <= 600:
        raise InvalidArgument(f"--lease must be 0.1..600 seconds, got {args.lease}")
    if not 1 <= args.upload_threads <= 64:
        raise InvalidArgument(f"--upload-threads must be 1..64, got {args.upload_threads}")
    if args.metrics_port is not None and not 0 < args.metrics_port < 65536:
        raise InvalidArgument(f"--metrics-port must be 1..65535, got {args.metrics_port}")
    if args.cache is not None and args.data_path == "coordinator":
        raise InvalidArgument("--cache needs the direct data path (not --data-path coordinator)")
    if not 1 <= args.cache_keep <= 1000:
        raise InvalidArgument(f"--cache-keep must be 1..1000, got {args.cache_keep}")
    if args.partner_listen is not None:
        if args.cache is None:
            raise InvalidArgument("--partner-listen needs --cache (copies are kept there)")
        host, _, port = args.partner_listen.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise InvalidArgument(f"--partner-listen must be HOST:PORT: {args.partner_listen!r}")
    tracker = registry.canonical(args.tracker)
    if tracker != registry.AUTO:
        registry.choose(tracker)  # TrackerUnavailable now, not at the first capture
    factory = _channel_factory(args)  # InsecureRefused before anything starts
    config = AgentConfig(
        coordinator=args.coordinator,
        node=args.node,
        insecure=grpcopts.insecure_requested(args.insecure),
        lease_s=args.lease,
        tracker=tracker,
        compress=args.compress,
        upload_threads=args.upload_threads,
        data_path=args.data_path,
        store_key_file=args.store_key_file,
        cache_dir=args.cache,
        cache_size=args.cache_size,
        cache_keep=args.cache_keep,
        drain_rate=float(args.drain_rate),
        partner_listen=args.partner_listen,
        tls=clientconn.tls_from_args(args),
    )
    scraped = CollectorRegistry(auto_describe=True)
    agent = Agent(config, channel_factory=factory, metrics=metrics.install(scraped, tracker))
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port, scraped)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.start()
    print(f"cpcoord agent: node {args.node} dialing {args.coordinator}", file=sys.stderr)
    server = None if args.no_socket else _local_api(args, agent, config.insecure)
    try:
        while not stopping.wait(0.5):
            if agent.fatal is not None:  # e.g. --data-path direct and no store from here
                break
    finally:
        if server is not None:
            server.close()
        agent.stop()
    if agent.fatal is not None:
        raise agent.fatal
    return 0


def _local_api(args: argparse.Namespace, agent: Agent, insecure: bool) -> Any:
    """Serve the local API socket; None when the default socket cannot be served."""
    import logging

    from cpcoord import clientconn
    from cpcoord.api import Client
    from cpcoord.errors import CpcoordError
    from cpcoord.local_wire import DEFAULT_SOCKET
    from cpcoord.tokens import client_token
    from nodeagent.localapi.backend import AgentBackend
    from nodeagent.localapi.server import LocalApiServer

    tls = clientconn.tls_from_args(args)
    # Its own credential unless told otherwise: the coordinator then refuses what the
    # `agent` role may not do (Forbidden), a clear answer to the calling process.
    token_file = args.local_api_token_file or args.token_file
    token = client_token(None, token_file) if token_file is not None else None

    def connect() -> Client:
        return Client.over(clientconn.Client(args.coordinator, insecure, tls=tls, token=token))

    server = LocalApiServer(args.socket or DEFAULT_SOCKET, AgentBackend(agent, connect))
    try:
        server.start()
    except CpcoordError as e:
        if args.socket:
            agent.stop()
            raise
        logging.getLogger("cpcoord.agent").warning(
            "local API not served", extra={"fields": {"socket": DEFAULT_SOCKET, "error": str(e)}}
        )
        return None
    print(f"cpcoord agent: local API on {server.path}", file=sys.stderr)
    return server


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 8G)") from None
