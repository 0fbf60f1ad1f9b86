"""Bearer tokens with roles: the token file the coordinator reads, and the client side
that sends `authorization: Bearer TOKEN` with every call.

A token file holds one `ROLE sha256:HEX` per line (`#` comments, blank lines allowed);
ROLE is `admin`, `viewer` or `agent`. Only digests are stored, so a leaked file does not
leak a token, and nothing here ever logs a token or a digest.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc

from cpcoord.errors import TokensInvalid
from cpcoord.tls import token_digest

ROLES = ("admin", "viewer", "agent")
ENV_TOKEN = "CPCOORD_TOKEN"
META_AUTH = "authorization"


def load_tokens(path: Path) -> dict[str, str]:
    """digest -> role."""
    try:
        text = path.read_text()
    except OSError as e:
        raise TokensInvalid(str(path), e.strerror or "unreadable") from None
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ROLES:
            raise TokensInvalid(str(path), f"line {n}: want `ROLE sha256:HEX`, ROLE in {ROLES}")
        digest = parts[1].removeprefix("sha256:").lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise TokensInvalid(str(path), f"line {n}: not a SHA-256 hex digest")
        out[digest] = parts[0]
    if not out:
        raise TokensInvalid(str(path), "no tokens")
    return out


def role_of(tokens: Mapping[str, str], token: str) -> str | None:
    """The role of a presented token (constant-time compare of digests)."""
    d = token_digest(token)
    role = None
    for known, r in tokens.items():
        if hmac.compare_digest(known, d):
            role = r
    return role


def bearer(metadata: Any) -> str | None:
    for k, v in metadata or ():
        if k == META_AUTH and isinstance(v, str) and v.startswith("Bearer "):
            return v[len("Bearer ") :].strip()
    return None


def client_token(flag: str | None, token_file: Path | None = None) -> str | None:
    """--token, else --token-file, else $CPCOORD_TOKEN."""
    if flag:
        return flag.strip()
    if token_file is not None:
        try:
            return token_file.read_text().strip() or None
        except OSError as e:
            raise TokensInvalid(str(token_file), e.strerror or "unreadable") from None
    return os.environ.get(ENV_TOKEN, "").strip() or None


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, base: Any, metadata: Any) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = tuple(metadata)
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class BearerInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token to every call (works on plaintext and TLS channels alike,
    unlike call credentials, which gRPC allows only on secure channels)."""

    def __init__(self, token: str) -> None:
        self._pair = (META_AUTH, f"Bearer {token}")

    def _details(self, d: Any) -> Any:
        return _CallDetails(d, [*(d.metadata or ()), self._pair])

    def intercept_unary_unary(self, cont: Callable[..., Any], d: Any, req: Any) -> Any:
        return cont(self._details(d), req)

    def intercept_unary_stream(self, cont: Callable[..., Any], d: Any, req: Any) -> Any:
        return cont(self._details(d), req)

    def intercept_stream_unary(self, cont: Callable[..., Any], d: Any, it: Iterator[Any]) -> Any:
        return cont(self._details(d), it)

    def intercept_stream_stream(self, cont: Callable[..., Any], d: Any, it: Iterator[Any]) -> Any:
        return cont(self._details(d), it)
