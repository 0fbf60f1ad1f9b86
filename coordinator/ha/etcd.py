"""A small etcd v3 client over etcd's JSON gateway (`/v3/kv/...`, `/v3/lease/...`),
plain HTTP with the standard library: what leader election needs and nothing else.

Why not a library: the `etcd3` package on PyPI is unmaintained and its generated code
does not load with protobuf 7, which this project uses; the official Go client is not
Python; and the gateway has served the same JSON since etcd 3.4 (Debian's
`etcd-server`). Keys and values are base64 in JSON, int64 fields are strings, fields at
their default are left out (a failed txn has no "succeeded").

`EtcdClient(["http://h1:2379", ...])` tries the endpoints in turn (starting from the
last one that answered; one that cannot be reached is skipped, one that answers with an
error is believed); each request has its own deadline. Both failures are
`EtcdUnavailable`. Leases: `grant`, `keepalive` (one round, returns the TTL
left; 0 = the lease is gone), `revoke`. Keys: `get`, `txn_create` (put a key only if it
does not exist, bound to a lease), `txn_holds` (does this key still have this create
revision and lease: the fence of every commit).
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cpcoord.errors import EtcdUnavailable, InvalidArgument

DEFAULT_TIMEOUT_S = 2.0


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def parse_endpoints(text: str | Sequence[str]) -> tuple[str, ...]:
    """`http://HOST:PORT[,http://HOST:PORT...]` -> the endpoints; InvalidArgument for
    anything else (https needs client certificates this client does not do)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for raw in items:
        e = raw.strip().rstrip("/")
        if not e:
            continue
        u = urllib.parse.urlsplit(e)
        if u.scheme != "http" or not u.hostname or u.port is None or u.path or u.query:
            raise InvalidArgument(f"etcd endpoint {e!r}: expected http://HOST:PORT")
        out.append(e)
    if not out:
        raise InvalidArgument("no etcd endpoint given: --etcd http://HOST:PORT[,...]")
    return tuple(out)


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


def _kv(d: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=base64.b64decode(d.get("key", "")),
        value=base64.b64decode(d.get("value", "")),
        create_revision=int(d.get("create_revision", 0)),
        mod_revision=int(d.get("mod_revision", 0)),
        lease=int(d.get("lease", 0)),
    )


class EtcdClient:
    def __init__(self, endpoints: str | Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S):
        self.endpoints = parse_endpoints(endpoints)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._first = 0  # the endpoint that answered last

    def __str__(self) -> str:
        return ",".join(self.endpoints)

    def call(self, path: str, body: dict[str, Any], timeout_s: float | None = None) -> Any:
        """POST `body` to `path` on the first endpoint that answers; its JSON reply (for
        a streaming endpoint, the first object of the stream)."""
        data = json.dumps(body).encode()
        timeout = self.timeout_s if timeout_s is None else max(0.05, timeout_s)
        with self._lock:
            first = self._first
        n = len(self.endpoints)
        why = "no endpoint tried"
        for k in range(n):
            i = (first + k) % n
            req = urllib.request.Request(
                self.endpoints[i] + path,
                data=data,
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    line = r.readline()  # streaming endpoints: one JSON object per line
            except urllib.error.HTTPError as e:  # an answer: etcd refused the request
                answer = e.read()[:200]
                raise EtcdUnavailable(str(self), f"{path}: HTTP {e.code} {answer!r}") from None
            except (OSError, ValueError) as e:  # refused, timed out, reset: try another
                why = f"{self.endpoints[i]}{path}: {e}"
                continue
            try:
                out = json.loads(line or b"{}")
            except ValueError:
                why = f"{self.endpoints[i]}{path}: not JSON: {line[:200]!r}"
                continue
            with self._lock:
                self._first = i
            if isinstance(out, dict) and "error" in out and "result" not in out:
                raise EtcdUnavailable(str(self), f"{path}: {out.get('error')}")
            return out
        raise EtcdUnavailable(str(self), why)

    # -- leases -----------------------------------------------------------------------

    def grant(self, ttl_s: int, timeout_s: float | None = None) -> tuple[int, int]:
        """A new lease: (id, TTL granted in seconds)."""
        r = self.call("/v3/lease/grant", {"TTL": int(ttl_s)}, timeout_s)
        lease, ttl = int(r.get("ID", 0)), int(r.get("TTL", 0))
        if not lease or ttl <= 0:
            raise EtcdUnavailable(str(self), f"lease grant refused: {r}")
        return lease, ttl

    def keepalive(self, lease: int, timeout_s: float | None = None) -> int:
        """Renew a lease once; the TTL it has now (0: it expired or was revoked)."""
        r = self.call("/v3/lease/keepalive", {"ID": str(lease)}, timeout_s)
        return int(r.get("result", {}).get("TTL", 0))

    def revoke(self, lease: int, timeout_s: float | None = None) -> None:
        """End a lease now (its keys are deleted); a lease already gone is fine."""
        try:
            self.call("/v3/lease/revoke", {"ID": str(lease)}, timeout_s)
        except EtcdUnavailable as e:
            if "not found" not in str(e):
                raise

    # -- keys -------------------------------------------------------------------------

    def get(self, key: bytes, timeout_s: float | None = None) -> KeyValue | None:
        r = self.call("/v3/kv/range", {"key": _b64(key)}, timeout_s)
        kvs = r.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    def txn_create(
        self, key: bytes, value: bytes, lease: int, timeout_s: float | None = None
    ) -> tuple[bool, KeyValue | None]:
        """Put key=value bound to `lease` only if the key does not exist. Returns (True,
        the new key) or (False, the key that exists)."""
        k = _b64(key)
        absent = {"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        put = {"request_put": {"key": k, "value": _b64(value), "lease": str(lease)}}
        body = {"compare": [absent], "success": [put], "failure": [{"request_range": {"key": k}}]}
        r = self.call("/v3/kv/txn", body, timeout_s)
        if r.get("succeeded"):
            rev = int(r.get("header", {}).get("revision", 0))
            return True, KeyValue(key, value, rev, rev, lease)
        for resp in r.get("responses") or []:
            kvs = resp.get("response_range", {}).get("kvs") or []
            if kvs:
                return False, _kv(kvs[0])
        return False, None

    def txn_holds(
        self, key: bytes, create_revision: int, lease: int, timeout_s: float | None = None
    ) -> bool:
        """Whether `key` still exists with this create revision and lease, asked through
        etcd's consensus (a txn, not a possibly stale read)."""
        k = _b64(key)
        r = self.call(
            "/v3/kv/txn",
            {
                "compare": [
                    {"key": k, "target": "CREATE", "result": "EQUAL",
                     "create_revision": str(create_revision)},
                    {"key": k, "target": "LEASE", "result": "EQUAL", "lease": str(lease)},
                ]
            },
            timeout_s,
        )  # fmt: skip
        return bool(r.get("succeeded"))

    def delete(self, key: bytes, timeout_s: float | None = None) -> None:
        self.call("/v3/kv/deleterange", {"key": _b64(key)}, timeout_s)
