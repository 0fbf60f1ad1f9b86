"""The client end for CLI commands: where the coordinator is, the channel, the stub, and
calls whose failures come back as CpcoordErrors (via cpcoord.grpcutil).

Every client command takes `--coordinator HOST:PORT[,HOST:PORT...]` (default
`$CPCOORD_COORDINATOR`; several addresses: replicas, see cpcoord/endpoints.py),
`--insecure` (or CPCOORD_INSECURE=1), `--tls-cert/--tls-key/--tls-ca` (or
$CPCOORD_TLS_CERT/_KEY/_CA) for mTLS, `--token`/`--token-file` (or $CPCOORD_TOKEN) for the
bearer token, and `--timeout SECONDS` for unary calls. Streams (checkpoint, export, gc,
verify) have no deadline of their own: the coordinator's protocol deadlines bound them.
A call answered "not the leader", or sent to an address that cannot be reached, is sent
again to the leader named, or to the next address (cpcoord/endpoints.py); a stream only
before its first message (after that, the call already had its effect).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc

from cpcoord.closing import Closing
from cpcoord.endpoints import Endpoints, Failover
from cpcoord.errors import CpcoordError, NoCoordinatorAddress
from cpcoord.gen.v1 import coordinator_pb2_grpc
from cpcoord.grpcopts import insecure_requested, make_channel
from cpcoord.grpcutil import rpc_to_error

T = TypeVar("T")

ENV_ADDRESS = "CPCOORD_COORDINATOR"
# The option group of client commands; cpcoord.config applies its [client] table to them.
GROUP_TITLE = "coordinator connection"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(GROUP_TITLE)
    g.add_argument(
        "--coordinator",
        metavar="HOST:PORT[,...]",
        default=None,
        help=f"the coordinator's address; all of them for replicas (default: ${ENV_ADDRESS})",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC (also CPCOORD_INSECURE=1); the coordinator must allow it",
    )
    add_tls_arguments(g)
    g.add_argument("--token", default=None, help="bearer token (default: $CPCOORD_TOKEN)")
    g.add_argument("--token-file", type=Path, default=None, metavar="FILE", help="read it here")
    g.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="deadline of each call"
    )


def add_tls_arguments(g: Any) -> None:
    """--tls-cert/--tls-key/--tls-ca (shared by clients, agent and coordinator)."""
    for what, help_ in (
        ("cert", "this peer's certificate (PEM)"),
        ("key", "this peer's private key (PEM)"),
        ("ca", "the CA certificate that signs the peers it trusts"),
    ):
        g.add_argument(
            f"--tls-{what}",
            type=Path,
            default=None,
            metavar="FILE",
            help=f"{help_} (default: $CPCOORD_TLS_{what.upper()})",
        )


def tls_from_args(args: argparse.Namespace) -> Any:
    """The TlsFiles of --tls-* (or $CPCOORD_TLS_*), None when none was given."""
    from cpcoord.tls import tls_files

    def pick(what: str) -> Path | None:
        v = getattr(args, f"tls_{what}", None)
        if v is None and os.environ.get(f"CPCOORD_TLS_{what.upper()}"):
            v = Path(os.environ[f"CPCOORD_TLS_{what.upper()}"])
        return v

    return tls_files(pick("cert"), pick("key"), pick("ca"))


def address(args: argparse.Namespace) -> str:
    addr = getattr(args, "coordinator", None) or os.environ.get(ENV_ADDRESS, "")
    if not addr.strip():
        raise NoCoordinatorAddress()
    return addr.strip()


class Client(Closing):
    """Channels to the coordinator (one per address, opened when first used) and calls
    that follow the leader among replicas."""

    def __init__(
        self,
        addr: str,
        insecure: bool = False,
        timeout: float = 30.0,
        *,
        tls: Any = None,
        token: str | None = None,
    ) -> None:
        self.endpoints = Endpoints(addr)
        self.address = str(self.endpoints)
        self.timeout = timeout
        self.insecure = insecure_requested(insecure)
        self._tls, self._token = tls, token
        self._channels: dict[str, tuple[grpc.Channel, coordinator_pb2_grpc.CoordinatorStub]] = {}
        self._get(self.endpoints.current)  # a bad TLS configuration fails here, not later

    def _get(self, addr: str) -> tuple[grpc.Channel, coordinator_pb2_grpc.CoordinatorStub]:
        if addr not in self._channels:
            ch = make_channel(addr, self.insecure, tls=self._tls, token=self._token)
            self._channels[addr] = (ch, coordinator_pb2_grpc.CoordinatorStub(ch))
        return self._channels[addr]

    @property
    def channel(self) -> grpc.Channel:
        return self._get(self.endpoints.current)[0]

    @property
    def stub(self) -> coordinator_pb2_grpc.CoordinatorStub:
        return self._get(self.endpoints.current)[1]

    def with_failover(self, fn: Callable[[coordinator_pb2_grpc.CoordinatorStub, str], T]) -> T:
        """`fn(stub, address)` against the current address; when it raises NotLeader or
        CoordinatorUnavailable, again against the leader or the next address."""
        fo = Failover(self.endpoints, max(self.timeout, 1.0))
        while True:
            addr = self.endpoints.current
            try:
                return fn(self._get(addr)[1], addr)
            except CpcoordError as err:
                if not fo.retry(err):
                    raise

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """A unary call; failures raise the CpcoordError they stand for."""

        def once(stub: coordinator_pb2_grpc.CoordinatorStub, addr: str) -> Any:
            try:
                return getattr(stub, method)(request, timeout=timeout or self.timeout)
            except grpc.RpcError as e:
                raise rpc_to_error(e, method, addr) from e

        return self.with_failover(once)

    def stream(self, method: str, request: Any, timeout: float | None = None) -> Iterator[Any]:
        """A server-streaming call, iterated; failures raise CpcoordErrors. Closing the
        iterator early cancels the call. Retried elsewhere only before its first item."""

        def start(stub: coordinator_pb2_grpc.CoordinatorStub, addr: str) -> tuple[Any, Any, str]:
            call = getattr(stub, method)(request, timeout=timeout)
            try:
                first = next(call, _END)
            except grpc.RpcError as e:
                call.cancel()
                raise rpc_to_error(e, method, addr) from e
            return call, first, addr

        call, first, addr = self.with_failover(start)
        try:
            if first is _END:
                return
            yield first
            yield from call
        except grpc.RpcError as e:
            raise rpc_to_error(e, method, addr) from e
        finally:
            call.cancel()

    def close(self) -> None:
        for ch, _ in self._channels.values():
            ch.close()
        self._channels.clear()


_END = object()


def connect(args: argparse.Namespace) -> Client:
    from cpcoord.tokens import client_token

    return Client(
        address(args),
        getattr(args, "insecure", False),
        getattr(args, "timeout", 30.0),
        tls=tls_from_args(args),
        token=client_token(getattr(args, "token", None), getattr(args, "token_file", None)),
    )


# -- shared output helpers of the client commands ---------------------------------------

_STATE_PREFIX = "GENERATION_STATE_"
_REASON_PREFIX = "ABORT_REASON_"


def generation_dict(info: Any) -> dict[str, Any]:
    """A GenerationInfo as the JSON object the commands print."""
    from cpcoord.gen.v1 import common_pb2

    state = common_pb2.GenerationState.Name(info.state).removeprefix(_STATE_PREFIX).lower()
    reason = common_pb2.AbortReason.Name(info.reason).removeprefix(_REASON_PREFIX).lower()
    return {
        "job": info.job,
        "generation": info.number,
        "parent": info.parent or None,
        "state": state,
        "reason": "" if reason == "unspecified" else reason,
        "detail": info.detail,
        "started_unix_ms": info.started_unix_ms,
        "finished_unix_ms": info.finished_unix_ms,
        "pinned": info.pinned,
        "members": info.members,
        "pages": info.pages,
        "zero_pages": info.zero_pages,
        "pages_captured": info.pages_captured,
        "bytes_logical": info.bytes_logical,
        "bytes_stored": info.bytes_stored,
        "bytes_stored_new": info.bytes_new,
        "frozen_seconds": info.frozen_seconds,
        "seconds": info.seconds,
        "full": info.full,
        "level": level_name(info.level),
        "lost": info.lost,
        "cache_nodes": list(info.cache_nodes),
    }


def level_name(n: int) -> str:
    """A DurabilityLevel as printed: local, partner, store (UNSPECIFIED: an older
    coordinator, whose generations are all in the store)."""
    from cpcoord.gen.v1 import common_pb2

    try:
        name = common_pb2.DurabilityLevel.Name(n).removeprefix("DURABILITY_LEVEL_").lower()
    except ValueError:
        return "store"
    return "store" if name == "unspecified" else name


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def default_generation(c: Any, job: str, verb: str) -> int:
    """The generation a command without --generation takes: the newest committed one
    that can be read now: not lost, and in the store or (level local) in node caches
    whose agents are connected (docs/multilevel.md). Says on stderr which it took and
    why when it is not the newest; 0 (the coordinator decides and explains) when none is."""
    from cpcoord.gen.v1 import common_pb2, coordinator_pb2

    resp = c.call("ListGenerations", coordinator_pb2.ListGenerationsRequest(job=job))
    rows = [g for g in resp.generations if g.state == common_pb2.GENERATION_STATE_COMMITTED]
    up: set[str] | None = None
    skipped: list[str] = []
    for g in rows:  # newest first
        why = ""
        if g.lost:
            why = f"lost ({g.lost})"
        elif g.cache_nodes:
            if up is None:
                agents = c.call("ListAgents", coordinator_pb2.ListAgentsRequest()).agents
                up = {a.node for a in agents if a.connected}
            away = [n for n in g.cache_nodes if n not in up]
            if away:
                why = f"at level local in the cache of {', '.join(away)}, not connected"
        if why:
            skipped.append(f"generation {g.number} of {job} is {why}")
            continue
        if skipped:
            print(
                f"{'; '.join(skipped)}: {verb} generation {g.number} ({level_name(g.level)})",
                file=sys.stderr,
            )
        return int(g.number)
    return 0
