"""The replica daemon: `cpcoord coordinator --etcd http://HOST:PORT[,...]`.

Listens at once (as a follower), campaigns through etcd (election.py) and leads when
elected (replica.py); writes the port file once listening, like the single coordinator.
On SIGTERM/SIGINT: health NOT_SERVING, stop campaigning, step down (what is in flight
aborts, agents' streams end), give the lease back so another replica takes over at
once instead of after the TTL, close the server.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from coordinator.aioserver import AioServer
from coordinator.auth import check_transport
from coordinator.engine import Options
from coordinator.ha import metrics as ha_metrics
from coordinator.ha.election import Elector, Timing
from coordinator.ha.etcd import EtcdClient
from coordinator.ha.replica import Replica
from coordinator.server import ServeConfig, stop_event, write_port_file
from coordinator.serving import Serving
from cpcoord.errors import InvalidArgument
from cpcoord.log import log_event

log = logging.getLogger("cpcoord.coordinator.ha")
ANY_HOST = ("", "0.0.0.0", "::", "[::]")


def advertised(listen: str, port: int, advertise: str | None) -> str:
    """The address other replicas name to clients and agents: --advertise, else the
    listen host with the bound port (the host name when listening on every interface)."""
    if advertise:
        host, sep, p = advertise.rpartition(":")
        if not sep or not host or not p.isdigit() or not 0 < int(p) < 65536:
            raise InvalidArgument(f"--advertise must be HOST:PORT, got {advertise!r}")
        return advertise
    host = listen.rpartition(":")[0]
    if host in ANY_HOST:
        host = socket.getfqdn()
    return f"{host}:{port}"


def serve_replica(
    listen: str,
    store: Path | str,
    options: Options,
    config: ServeConfig,
    *,
    etcd: str,
    prefix: str = "/cpcoord",
    ttl_s: int = 3,
    advertise: str | None = None,
) -> int:
    security, sealer, rpc_threads = config.security, config.sealer, config.rpc_threads
    port_file, metrics_port, state_dir = config.port_file, config.metrics_port, config.state_dir
    check_transport(listen, security)
    client = EtcdClient(etcd)
    timing = Timing(ttl_s)
    if not prefix.startswith("/") or prefix.rstrip("/") == "":
        raise InvalidArgument(f"--etcd-prefix must be an absolute key prefix, got {prefix!r}")
    if str(store).startswith("s3://") and not (state_dir or os.environ.get("CPCOORD_STATE_DIR")):
        log_event(
            log, logging.WARNING,
            "replicas of an S3 store need one shared state directory (--state-dir): "
            "each replica's own catalog would lack the others' members and pins",
        )  # fmt: skip
    serving = Serving(None)
    server = AioServer(
        listen,
        serving,
        security=security,
        max_message_bytes=options.max_message_bytes,
        rpc_threads=rpc_threads,
    )
    address = advertised(listen, server.port, advertise)
    replica = Replica(store, options, serving, sealer, state_dir)
    elector = Elector(client, prefix, address, replica, timing)
    replica.elector = elector
    if metrics_port is not None:
        ha_metrics.serve(replica, metrics_port)
    stop = stop_event()
    server.start()
    if port_file is not None:
        write_port_file(port_file, server.port)
    log_event(
        log, logging.INFO, "replica listening", listen=listen, port=server.port,
        address=address, etcd=str(client), prefix=prefix, ttl_s=ttl_s, store=str(store),
        tls=security.tls is not None,
    )  # fmt: skip
    elector.start()
    stop.wait()
    log_event(log, logging.INFO, "coordinator stopping")
    server.enter_graceful_shutdown()
    replica.stop()  # step down first: nothing commits after this
    elector.stop(resign=True)
    server.stop(grace=3).wait()
    return 0
