"""The one place where cpcoord errors and gRPC statuses meet, both ways.

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

The channel and server options every peer uses, and `make_channel`, are in
cpcoord/grpcopts.py.
"""

from __future__ import annotations

import functools
import inspect
import logging
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

META_ERROR = "cpcoord-error"
META_EXIT = "cpcoord-exit-code"
META_LEADER = "cpcoord-leader"  # NotLeader: the leader's HOST:PORT ("" during an election)

F = TypeVar("F", bound=Callable[..., Any])


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
