"""cpcoord.grpcutil: every error class survives the trip through a gRPC status and back
(same class, message and exit code), transport statuses map to their own classes, and
handlers turn unexpected exceptions into INTERNAL. A real server on loopback, raw bytes
handlers: no proto needed. The options and flags alone: tests/unit/test_grpcutil.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent import futures
from typing import Any, cast

import grpc
import pytest

from cpcoord import errors
from cpcoord.errors import CpcoordError
from cpcoord.grpcopts import channel_options, server_options
from cpcoord.grpcutil import META_ERROR, META_EXIT, rpc_errors, rpc_to_error

pytestmark = pytest.mark.integration


def _classes() -> list[type[CpcoordError]]:
    out, todo = [], [CpcoordError]
    while todo:
        c = todo.pop()
        out.append(c)
        todo += c.__subclasses__()
    return sorted({c for c in out if c.__module__ == "cpcoord.errors"}, key=lambda c: c.__name__)


def _instance(cls: type[CpcoordError]) -> CpcoordError:
    doc = (cls.__doc__ or "").strip().splitlines()[0]
    n = len(re.findall(r"\{[^}]*\}", doc))
    return cls(*[f"arg{i}" for i in range(n)])


ERRORS = {c.__name__: _instance(c) for c in _classes()}


class Handlers:
    @rpc_errors
    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        name = request.decode()
        if name == "boom":
            raise RuntimeError("something broke")
        if name == "ok":
            return b"fine"
        raise ERRORS[name]

    @rpc_errors
    def stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"first"
        raise ERRORS[request.decode()]


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    h = Handlers()
    server = grpc.server(futures.ThreadPoolExecutor(4), options=server_options(1 << 20))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.T",
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(h.unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(h.stream),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options(4 << 20))
    yield ch
    ch.close()
    server.stop(0)


def _unary(ch: grpc.Channel, method: str = "/t.T/Unary") -> Any:
    return ch.unary_unary(method, None, None)


def _meta(e: grpc.RpcError) -> dict[str, str]:
    return dict(cast(Any, e).trailing_metadata() or ())


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_every_error_class_round_trips(channel: grpc.Channel, name: str) -> None:
    err = ERRORS[name]
    with pytest.raises(grpc.RpcError) as ei:
        _unary(channel)(name.encode(), timeout=10)
    e = ei.value
    assert e.code() == grpc.StatusCode[err.status]
    meta = _meta(e)
    assert meta[META_ERROR] == name and meta[META_EXIT] == str(err.exit_code)
    back = rpc_to_error(e)
    assert type(back) is type(err)
    assert back.message() == err.message() == str(back)
    assert back.exit_code == err.exit_code and back.status == err.status


def test_streaming_errors_after_items(channel: grpc.Channel) -> None:
    call: Any = channel.unary_stream("/t.T/Stream", None, None)(b"JobBusy", timeout=10)
    assert next(call) == b"first"
    with pytest.raises(grpc.RpcError) as ei:
        next(call)
    assert isinstance(rpc_to_error(ei.value), errors.JobBusy)


def test_unexpected_exception_is_internal_with_its_type(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as ei:
        _unary(channel)(b"boom", timeout=10)
    assert ei.value.code() == grpc.StatusCode.INTERNAL
    back = rpc_to_error(ei.value, "Unary")
    assert isinstance(back, errors.RemoteError)
    assert "RuntimeError: something broke" in str(back) and back.exit_code == 71


def test_transport_statuses_map_to_their_classes(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as ei:
        _unary(channel, "/t.T/Missing")(b"x", timeout=10)
    assert isinstance(rpc_to_error(ei.value, "Missing"), errors.NotImplementedYet)
    with pytest.raises(grpc.RpcError) as ei:
        _unary(channel)(b"x" * (2 << 20), timeout=10)  # server limit: 1 MiB
    assert isinstance(rpc_to_error(ei.value), errors.MessageTooLarge)
    with grpc.insecure_channel("127.0.0.1:1") as dead, pytest.raises(grpc.RpcError) as ei:
        _unary(dead)(b"ok", timeout=2)
    back = rpc_to_error(ei.value, "Unary", "127.0.0.1:1")
    assert isinstance(back, errors.CoordinatorUnavailable) and back.exit_code == 70
    assert "127.0.0.1:1" in str(back)
