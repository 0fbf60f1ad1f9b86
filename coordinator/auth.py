"""Who may call what: the coordinator's one authentication/authorization interceptor,
and the start-up checks on its transport (TLS or an explicit --insecure, loopback only
for plaintext unless --insecure-bind-any).

A caller's role comes from its bearer token (`authorization: Bearer ...`, looked up by
SHA-256 in the token file) or, failing that, from the common name of its verified client
certificate (cpcoord/tls.py names them). `agent` may use AgentControl only; `viewer` the
read-only Coordinator RPCs and reflection; `admin` everything but AgentControl. Health
checking stays open so liveness probes need no secret; it reveals nothing but SERVING.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from cpcoord.errors import (
    AgentIdentityMismatch,
    CpcoordError,
    Forbidden,
    InsecureRefused,
    PlaintextBindRefused,
    Unauthenticated,
)
from cpcoord.grpcutil import abort_with
from cpcoord.log import log_event
from cpcoord.tls import CN_ADMIN, CN_AGENT_PREFIX, CN_VIEWER, TlsFiles
from cpcoord.tokens import bearer, role_of

log = logging.getLogger("cpcoord.auth")

AGENT_SERVICE = "cpcoord.v1.AgentControl"
COORD_SERVICE = "cpcoord.v1.Coordinator"
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_PREFIX = "grpc.reflection."
# Read-only Coordinator RPCs. ReadGeneration is not here: it returns page contents,
# which hold the members' secrets, so it needs admin like restore.
VIEWER_METHODS = frozenset(
    {
        "ListJobs",
        "ListAgents",
        "ListGenerations",
        "GetGeneration",
        "Diff",
        "Verify",
        "StoreStats",
        "Watch",
    }
)


@dataclass(frozen=True)
class Security:
    """The coordinator's transport and client-auth settings."""

    tls: TlsFiles | None = None
    tokens: Mapping[str, str] = field(default_factory=dict)  # sha256 hex -> role
    insecure: bool = False
    bind_any: bool = False

    @property
    def enforced(self) -> bool:
        return self.tls is not None or bool(self.tokens)


def _host(listen: str) -> str:
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    return host.strip("[]")


def is_loopback(listen: str) -> bool:
    host = _host(listen)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or empty (all interfaces): not provably loopback


def check_transport(listen: str, sec: Security) -> None:
    """Refuse to start without TLS unless --insecure; plaintext only on loopback unless
    --insecure-bind-any."""
    if sec.tls is not None:
        return
    if not sec.insecure:
        raise InsecureRefused()
    if not sec.bind_any and not is_loopback(listen):
        raise PlaintextBindRefused(listen)


def required_role(method: str) -> frozenset[str] | None:
    """The roles allowed to call `method` (/pkg.Service/Method); None: anyone."""
    service, _, name = method.lstrip("/").partition("/")
    if service == HEALTH_SERVICE:
        return None
    if service == AGENT_SERVICE:
        return frozenset({"agent"})
    if service == COORD_SERVICE and name not in VIEWER_METHODS:
        return frozenset({"admin"})
    return frozenset({"admin", "viewer"})  # read-only RPCs, reflection, anything else


def cert_identity(context: Any) -> tuple[str, str] | None:
    """(role, agent node or "") named by the verified client certificate (a sync or
    grpc.aio servicer context)."""
    for cn in context.auth_context().get("x509_common_name", ()):
        name = cn.decode(errors="replace") if isinstance(cn, bytes) else str(cn)
        if name == CN_ADMIN:
            return "admin", ""
        if name == CN_VIEWER:
            return "viewer", ""
        if name.startswith(CN_AGENT_PREFIX):
            return "agent", name[len(CN_AGENT_PREFIX) :]
    return None


def _same_node(node: str, it: Iterator[Any]) -> Iterator[Any]:
    """An agent's control stream whose Hello must name the node of its certificate, so
    one node's certificate cannot speak (or take over a stream) for another node."""
    first = True
    for msg in it:
        hello = first and getattr(msg, "WhichOneof", None) and msg.WhichOneof("body") == "hello"
        if hello and msg.hello.node != node:
            raise AgentIdentityMismatch(node, msg.hello.node)
        first = False
        yield msg


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks every call before its handler runs; refusals are UNAUTHENTICATED (no or a
    bad credential) or PERMISSION_DENIED (a role that may not call this method)."""

    def __init__(self, sec: Security) -> None:
        self.sec = sec

    def identity(self, context: grpc.ServicerContext) -> tuple[str, str]:
        """(role, node): node is the agent certificate's, "" for tokens and clients."""
        token = bearer(context.invocation_metadata())
        if token is not None:
            role = role_of(self.sec.tokens, token) if self.sec.tokens else None
            if role is None:
                raise Unauthenticated("unknown bearer token")
            return role, ""
        ident = cert_identity(context) if self.sec.tls is not None else None
        if ident is None:
            raise Unauthenticated("no bearer token and no client certificate naming a role")
        return ident

    def authorize(self, method: str, context: Any) -> str:
        """The caller's agent node ("" if none); raises Unauthenticated or Forbidden
        (logged) when refused. Works on sync and grpc.aio contexts."""
        allowed = required_role(method)
        if allowed is None:
            return ""
        try:
            role, node = self.identity(context)
            if role not in allowed:
                raise Forbidden(role, method)
        except CpcoordError as e:
            log_event(log, logging.INFO, "refused", rpc=method, error=type(e).__name__)
            raise
        return node

    def check(self, method: str, context: grpc.ServicerContext) -> str:
        """The caller's agent node ("" if none); aborts the call when refused."""
        try:
            return self.authorize(method, context)
        except CpcoordError as e:
            abort_with(context, e)

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        check = self.check
        if handler.unary_unary is not None:
            fn = handler.unary_unary

            def uu(req: Any, ctx: grpc.ServicerContext) -> Any:
                check(method, ctx)
                return fn(req, ctx)

            return handler._replace(unary_unary=uu)
        if handler.unary_stream is not None:
            fn = handler.unary_stream

            def us(req: Any, ctx: grpc.ServicerContext) -> Iterator[Any]:
                check(method, ctx)
                yield from fn(req, ctx)

            return handler._replace(unary_stream=us)
        if handler.stream_unary is not None:
            fn = handler.stream_unary

            def su(it: Any, ctx: grpc.ServicerContext) -> Any:
                check(method, ctx)
                return fn(it, ctx)

            return handler._replace(stream_unary=su)
        fn = handler.stream_stream

        def ss(it: Any, ctx: grpc.ServicerContext) -> Iterator[Any]:
            node = check(method, ctx)
            yield from fn(_same_node(node, it) if node else it, ctx)

        return handler._replace(stream_stream=ss)
