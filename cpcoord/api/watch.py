"""`Watch`: a running `Coordinator.Watch` call of `cpcoord.api.Client` (docs/api.md)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc

from cpcoord.api import convert
from cpcoord.api import values as v
from cpcoord.closing import Closing
from cpcoord.grpcutil import rpc_to_error


class Watch(Closing):
    """A running Watch call: iterate for events; `close()` (any thread) ends it."""

    def __init__(self, call: Any, address: str) -> None:
        self._call = call
        self._address = address
        self._closed = threading.Event()

    def wait_subscribed(self) -> None:
        """Block until the coordinator has subscribed this watch (its response headers
        arrive then): events from that moment on are delivered. A refused call (bad job
        name, no permission) raises here."""
        try:
            self._call.initial_metadata()
        except grpc.RpcError as e:
            raise rpc_to_error(e, "Watch", self._address) from e
        if self._call.done() and self._call.code() is not grpc.StatusCode.OK:
            self._raise_status()

    def _raise_status(self) -> None:
        try:
            next(iter(self._call))
        except grpc.RpcError as e:
            raise rpc_to_error(e, "Watch", self._address) from e

    def __iter__(self) -> Iterator[v.WatchEvent]:
        try:
            for msg in self._call:
                yield convert.watch_event(msg)
        except grpc.RpcError as e:
            if self._closed.is_set() and self._call.code() is grpc.StatusCode.CANCELLED:
                return
            raise rpc_to_error(e, "Watch", self._address) from e

    def close(self) -> None:
        self._closed.set()
        self._call.cancel()
