"""The local API's wire format, shared by the agent's socket server and the client library.

Owns the framing, the limits and the error encoding of docs/local-api.md:

    frame   = length (4 bytes, unsigned, big-endian, 1..MAX_FRAME) + JSON object (UTF-8)
    request = {"op": ..., "v": 1, ...arguments}
    reply   = {"ok": true, ...results}
            | {"ok": false, "error": class name, "status": gRPC status name,
               "exit_code": int, "message": human text}

One request at a time per connection; replies come in order. Standard library only:
the client library must load in any Python process.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

from cpcoord import errors
from cpcoord.errors import CpcoordError, LocalApiError

PROTOCOL = 1
MAX_FRAME = 1 << 20
DEFAULT_SOCKET = "/run/cpcoord/agent.sock"
SOCKET_ENV = "CPCOORD_AGENT_SOCKET"
_HEADER = struct.Struct(">I")


def socket_path(path: str | None = None) -> str:
    """The agent's socket: `path`, else $CPCOORD_AGENT_SOCKET, else the default."""
    return path or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def encode(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise LocalApiError(f"message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body.decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise LocalApiError(f"frame is not UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise LocalApiError("a message must be a JSON object")
    return obj


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_length(sock: socket.socket) -> int | None:
    """The next frame's length; None at a clean end of stream."""
    head = _recv_exact(sock, _HEADER.size)
    if head is None:
        return None
    (n,) = _HEADER.unpack(head)
    if not 1 <= n <= MAX_FRAME:
        raise LocalApiError(f"frame length {n} outside 1..{MAX_FRAME}")
    return n


def read_body(sock: socket.socket, n: int) -> dict[str, Any]:
    body = _recv_exact(sock, n)
    if body is None:
        raise LocalApiError("connection closed inside a frame")
    return decode(body)


def read_frame(sock: socket.socket) -> dict[str, Any] | None:
    """One message; None at a clean end of stream (between frames)."""
    n = read_length(sock)
    return None if n is None else read_body(sock, n)


def error_reply(e: CpcoordError) -> dict[str, Any]:
    return {
        "ok": False,
        "error": type(e).__name__,
        "status": e.status,
        "exit_code": e.exit_code,
        "message": e.message(),
    }


def remote_error(reply: dict[str, Any]) -> CpcoordError:
    """The error a reply carries, as an instance of its class in cpcoord.errors (so
    `except PermissionDenied` works in the caller) that says the agent's message."""
    name = str(reply.get("error", "CpcoordError"))
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, CpcoordError)):
        cls = CpcoordError
    text = str(reply.get("message", name))
    e = cls.__new__(cls)
    Exception.__init__(e, text)
    # The class's template wants the agent's arguments; we only have its text. (Not a
    # subclass: that would add classes, with duplicate exit codes, to the hierarchy.)
    e.message = lambda: text  # type: ignore[method-assign]
    return e
