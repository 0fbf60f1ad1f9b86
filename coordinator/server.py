"""The coordinator daemon: the gRPC server around the engine and the store.

`create_server(addr, engine)` builds a server with both services, standard health
checking (`grpc.health.v1`) and reflection (so `grpcurl` works), explicit message size
limits, the auth interceptor when TLS or tokens are configured (coordinator/auth.py),
and binds it (mTLS with `Deps.security.tls`); it returns the server and the bound port
(ask for port 0 to get a free one). `serve(...)` is the daemon: check the transport
(coordinator/auth.py), open the store, start the engine, serve, write the port file,
and on SIGTERM/SIGINT stop gracefully: health NOT_SERVING, abort what is in flight
(agents thaw and keep their pending sets), end the streams, close the store.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator.auth import AuthInterceptor, Security, check_transport
from coordinator.engine import Engine, Options
from coordinator.servicers import AgentControl, CoordinatorService
from coordinator.store.config import StoreConfig
from coordinator.store.crypt import Sealer
from coordinator.store.location import open_repository
from cpcoord.errors import InvalidArgument
from cpcoord.gen.v1 import agent_pb2, agent_pb2_grpc, coordinator_pb2, coordinator_pb2_grpc
from cpcoord.grpcutil import add_servicer, server_options
from cpcoord.log import log_event

log = logging.getLogger("cpcoord.coordinator")
SERVICES = (
    agent_pb2.DESCRIPTOR.services_by_name["AgentControl"].full_name,
    coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name,
)


# Threads of the gRPC server when run as a daemon. Every agent's control stream (and
# every Watch) holds one for its whole life, so 64 agents on a 64-thread pool left none
# for any other RPC (bench/scale.py found it). The executor starts threads on demand.
RPC_THREADS = 1024


@dataclass
class Deps:
    """What the server serves: the engine, and the health servicer it flips on stop."""

    engine: Engine
    health: health.HealthServicer = field(default_factory=health.HealthServicer)
    max_workers: int = 64
    # None: a library/test server, plaintext and open as before; serve() always sets it.
    security: Security | None = None


def create_server(addr: str, deps: Deps) -> tuple[grpc.Server, int]:
    """A bound (not started) server; returns (server, port)."""
    engine = deps.engine
    sec = deps.security
    if sec is not None:
        check_transport(addr, sec)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=deps.max_workers, thread_name_prefix="rpc"),
        options=server_options(engine.opt.max_message_bytes),
        interceptors=[AuthInterceptor(sec)] if sec is not None and sec.enforced else None,
    )
    add_servicer(agent_pb2_grpc.add_AgentControlServicer_to_server, AgentControl(engine), server)
    add_servicer(
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server, CoordinatorService(engine), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(deps.health, server)
    for name in ("", *SERVICES):
        deps.health.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        if sec is not None and sec.tls is not None:
            from cpcoord.tls import server_credentials

            port = server.add_secure_port(addr, server_credentials(sec.tls))
        else:
            port = server.add_insecure_port(addr)
    except RuntimeError as e:
        raise InvalidArgument(f"cannot listen on {addr}: {e}") from None
    if port == 0:
        raise InvalidArgument(f"cannot listen on {addr}")
    return server, port


def write_port_file(path: Path, port: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


def serve(
    listen: str,
    store: Path | str,
    options: Options,
    *,
    port_file: Path | None = None,
    metrics_port: int | None = None,
    security: Security | None = None,
    sealer: Sealer | None = None,
    rpc_threads: int = RPC_THREADS,
    state_dir: Path | None = None,
) -> int:
    security = security or Security()
    check_transport(listen, security)  # before the store is opened or created
    repo, rebuilt = open_repository(store, state_dir=state_dir, config=StoreConfig(sealer=sealer))
    if rebuilt is not None:
        log.warning("catalog rebuilt from the store", extra={"fields": {"report": str(rebuilt)}})
    engine = Engine(repo, options)
    deps = Deps(engine, security=security, max_workers=rpc_threads)
    try:
        server, port = create_server(listen, deps)
    except BaseException:
        repo.close()
        raise
    if metrics_port is not None:
        from coordinator import metrics

        metrics.serve(engine, metrics_port)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    engine.start()
    server.start()
    if port_file is not None:
        write_port_file(port_file, port)
    log_event(
        log,
        logging.INFO,
        "coordinator listening",
        listen=listen,
        port=port,
        store=str(store),
        tls=security.tls is not None,
        tokens=len(security.tokens),
        encrypted=sealer is not None,
    )
    stop.wait()
    log_event(log, logging.INFO, "coordinator stopping")
    deps.health.enter_graceful_shutdown()
    engine.close()
    server.stop(grace=3).wait()
    repo.close()
    return 0
