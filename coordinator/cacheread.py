"""Reading chunks that are only in agents' node caches (a generation at level `local`,
docs/multilevel.md, "Reading"): the relay behind export, and behind a restore whose
agent cannot read the cache itself (another node, or the coordinator read path).

The coordinator cannot read a node cache. For chunks the store lacks, it finds the
undrained cached packs that list them (cached.py; per node), sends each holding node's
agent a `ReadCached` command (token, namespace, packs, ids) on its control stream and
waits for its CommandResult. The agent reads the chunks from its cache (checked against
their ids there too: cpcoord/packread.py), streams them with `SendCached` under the
token, then answers the command. Only then are the chunks taken: each is decoded and its
BLAKE3 compared with its id here (storecore.packs.decode_chunk), so an agent that sends
other bytes makes the read fail with DataCorrupted, never a wrong export. A token is
random and bound to the node asked (under mTLS the sender's certificate must name that
node); a stream for an unknown token, or carrying more than the ids could need, is
refused. A holding node whose agent is not connected: CacheUnreachable, before the first
message of the read (`check`).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from coordinator.store import reader
from cpcoord.errors import CacheUnreachable, GenerationStateError, InvalidArgument
from cpcoord.gen.v1 import agent_pb2, common_pb2
from cpcoord.log import log_event
from storecore import packs
from storecore.ids import IdArray, ids_to_bytes

if TYPE_CHECKING:
    from coordinator.agents import Registry
    from coordinator.store import Repository

log = logging.getLogger(__name__)
READ_TIMEOUT_S = 120.0  # one ReadCached: the agent reads up to a batch from its cache
ID = 32


@dataclass
class _Pending:
    node: str
    limit: int  # bytes a stream may carry for these ids
    pieces: list[common_pb2.ChunkData] = field(default_factory=list)
    got: int = 0


class CacheReads:
    """Outstanding ReadCached commands, by token (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}

    def open(self, node: str, n_ids: int) -> str:
        token = secrets.token_hex(16)
        limit = n_ids * (packs.MAX_CHUNK_BYTES + packs.SEAL_OVERHEAD + 64)
        with self._lock:
            self._pending[token] = _Pending(node, limit)
        return token

    def close(self, token: str) -> list[common_pb2.ChunkData]:
        with self._lock:
            p = self._pending.pop(token, None)
        return p.pieces if p is not None else []

    def deliver(self, caller: str, msgs: Iterator[agent_pb2.CachedChunks]) -> None:
        """A SendCached stream (`caller`: the node of its mTLS certificate, or "")."""
        first = next(msgs, None)
        if first is None:
            return
        with self._lock:
            p = self._pending.get(first.token)
        if p is None:
            raise InvalidArgument("SendCached: no read is waiting for this token")
        if caller and caller != p.node:
            raise InvalidArgument(f"SendCached: node {caller} answers a read asked of {p.node}")
        for m in _chain(first, msgs):
            c = m.chunks
            with self._lock:
                p.got += len(c.data) + len(c.ids)
                if p.got > p.limit:
                    raise InvalidArgument("SendCached: more bytes than the chunks asked for")
                p.pieces.append(c)


def _chain(
    first: agent_pb2.CachedChunks, rest: Iterator[agent_pb2.CachedChunks]
) -> Iterator[agent_pb2.CachedChunks]:
    yield first
    yield from rest


class Host(Protocol):
    """What the relay needs of the engine."""

    @property
    def repo(self) -> Repository: ...
    @property
    def lock(self) -> threading.RLock: ...
    @property
    def agents(self) -> Registry: ...
    @property
    def cache_reads(self) -> CacheReads: ...


class Relay:
    """pagestream's reader of chunks the store lacks, through the caching agents."""

    def __init__(self, engine: Host) -> None:
        self.engine = engine

    def _holders(self, namespace: str, ids: IdArray) -> tuple[list[str], list[str], np.ndarray]:
        repo = self.engine.repo
        with self.engine.lock:  # an owner gone: a partner copy's holder serves its packs
            up = {s.node for s in self.engine.agents.connected()}
        with repo.lock:
            return repo.cached.locate(ids, namespace, reachable=up.__contains__)

    def check(self, namespace: str, ids: IdArray, job: str, generation: int) -> None:
        """Before a read: GenerationStateError when some of these are in no cache and the
        generation is recorded lost (its node cache was), CacheUnreachable when a node
        caching some of them has no connected agent. (Other chunks no cache lists are
        left to the read, which reports them as damage.)"""
        _, nodes, where = self._holders(namespace, ids)
        if np.any(where < 0):
            repo = self.engine.repo
            with repo.lock:
                lost = repo.cached.lost.get((job, generation), "")
            if lost:
                raise GenerationStateError(generation, job, "read it", f"it is lost: {lost}")
        held = where[where >= 0]
        need = sorted({nodes[int(i)] for i in np.unique(held).tolist()})
        with self.engine.lock:
            away = [n for n in need if self.engine.agents.current(n) is None]
        if away:
            n = int(np.isin(held, [i for i, x in enumerate(nodes) if x in away]).sum())
            raise CacheUnreachable(n, ", ".join(away))

    def read(self, namespace: str, ids: IdArray) -> list[bytes]:
        """Plain bytes of each chunk (in order), each checked against its id here."""
        names, nodes, where = self._holders(namespace, ids)
        if np.any(where < 0):
            raise reader.lost(self.engine.repo, namespace, ids[where < 0])
        out: list[bytes] = [b""] * ids.size
        for node in sorted(set(nodes)):
            mine = [i for i, x in enumerate(nodes) if x == node]
            rows = np.flatnonzero(np.isin(where, mine))
            if rows.size:
                got = self._ask(node, namespace, names, where[rows], ids[rows])
                for r, data in zip(rows.tolist(), got, strict=True):
                    out[r] = data
        return out

    def _ask(
        self, node: str, namespace: str, names: list[str], which: np.ndarray, ids: IdArray
    ) -> list[bytes]:
        used, index = np.unique(which, return_inverse=True)
        with self.engine.lock:
            s = self.engine.agents.current(node)
        if s is None:
            raise CacheUnreachable(ids.size, node)
        reads: CacheReads = self.engine.cache_reads
        token = reads.open(node, ids.size)
        try:
            cmd = agent_pb2.ReadCached(
                token=token,
                namespace=namespace,
                packs=[names[int(i)] for i in used.tolist()],
                ids=np.ascontiguousarray(ids).tobytes(),
                pack_index=index.astype("<u4").tobytes(),
            )
            s.ask("ReadCached", READ_TIMEOUT_S, read_cached=cmd)
        finally:
            pieces = reads.close(token)
        got = _decode(pieces, namespace, f"the node cache of {node}", self.engine)
        want = ids_to_bytes(ids)
        missing = [i for i in want if i not in got]
        if missing:
            raise InvalidArgument(
                f"node {node} sent {len(want) - len(missing)} of {len(want)} cached chunks"
            )
        log_event(log, logging.DEBUG, "chunks read from a node cache", node=node,
                  chunks=len(want))  # fmt: skip
        return [got[i] for i in want]


def _decode(
    pieces: list[common_pb2.ChunkData], namespace: str, where: str, engine: Host
) -> dict[bytes, bytes]:
    """Every chunk of the pieces, decoded and checked against its id (DataCorrupted)."""
    sealer = engine.repo.config.sealer
    out: dict[bytes, bytes] = {}
    for c in pieces:
        ids, methods, blob = c.ids, c.methods, c.data
        n = len(ids) // ID
        if len(ids) % ID or len(methods) != n or len(c.raw_sizes) != 4 * n:
            raise InvalidArgument("SendCached: chunk columns disagree")
        raw = np.frombuffer(c.raw_sizes, dtype="<u4")
        stored = np.frombuffer(c.stored_sizes, dtype="<u4").astype(np.int64)
        ends = np.cumsum(stored)
        if stored.size != n or (n and int(ends[-1]) != len(blob)):
            raise InvalidArgument("SendCached: chunk sizes disagree with the data")
        for i in range(n):  # per chunk, not per page
            cid = ids[i * ID : (i + 1) * ID]
            out[cid] = packs.decode_chunk(
                methods[i], blob[int(ends[i] - stored[i]) : int(ends[i])], int(raw[i]), cid,
                where, sealer, namespace,
            )  # fmt: skip
    return out
