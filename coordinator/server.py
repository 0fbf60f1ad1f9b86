"""The coordinator daemon: the gRPC server around the engine and the store.

`create_server(addr, deps)` builds the server (coordinator/aioserver.py: grpc.aio, so
agents' control streams and watches hold no thread) with both services, standard health
checking (`grpc.health.v1`) and reflection (so `grpcurl` works), explicit message size
limits, the auth interceptor when TLS or tokens are configured (coordinator/auth.py),
and binds it (mTLS with `Deps.security.tls`); it returns the server and the bound port
(ask for port 0 to get a free one). `serve(...)` is the daemon: check the transport
(coordinator/auth.py), open the store, start the engine, serve, write the port file,
and on SIGTERM/SIGINT stop gracefully: health NOT_SERVING, abort what is in flight
(agents thaw and keep their pending sets), end the streams, close the store. Replicas
with a leader elected through etcd are coordinator/ha/replica.py.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType

from coordinator.aioserver import SERVICES, AioServer
from coordinator.auth import Security, check_transport
from coordinator.engine import Engine, Options
from coordinator.serving import Serving
from coordinator.store.config import StoreConfig
from coordinator.store.location import open_repository
from cpcoord.log import log_event
from storecore.crypt import Sealer

log = logging.getLogger("cpcoord.coordinator")
__all__ = [
    "RPC_THREADS",
    "SERVICES",
    "Deps",
    "ServeConfig",
    "create_server",
    "serve",
    "write_port_file",
]


# Threads for the calls that block (store reads and writes, uploads, exports, commands
# that wait for an agent's answer). Agents' control streams and Watch streams hold none
# (grpc.aio), so this no longer grows with the fleet; threads start on demand.
RPC_THREADS = 64


@dataclass
class Deps:
    """What the server serves: the engine (or, for replicas, what `serving` says)."""

    engine: Engine | None
    max_workers: int = RPC_THREADS
    # None: a library/test server, plaintext and open as before; serve() always sets it.
    security: Security | None = None
    serving: Serving | None = None

    def resolve(self) -> Serving:
        if self.serving is None:
            self.serving = Serving(self.engine)
        return self.serving


def create_server(addr: str, deps: Deps) -> tuple[AioServer, int]:
    """A bound (not started) server; returns (server, port)."""
    engine = deps.engine
    max_bytes = engine.opt.max_message_bytes if engine is not None else Options().max_message_bytes
    server = AioServer(
        addr,
        deps.resolve(),
        security=deps.security,
        max_message_bytes=max_bytes,
        rpc_threads=deps.max_workers,
    )
    return server, server.port


def write_port_file(path: Path, port: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


def stop_event() -> threading.Event:
    """An event set by SIGTERM or SIGINT (installed on the main thread)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


@dataclass(frozen=True)
class ServeConfig:
    """What `serve` and a replica's `serve_replica` (coordinator/ha/serve.py) share."""

    port_file: Path | None = None
    metrics_port: int | None = None
    security: Security = field(default_factory=Security)
    sealer: Sealer | None = None
    rpc_threads: int = RPC_THREADS
    state_dir: Path | None = None


def serve(listen: str, store: Path | str, options: Options, config: ServeConfig) -> int:
    security, sealer, rpc_threads = config.security, config.sealer, config.rpc_threads
    port_file, metrics_port, state_dir = config.port_file, config.metrics_port, config.state_dir
    check_transport(listen, security)  # before the store is opened or created
    repo, rebuilt = open_repository(store, state_dir=state_dir, config=StoreConfig(sealer=sealer))
    if rebuilt is not None:
        log.warning("catalog rebuilt from the store", extra={"fields": {"report": str(rebuilt)}})
    # The store's data key goes down a control stream only when it is mTLS.
    engine = Engine(repo, replace(options, send_store_key=security.tls is not None))
    deps = Deps(engine, security=security, max_workers=rpc_threads)
    try:
        server, port = create_server(listen, deps)
    except BaseException:
        repo.close()
        raise
    if metrics_port is not None:
        from coordinator import metrics

        metrics.serve(engine, metrics_port)
    stop = stop_event()
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
        rpc_threads=rpc_threads,
    )
    stop.wait()
    log_event(log, logging.INFO, "coordinator stopping")
    server.enter_graceful_shutdown()
    engine.close()
    server.stop(grace=3).wait()
    repo.close()
    return 0
