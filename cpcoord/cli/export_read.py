"""Where `cpcoord export` reads pages from: the store itself (direct) or the coordinator.

`--data-path direct` asks the coordinator where the store is (StoreStats: location, id,
sealed or not; never the key) and where each chunk lies (ReadGeneration with
chunk_locations: ids and pack locations, no page byte), then reads the packs here and
checks every chunk against its id (nodeagent/restore/direct_read.py, the agent's own
restore read path). The store is opened with this process's S3 environment and, for a
sealed store, `--store-key-file` (or $CPCOORD_STORE_KEY): the coordinator sends its key
to agents on mTLS streams only, never to a client.

`auto` (the default) reads directly when the store opens here with the announced id and
falls back to the coordinator otherwise, saying why on stderr; a member whose direct read
fails (a damaged or missing pack, a stale mount) is read again through the coordinator,
which re-reads and re-checks the same chunks, so damage in the store still fails the
export. `direct` fails instead of falling back; `coordinator` is the page stream as
before.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpcoord.errors import CpcoordError, DataPathUnavailable, StoreInvalid
from cpcoord.gen.v1 import common_pb2, coordinator_pb2
from cpcoord.pagedata import MemberPages, read_members
from nodeagent.restore import direct_read
from storecore.backend import Backend
from storecore.crypt import Sealer, load_key
from storecore.identity import open_announced

MODES = ("auto", "direct", "coordinator")
WHO = "(export)"  # DataPathUnavailable names a node; this reader is no node


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-path",
        choices=MODES,
        default="auto",
        help="read packs from the store here (direct), through the coordinator, or direct "
        "when the store opens here (auto, default)",
    )
    p.add_argument(
        "--store-key-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="the store's data key, for a direct read of a sealed store "
        "(default: $CPCOORD_STORE_KEY)",
    )


@dataclass
class DirectStore:
    """The store as this client opened it."""

    backend: Backend
    sealer: Sealer | None

    def close(self) -> None:
        self.backend.close()


def _open(stats: coordinator_pb2.StoreStatsResponse, key_file: Path | None) -> DirectStore:
    if not stats.store_location:
        raise DataPathUnavailable(WHO, "the coordinator offers no direct data path")
    backend = open_announced(stats.store_location, stats.store_id)
    try:
        sealer = load_key(key_file) if stats.store_encrypted else None
        if stats.store_encrypted and sealer is None:
            raise StoreInvalid(
                stats.store_location, "it is encrypted: give --store-key-file to read it here"
            )
        return DirectStore(backend, sealer)
    except BaseException:
        backend.close()
        raise


def choose(conn: Any, mode: str, key_file: Path | None) -> DirectStore | None:
    """The store to read from, or None for the coordinator path (module docstring)."""
    if mode == "coordinator":
        return None
    try:
        return _open(conn.call("StoreStats", coordinator_pb2.StoreStatsRequest()), key_file)
    except CpcoordError as e:
        if mode == "direct":
            if isinstance(e, DataPathUnavailable):
                raise
            raise DataPathUnavailable(WHO, e.message()) from e
        warn(f"reading through the coordinator: {e.message()}")
        return None


def warn(text: str) -> None:
    print(f"cpcoord export: {text}", file=sys.stderr)


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


@dataclass
class Reads:
    """How the members of one export were read."""

    direct: int = 0  # members read from the store here
    coordinator: int = 0  # members read through the coordinator
    direct_bytes: int = 0  # stored bytes read from the store here


def members(
    conn: Any,
    req: coordinator_pb2.ReadGenerationRequest,
    store: DirectStore | None,
    mode: str,
    reads: Reads,
) -> Iterator[MemberPages]:
    """Every member the request names, checked, read the way `store` says."""
    if store is None:
        for mp in read_members(conn.stream("ReadGeneration", req)):
            reads.coordinator += 1
            yield mp
        return
    located = coordinator_pb2.ReadGenerationRequest()
    located.CopyFrom(req)
    located.chunk_locations = True
    for group in _by_member(conn.stream("ReadGeneration", located)):
        batches = [m.batch for m in group if m.WhichOneof("body") == "batch"]
        counted = [0]

        def on_read(n: int, counted: list[int] = counted) -> None:
            counted[0] += n

        try:
            checked = direct_read.fetch(store.backend, store.sealer, batches, on_read)
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
            for mp in read_members(conn.stream("ReadGeneration", again)):
                reads.coordinator += 1
                yield mp
            continue
        for mp in read_members(group, checked):
            reads.direct += 1
            reads.direct_bytes += counted[0]
            yield mp
