"""The coordinator's gRPC server on grpc.aio, on an event loop thread of its own.

Why grpc.aio: a control stream per agent and a Watch per dashboard live for days; on a
thread-pool server each held a thread (two per agent), so 2,000 nodes meant thousands
of threads. Here the long-lived streams are coroutines (coordinator/servicers/
streams.py) and hold no thread while they wait. Everything else (unary calls, uploads,
exports, gc) runs as before in the thread-pool servicers, on a bounded pool
(`rpc_threads`, grpc.aio's "migration" pool): their work is store I/O and hashing,
which blocks. The engine stays one locked, synchronous object (docs/decisions.md).

`AioServer` looks like a grpc.Server to its callers (`start()`, `stop(grace).wait()`,
`port`), so the daemon and in-process test servers drive it the same way. Health
checking (`grpc.health.v1`: "" is the process, SERVING while it runs; the two cpcoord
services are SERVING only while an engine is served, so a follower replica is
NOT_SERVING for them) and reflection are served as before.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from coordinator.aiohandlers import AioAuthInterceptor, service_handlers
from coordinator.auth import Security, check_transport
from coordinator.servicers.streams import Streams
from coordinator.serving import Serving
from cpcoord.errors import InvalidArgument
from cpcoord.gen.v1 import agent_pb2, agent_pb2_grpc, coordinator_pb2, coordinator_pb2_grpc
from cpcoord.grpcopts import MAX_MESSAGE_BYTES, server_options
from cpcoord.grpcutil import register_handlers
from cpcoord.log import log_event

log = logging.getLogger("cpcoord.coordinator")
T = TypeVar("T")
# The loop is watched: late by STALL_S, it is logged ("event loop stalled"), as nothing
# was read from any agent meanwhile and their heartbeats seemed not to arrive (3
# intervals of that and an agent is lost). Work that may take long goes to the pool.
STALL_S = 1.0
WATCH_S = 0.25
SERVICES = (
    agent_pb2.DESCRIPTOR.services_by_name["AgentControl"].full_name,
    coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name,
)


class _Stopped:
    def wait(self, timeout: float | None = None) -> bool:
        return True


class AioServer:
    def __init__(
        self,
        addr: str,
        serving: Serving,
        *,
        security: Security | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        rpc_threads: int = 64,
    ) -> None:
        if security is not None:
            check_transport(addr, security)
        self.serving = serving
        self.security = security
        self.max_message_bytes = max_message_bytes
        self.pool = ThreadPoolExecutor(rpc_threads, thread_name_prefix="rpc")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-aio", daemon=True)
        self._thread.start()
        self._server: grpc.aio.Server | None = None
        self.health: HealthServicer | None = None
        self._stopped = False
        self._watcher: Any = None
        try:
            self.port = self.call(self._build(addr))
        except BaseException:
            self._close_loop()
            raise
        serving.on_change.append(self.set_serving)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _build(self, addr: str) -> int:
        sec = self.security
        interceptors = [AioAuthInterceptor(sec)] if sec is not None and sec.enforced else None
        server = grpc.aio.server(
            migration_thread_pool=self.pool,
            options=server_options(self.max_message_bytes),
            interceptors=interceptors,
        )
        streams = Streams(self.serving, self.pool)
        a, c = agent_pb2_grpc, coordinator_pb2_grpc
        services: tuple[tuple[Any, Any], ...] = (
            (a.add_AgentControlServicer_to_server, a.AgentControlServicer()),
            (c.add_CoordinatorServicer_to_server, c.CoordinatorServicer()),
        )
        for index, (add_fn, template) in enumerate(services):
            built = service_handlers(add_fn, template, self.serving, index, streams)
            register_handlers(server, *built)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self._set_health(self.serving.active)
        reflection.enable_server_reflection(
            (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )  # fmt: skip
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
        self._server = server
        return port

    async def _set_health(self, active: bool) -> None:
        assert self.health is not None
        serving = health_pb2.HealthCheckResponse.SERVING
        status = serving if active else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", serving)
        for name in SERVICES:
            await self.health.set(name, status)

    def set_serving(self, active: bool) -> None:
        """The cpcoord services' health: SERVING while an engine is served."""
        if not self._stopped:
            asyncio.run_coroutine_threadsafe(self._set_health(active), self.loop)

    def start(self) -> None:
        assert self._server is not None
        self.call(self._server.start())
        self._watcher = asyncio.run_coroutine_threadsafe(_watch(), self.loop)

    def enter_graceful_shutdown(self) -> None:
        """Health NOT_SERVING for everything (load balancers stop sending calls)."""
        if self.health is not None and not self._stopped:
            self.call(self.health.enter_graceful_shutdown())

    def stop(self, grace: float | None = None) -> _Stopped:
        """Stop serving (calls still running get `grace` seconds), end the loop."""
        if not self._stopped:
            self._stopped = True
            if self._server is not None:
                try:
                    self.call(self._server.stop(grace), timeout=(grace or 0) + 30)
                except Exception:
                    log.exception("grpc server stop failed")
            self._close_loop()
        return _Stopped()

    def _close_loop(self) -> None:
        async def cancel_rest() -> None:
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            self.call(cancel_rest(), timeout=10)
        except Exception:
            log.exception("cancelling the server's tasks failed")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.loop.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


async def _watch() -> None:
    """Log every time the loop could not run for STALL_S (see STALL_S)."""
    loop = asyncio.get_running_loop()
    last = loop.time()
    while True:
        await asyncio.sleep(WATCH_S)
        now = loop.time()
        if (late := now - last - WATCH_S) >= STALL_S:
            log_event(log, logging.WARNING, "event loop stalled", seconds=round(late, 3))
        last = now
