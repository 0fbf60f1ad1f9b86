"""The gRPC options every peer uses, and its channels: explicit message limits,
keepalive, pending-call limits (`channel_options`, `server_options`), and `make_channel`.

Transport security: `make_channel(..., tls=TlsFiles)` speaks mTLS (cpcoord/tls.py) and
`token=` adds a bearer token (cpcoord/tokens.py); without them, plaintext. `--insecure` /
CPCOORD_INSECURE=1 are recorded by `insecure_requested` (see docs/security.md).
(Errors and gRPC statuses meet in cpcoord/grpcutil.py, which names these too.)
"""

from __future__ import annotations

import os
from typing import Any

import grpc

MAX_MESSAGE_BYTES = 64 << 20  # every stream, both ways; Welcome.max_message_bytes
ENV_INSECURE = "CPCOORD_INSECURE"


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
