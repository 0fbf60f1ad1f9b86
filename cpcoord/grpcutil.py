"""The one place where cpcoord errors and gRPC statuses meet, both ways, plus the
channel and server options every peer uses.

Servicer side: `rpc_errors` wraps a handler (unary or streaming) so a CpcoordError ends
the call with the class's `status` and message, and with trailing metadata naming the
class (`cpcoord-error`) and its exit code; any other exception becomes INTERNAL (logged
with its traceback, never with data). `abort_with(context, err)` does the same by hand.
`rpc_errors_async` and `abort_with_async` are the same for grpc.aio handlers (coroutines
and async generators). `NotLeader` also carries the leader's address (`cpcoord-leader`).

Client side: `raise_from_rpc_error(e)` turns a grpc.RpcError back into the same class
with the server's message, so `cpcoord` exits with the code the error would have had
locally. Statuses without the metadata (the transport's own: UNAVAILABLE, RESOURCE_
EXHAUSTED for an oversized message, UNIMPLEMENTED, ...) map to classes of 70-79.

Transport security: `make_channel(..., tls=TlsFiles)` speaks mTLS (cpcoord/tls.py) and
`token=` adds a bearer token (cpcoord/tokens.py); without them, plaintext. `--insecure` /
CPCOORD_INSECURE=1 are recorded by `insecure_requested` (see docs/security.md).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError

from cpcoord import errors
from cpcoord.errors import (
    CoordinatorUnavailable,
    CpcoordError,
    InvalidArgument,
    MessageTooLarge,
    NotImplementedYet,
    NotLeader,
    RemoteError,
)
from cpcoord.log import log_event

log = logging.getLogger("cpcoord.grpc")

MAX_MESSAGE_BYTES = 64 << 20  # every stream, both ways; Welcome.max_message_bytes
META_ERROR = "cpcoord-error"
META_EXIT = "cpcoord-exit-code"
META_LEADER = "cpcoord-leader"  # NotLeader: the leader's HOST:PORT ("" during an election)
ENV_INSECURE = "CPCOORD_INSECURE"

F = TypeVar("F", bound=Callable[..., Any])


# -- options ---------------------------------------------------------------------------


def channel_options(max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Client channel options: explicit message limits, keepalive so a dead peer is
    noticed in seconds (agents hold one stream for days), and a connection per channel:
    gRPC otherwise shares one TCP connection between channels of equal options, and an
    agent opens a second channel precisely so that its pages do not share its control
    stream's connection (nodeagent/daemon/agent_session.py, Session)."""
    return [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


# Calls that arrived but that the server has not picked up yet. gRPC's defaults (1000,
# hard limit 3000) cancel the rest with CANCELLED; a grpc.aio server picks calls up from
# its event loop, so with thousands of agents uploading at once (bench/scale.py, 2,000
# agents) a burst goes over 1000 while nothing is wrong. A pending call costs a few KiB.
MAX_PENDING_CALLS = 1 << 16


def server_options(max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Server options: the same limits; no SO_REUSEPORT, so two coordinators can never
    listen on one port; accept the clients' keepalive pings; let bursts of calls wait."""
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
    ]


def insecure_requested(flag: bool) -> bool:
    """--insecure given, or CPCOORD_INSECURE=1 in the environment."""
    env = os.environ.get(ENV_INSECURE, "").strip().lower()
    return flag or env in ("1", "true", "yes")


def make_channel(
    address: str,
    insecure: bool = False,
    max_bytes: int = MAX_MESSAGE_BYTES,
    *,
    tls: Any = None,
    token: str | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """A channel to `address` (HOST:PORT): mTLS when `tls` (a cpcoord.tls.TlsFiles) is
    given, verifying the server against its CA (and its certificate against
    `server_name` when given, not the address); plaintext otherwise. A bearer `token`
    rides on every call as `authorization` metadata."""
    del insecure  # plaintext is the fallback; only the coordinator refuses to start without
    if tls is not None:
        from cpcoord.tls import channel_credentials

        creds = channel_credentials(tls)
        opts = channel_options(max_bytes)
        if server_name:
            opts.append(("grpc.ssl_target_name_override", server_name))
        ch = grpc.secure_channel(address, creds, options=opts)
    else:
        ch = grpc.insecure_channel(address, options=channel_options(max_bytes))
    if token:
        from cpcoord.tokens import BearerInterceptor

        ch = grpc.intercept_channel(ch, BearerInterceptor(token))
    return ch


# -- servicer side ---------------------------------------------------------------------


def status_code(err: CpcoordError) -> grpc.StatusCode:
    try:
        return grpc.StatusCode[err.status]
    except KeyError:
        return grpc.StatusCode.INTERNAL


def error_metadata(err: CpcoordError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that lets the client recreate `err`."""
    meta = [(META_ERROR, type(err).__name__), (META_EXIT, str(err.exit_code))]
    if isinstance(err, NotLeader):
        meta.append((META_LEADER, err.leader))
    return tuple(meta)


def abort_with(context: grpc.ServicerContext, err: CpcoordError) -> NoReturn:
    """End the call with the error's status, message and class (trailing metadata)."""
    context.set_trailing_metadata(error_metadata(err))
    context.abort(status_code(err), err.message())
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


async def abort_with_async(context: Any, err: CpcoordError) -> NoReturn:
    """`abort_with` for a grpc.aio context (whose abort is a coroutine)."""
    context.set_trailing_metadata(error_metadata(err))
    await context.abort(status_code(err), err.message())
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def _unexpected(context: grpc.ServicerContext, name: str, e: BaseException) -> NoReturn:
    log.error("rpc failed", exc_info=e, extra={"fields": {"rpc": name}})
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name}: {type(e).__name__}: {e}")
    raise AssertionError("unreachable")  # pragma: no cover


def _is_abort(e: BaseException) -> bool:
    # context.abort raises a bare Exception subclass private to grpc; let it through.
    return type(e).__module__.startswith("grpc")


@dataclass(frozen=True)
class Malformed:
    """A request message that did not parse (see `add_servicer`)."""

    type_name: str
    why: str

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"malformed {self.type_name} message: {self.why}")


def _checked(it: Iterator[Any]) -> Iterator[Any]:
    for msg in it:
        if isinstance(msg, Malformed):
            raise msg.error()
        yield msg


def _request(request: Any) -> Any:
    """A unary request, or a request stream whose malformed messages raise."""
    if isinstance(request, Malformed):
        raise request.error()
    if hasattr(request, "__next__"):
        return _checked(request)
    return request


def _fail(context: grpc.ServicerContext, name: str, e: Exception) -> NoReturn:
    """End the call for `e`: an abort under way goes on, a CpcoordError becomes its
    status, anything else INTERNAL (logged)."""
    if _is_abort(e):
        raise e
    if isinstance(e, CpcoordError):
        abort_with(context, e)
    _unexpected(context, name, e)


def rpc_errors(fn: F) -> F:
    """Decorate a servicer method (unary or generator) so errors become statuses, and
    malformed requests INVALID_ARGUMENT (with `add_servicer`)."""
    name = fn.__name__

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from fn(self, _request(request), context)
            except Exception as e:
                _fail(context, name, e)

        return cast(F, gen)

    @functools.wraps(fn)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, _request(request), context)
        except Exception as e:
            _fail(context, name, e)

    return cast(F, unary)


def _is_abort_async(e: BaseException) -> bool:
    # grpc.aio's abort raises grpc.aio.AbortError (module grpc.aio._base_call or so).
    return type(e).__module__.startswith("grpc")


def rpc_errors_async(fn: F) -> F:
    """`rpc_errors` for grpc.aio handlers: a coroutine function or an async generator
    function. Malformed requests (see `add_servicer`) are refused the same way."""
    name = fn.__name__

    async def fail(context: Any, e: Exception) -> NoReturn:
        if isinstance(e, CpcoordError):
            await abort_with_async(context, e)
        log.error("rpc failed", exc_info=e, extra={"fields": {"rpc": name}})
        msg = f"internal error in {name}: {type(e).__name__}: {e}"
        await context.abort(grpc.StatusCode.INTERNAL, msg)
        raise AssertionError("unreachable")  # pragma: no cover

    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def agen(self: Any, request: Any, context: Any) -> Any:
            try:
                if isinstance(request, Malformed):
                    raise request.error()
                async for item in fn(self, request, context):
                    yield item
            except Exception as e:
                if _is_abort_async(e):
                    raise
                await fail(context, e)

        return cast(F, agen)

    @functools.wraps(fn)
    async def coro(self: Any, request: Any, context: Any) -> Any:
        try:
            if isinstance(request, Malformed):
                raise request.error()
            return await fn(self, request, context)
        except Exception as e:
            if _is_abort_async(e):
                raise
            await fail(context, e)

    return cast(F, coro)


def _safe(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    owner = getattr(deserialize, "__self__", None)
    type_name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as e:
            return Malformed(type_name, str(e) or "cannot parse")

    return parse


class _Capture:
    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.service, self.handlers = service, dict(handlers)


def servicer_handlers(
    add_fn: Callable[[Any, Any], None], servicer: Any
) -> tuple[str, dict[str, grpc.RpcMethodHandler]]:
    """The service name and method handlers the generated `add_XServicer_to_server`
    would register, each with a deserializer that hands a request that does not parse
    to the (rpc_errors-decorated) method as `Malformed`."""
    cap = _Capture()
    add_fn(servicer, cap)
    handlers = {
        name: h._replace(request_deserializer=_safe(h.request_deserializer))  # type: ignore[attr-defined, arg-type]
        for name, h in cap.handlers.items()
    }
    return cap.service, handlers


def register_handlers(
    server: Any, service: str, handlers: dict[str, grpc.RpcMethodHandler]
) -> None:
    """Register method handlers on a server (sync or grpc.aio)."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def add_servicer(add_fn: Callable[[Any, Any], None], servicer: Any, server: grpc.Server) -> None:
    """Like the generated `add_XServicer_to_server`, but a request that does not parse
    reaches the (rpc_errors-decorated) method as `Malformed`, which refuses it with
    INVALID_ARGUMENT naming the message type, instead of gRPC's bare INTERNAL."""
    register_handlers(server, *servicer_handlers(add_fn, servicer))


def error_detail_fields(err: CpcoordError) -> dict[str, Any]:
    """Fields of a cpcoord.v1.ErrorDetail for an error carried inside a message."""
    return {
        "status": err.status,
        "exit_code": err.exit_code,
        "error": type(err).__name__,
        "message": err.message(),
    }


# -- client side -----------------------------------------------------------------------


def _error_class(name: str) -> type[CpcoordError] | None:
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, CpcoordError):
        return cls
    return None


def remote_error(cls: type[CpcoordError], message: str) -> CpcoordError:
    """An instance of `cls` whose message is the peer's text (its arguments stayed on
    the other side). Same class, so same exit code and isinstance checks."""
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    # An instance attribute shadows the class's message() method for this object only.
    object.__setattr__(err, "message", lambda: message)
    return err


def from_error_detail(error: str, message: str, status: str = "") -> CpcoordError:
    """Recreate an error carried in an ErrorDetail message (agents' CommandResult)."""
    cls = _error_class(error)
    if cls is None:
        return RemoteError(error or "a command", status or "UNKNOWN", message)
    return remote_error(cls, message)


def rpc_to_error(e: grpc.RpcError, what: str = "the call", target: str = "") -> CpcoordError:
    """The CpcoordError a failed call stands for."""
    call = cast(grpc.Call, e)
    code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    details = (call.details() if hasattr(call, "details") else "") or ""
    meta = dict(call.trailing_metadata() or ()) if hasattr(call, "trailing_metadata") else {}
    name = meta.get(META_ERROR)
    cls = _error_class(name) if isinstance(name, str) else None
    if cls is NotLeader:
        leader = meta.get(META_LEADER)
        return NotLeader(leader if isinstance(leader, str) and leader else "unknown")
    if cls is not None:
        return remote_error(cls, details)
    if code is grpc.StatusCode.UNAVAILABLE:
        return CoordinatorUnavailable(target or "?", details or "unavailable")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return MessageTooLarge(details)
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return NotImplementedYet(what, details)
    return RemoteError(what, code.name if code else "UNKNOWN", details)


def raise_from_rpc_error(e: grpc.RpcError, what: str = "the call", target: str = "") -> NoReturn:
    """Raise the CpcoordError a failed call stands for (chained to the RpcError)."""
    raise rpc_to_error(e, what, target) from e


def log_refused(logger: logging.Logger, rpc: str, err: CpcoordError) -> None:
    log_event(logger, logging.INFO, "refused", rpc=rpc, error=type(err).__name__, why=str(err))
