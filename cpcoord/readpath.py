"""Where a client reads a committed generation's pages from: the store itself (direct) or
the coordinator. Used by `cpcoord export` and `cpcoord.api.Client.read_generation/export`.

`direct` asks the coordinator where the store is (StoreStats: location, id, sealed or
not; never the key) and where each chunk lies (ReadGeneration with chunk_locations: ids
and pack locations, no page byte), then reads the packs here and checks every chunk
against its id (cpcoord/packread.py, the agent's restore reader). The store is opened
with this process's S3 environment and, for a sealed store, a key file (or
$CPCOORD_STORE_KEY): the coordinator sends its key to agents on mTLS streams only, never
to a client.

`auto` (the default) reads directly when the store opens here with the announced id and
falls back to the coordinator otherwise, saying why (`note`: a log line at info level and
`export --json`'s `direct_unavailable`, not a warning: a client without the store's
credentials is a normal case, e.g. a scheduler host); a member whose direct read
fails (a damaged or missing pack, a stale mount) is read again through the coordinator,
which re-reads and re-checks the same chunks, so damage in the store still fails. `direct`
fails instead of falling back; `coordinator` is the page stream as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpcoord import packread
from cpcoord.errors import CpcoordError, DataPathUnavailable, InvalidArgument
from cpcoord.gen.v1 import common_pb2, coordinator_pb2
from cpcoord.pagedata import MemberPages, read_members
from storecore.backend import Backend
from storecore.crypt import Sealer
from storecore.identity import open_sealed

MODES = ("auto", "direct", "coordinator")
WHO = "(client)"  # DataPathUnavailable names a node; this reader is none
Call = Callable[[str, Any], Any]  # (method, request) -> response
Stream = Callable[[str, Any], Iterator[Any]]  # (method, request) -> messages
Warn = Callable[[str], None]


@dataclass
class DirectStore:
    """The store as this client opened it."""

    backend: Backend
    sealer: Sealer | None

    def close(self) -> None:
        self.backend.close()


@dataclass
class Reads:
    """How the members of one read were read."""

    direct: int = 0  # members read from the store here
    coordinator: int = 0  # members read through the coordinator
    direct_bytes: int = 0  # stored bytes read from the store here


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InvalidArgument(f"data path {mode!r}: choose one of {', '.join(MODES)}")
    return mode


def _open(stats: coordinator_pb2.StoreStatsResponse, key_file: Path | None) -> DirectStore:
    if not stats.store_location:
        raise DataPathUnavailable(WHO, "the coordinator offers no direct data path")
    backend, sealer = open_sealed(
        stats.store_location,
        stats.store_id,
        stats.store_encrypted,
        key_file,
        "it is encrypted: give its key file to read it here",
    )
    return DirectStore(backend, sealer)


def choose(call: Call, mode: str, key_file: Path | None, note: Warn) -> DirectStore | None:
    """The store to read from, or None for the coordinator path (module docstring);
    `note` is told why auto does not read directly."""
    if check_mode(mode) == "coordinator":
        return None
    try:
        return _open(call("StoreStats", coordinator_pb2.StoreStatsRequest()), key_file)
    except CpcoordError as e:
        if mode == "direct":
            if isinstance(e, DataPathUnavailable):
                raise
            raise DataPathUnavailable(WHO, e.message()) from e
        note(f"reading through the coordinator: {e.message()}")
        return None


def _by_member(msgs: Iterable[common_pb2.PageData]) -> Iterator[list[common_pb2.PageData]]:
    """The stream cut into one list per member (a member starts at its header)."""
    cur: list[common_pb2.PageData] = []
    for m in msgs:
        if m.WhichOneof("body") == "header" and cur:
            yield cur
            cur = []
        cur.append(m)
    if cur:
        yield cur


def members(
    stream: Stream,
    req: coordinator_pb2.ReadGenerationRequest,
    store: DirectStore | None,
    mode: str,
    reads: Reads,
    warn: Warn,
) -> Iterator[MemberPages]:
    """Every member the request names, checked, read the way `store` says."""
    if store is None:
        for mp in read_members(stream("ReadGeneration", req)):
            reads.coordinator += 1
            yield mp
        return
    located = coordinator_pb2.ReadGenerationRequest()
    located.CopyFrom(req)
    located.chunk_locations = True
    for group in _by_member(stream("ReadGeneration", located)):
        batches = [m.batch for m in group if m.WhichOneof("body") == "batch"]
        counted = [0]

        def on_read(n: int, counted: list[int] = counted) -> None:
            counted[0] += n

        try:
            checked = packread.fetch(store.backend, store.sealer, batches, on_read)
        except CpcoordError as e:
            if mode == "direct":
                raise
            name = group[0].header.member
            warn(f"member {name}: direct read failed, reading through the coordinator: "
                 f"{e.message()}")  # fmt: skip
            again = coordinator_pb2.ReadGenerationRequest()
            again.CopyFrom(req)
            del again.members[:]
            again.members.append(name)
            for mp in read_members(stream("ReadGeneration", again)):
                reads.coordinator += 1
                yield mp
            continue
        for mp in read_members(group, checked):
            reads.direct += 1
            reads.direct_bytes += counted[0]
            yield mp
