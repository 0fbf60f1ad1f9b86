"""The method handlers of the grpc.aio server: which code serves each RPC, and who may
call it.

`service_handlers` builds one service's handlers from its generated registration: the
long-lived streams (coordinator/servicers/streams.py) as coroutines on the event loop,
every other method as a plain function that grpc.aio runs on its thread pool (the
"migration" pool) and that calls the thread-pool servicer of the engine being served
now (coordinator/serving.py: a follower answers NotLeader before any work).

`AioAuthInterceptor` is coordinator/auth.py's check for this server: the same roles and
refusals, wrapping sync handlers in sync code and async ones in async code (grpc.aio
runs a handler on the loop or on the pool by its kind). An agent's `Attach` is also held
to the node its certificate names.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from coordinator.auth import AuthInterceptor, Security
from coordinator.serving import Serving
from cpcoord.errors import AgentIdentityMismatch, CpcoordError
from cpcoord.grpcutil import abort_with, abort_with_async, servicer_handlers

_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def _kind(h: grpc.RpcMethodHandler) -> str:
    return next(k for k in _KINDS if getattr(h, k) is not None)


def _dispatch(serving: Serving, index: int, name: str, kind: str) -> Callable[..., Any]:
    """A pool-run handler that finds the current engine's servicer, then calls it."""

    def servicer(context: Any) -> Any:
        try:
            return serving.servicers()[index]
        except CpcoordError as e:
            abort_with(context, e)

    if kind.endswith("_stream"):

        def gen(request: Any, context: Any) -> Iterator[Any]:
            yield from getattr(servicer(context), name)(request, context)

        return gen

    def call(request: Any, context: Any) -> Any:
        return getattr(servicer(context), name)(request, context)

    return call


def service_handlers(
    add_fn: Callable[[Any, Any], None],
    template: Any,
    serving: Serving,
    index: int,
    streams: Any,
) -> tuple[str, dict[str, grpc.RpcMethodHandler]]:
    """(service name, handlers): methods `streams` defines run on the loop, the others
    dispatch to `serving.servicers()[index]` on the pool. `template` is any instance of
    the generated servicer base (only its method names and kinds are used). Methods in
    `streams.RAW_REQUESTS` get their requests as bytes: grpc.aio deserialises on the
    loop, and an upload's messages can be megabytes of tens of thousands of regions."""
    service, handlers = servicer_handlers(add_fn, template)
    raw: frozenset[str] = getattr(streams, "RAW_REQUESTS", frozenset())
    out = {}
    for name, h in handlers.items():
        kind = _kind(h)
        fn = getattr(streams, name, None)
        if fn is None:
            fn = _dispatch(serving, index, name, kind)
        changes: dict[str, Any] = {kind: fn}
        if name in raw:
            changes["request_deserializer"] = None
        out[name] = h._replace(**changes)  # type: ignore[attr-defined]
    return service, out


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


async def _same_node_async(node: str, it: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The async twin of auth._same_node: the Hello must name the certificate's node."""
    first = True
    async for msg in it:
        hello = first and getattr(msg, "WhichOneof", None) and msg.WhichOneof("body") == "hello"
        if hello and msg.hello.node != node:
            raise AgentIdentityMismatch(node, msg.hello.node)
        first = False
        yield msg


class AioAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, sec: Security) -> None:
        self.auth = AuthInterceptor(sec)  # its sync wrapping serves the pool handlers

    async def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        kind = _kind(handler)
        fn = getattr(handler, kind)
        if not _is_async(fn):
            return self.auth.intercept_service(lambda _d: handler, details)
        method = details.method
        authorize = self.auth.authorize

        if inspect.iscoroutinefunction(fn):

            async def coro(req: Any, ctx: Any) -> Any:
                try:
                    authorize(method, ctx)
                except CpcoordError as e:
                    await abort_with_async(ctx, e)
                return await fn(req, ctx)

            return handler._replace(**{kind: coro})

        async def agen(req: Any, ctx: Any) -> AsyncIterator[Any]:
            try:
                node = authorize(method, ctx)
            except CpcoordError as e:
                await abort_with_async(ctx, e)
            if node and kind == "stream_stream":
                req = _same_node_async(node, req)
            async for item in fn(req, ctx):
                yield item

        return handler._replace(**{kind: agen})
