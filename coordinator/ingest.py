"""The page path into the store, for a generation in flight: MissingChunks and
UploadPages, checked against the flight (job, generation, member, node) before anything
is stored.

Refusals that name no valid member of a flight (an unknown generation, a member on
another node) change nothing. Once a stream is identified as a member's upload, bad data
in it (a malformed batch, a chunk that does not hash to its id, entries that do not
cover what the header announced, chunks named but never sent) refuses the stream *and*
aborts the generation with BAD_DATA, as docs/protocol.md says: the agent that sent it
cannot be trusted with this cut. Only a stream that ends with its end message is
complete: one cut short (the agent died, or gave up) is refused without a verdict on
the data. The finished upload is kept on the flight until the
agent reports Uploaded; the engine builds the manifest from it at commit.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from google.protobuf.message import DecodeError

from coordinator.flight import Flight
from coordinator.protocol.messages import MemberFailed, StoreFailed
from coordinator.protocol.values import AbortReason
from coordinator.store import nodepacks
from coordinator.uploads import MemberUpload, UploadAssembler
from cpcoord.errors import (
    AgentIdentityMismatch,
    AgentUnavailable,
    ChunkMismatch,
    ChunkMissing,
    GenerationStateError,
    InvalidArgument,
    ManifestInvalid,
    StoreError,
    UnknownMember,
    UploadFailed,
)
from cpcoord.faults import fault_point
from cpcoord.gen.v1 import agent_pb2, common_pb2
from cpcoord.log import log_event
from cpcoord.ranges import check_name
from storecore.ids import ID_SIZE, IdArray, as_id_array, member_of

if TYPE_CHECKING:
    from coordinator.engine_view import EngineView

log = logging.getLogger("cpcoord.coordinator.ingest")
MAX_IDS = 65536
STORE_BYTES = 8 << 20  # chunk bytes per call of the store (see _read)
_BAD_DATA = (InvalidArgument, ChunkMismatch, ChunkMissing, ManifestInvalid)


def bitmap(mask: np.ndarray) -> bytes:
    """Bit i (LSB first in each byte) set where mask[i]: MissingChunksResponse.missing."""
    return np.packbits(mask.astype(np.uint8), bitorder="little").tobytes()


def flight_for(
    engine: EngineView, job: str, n: int, member: str, node: str | None = None
) -> Flight:
    """The flight of (job, n) if it is still in flight and has `member` (on `node`)."""
    check_name(job)
    check_name(member)
    with engine.lock:
        f = engine.flights.get(job)
        if f is None or f.number != n or not f.in_flight:
            raise GenerationStateError(n, job, "take pages", "it is not in flight")
        rec = f.gen.snapshot.member(member)
        if rec is None:
            raise UnknownMember(job, member, f"in generation {n}")
        if node is not None and rec.node != node:
            raise UnknownMember(job, member, f"on node {node!r} in generation {n}")
        if engine.agents.current(rec.node) is None:
            raise AgentUnavailable(rec.node)
    return f


def missing_chunks(
    engine: EngineView, req: agent_pb2.MissingChunksRequest, caller: str = ""
) -> bytes:
    """The bitmap of ids the store lacks; the others are claimed for the generation.
    `caller`: the node of the agent certificate that asks ("" without mTLS): it may ask
    only for its own members."""
    if len(req.ids) % ID_SIZE:
        raise InvalidArgument(f"ids: {len(req.ids)} bytes is not a multiple of {ID_SIZE}")
    if len(req.ids) // ID_SIZE > MAX_IDS:
        raise InvalidArgument(f"{len(req.ids) // ID_SIZE} ids: at most {MAX_IDS} per call")
    f = flight_for(engine, req.job, req.generation, req.member)
    rec = f.gen.snapshot.member(req.member)
    if caller and rec is not None and rec.node != caller:
        raise AgentIdentityMismatch(caller, rec.node)
    arr = as_id_array(req.ids)
    missing = engine.repo.missing(req.job, req.generation, arr, rec.node if rec else None)
    if rec is not None:
        blame(engine, f, rec.node, req.member)
    return bitmap(member_of(arr, missing))


def blame(engine: EngineView, f: Flight, node: str, member: str) -> None:
    """Abort with bad_data when a node's packs of this generation failed a check while
    `member` (on `node`, still uploading) wanted their chunks (nodepacks.py). The event
    names the asking member, which the protocol still waits for (a member already
    uploaded cannot abort its generation); the detail names the node that lied."""
    try:
        bad = engine.repo.bad_nodes(f.job, f.number)
    except GenerationStateError:
        return
    for liar, why in bad.items():
        detail = f"node {liar} stored chunks that do not match their ids: {why}"
        engine.feed(f, MemberFailed(node, member, AbortReason.BAD_DATA, detail))


def upload(
    engine: EngineView, requests: Iterator[agent_pb2.UploadRequest], caller: str = ""
) -> MemberUpload:
    """One UploadPages stream, read to its end (the thread-pool way)."""
    first = next(requests, None)
    if first is None or not first.HasField("header"):
        raise InvalidArgument("an upload stream starts with a header")
    r = Receiver.open(engine, first.header, caller)
    while True:
        try:
            req = next(requests)
        except StopIteration:
            return r.end()
        except BaseException as e:  # a message that does not parse is bad data too
            r.fail(e)
            raise
        r.add(req)


def parse(raw: bytes) -> agent_pb2.UploadRequest:
    """An UploadPages message, parsed here rather than on the server's event loop."""
    try:
        return agent_pb2.UploadRequest.FromString(raw)
    except DecodeError as e:
        why = str(e) or "cannot parse"
        raise InvalidArgument(f"malformed cpcoord.v1.UploadRequest message: {why}") from None


class Inbound:
    """One UploadPages call's messages as the event loop received them (raw bytes: the
    loop only moves them), parsed, checked and stored here, on a pool thread, a list
    at a time (`take`, then `end`): the loop never spends longer on an upload than on
    reading its messages, however many regions or batches it has."""

    def __init__(self, engine: EngineView, caller: str = "") -> None:
        self.engine = engine
        self.caller = caller  # the agent certificate's node, "" without mTLS
        self.receiver: Receiver | None = None

    def take(self, raws: list[bytes]) -> None:
        i = 0
        if self.receiver is None:
            first = parse(raws[0])  # a bad header is refused; nothing to abort yet
            if not first.HasField("header"):
                raise InvalidArgument("an upload stream starts with a header")
            self.receiver = Receiver.open(self.engine, first.header, self.caller)
            i = 1
        r = self.receiver
        try:
            reqs = [parse(raw) for raw in raws[i:]]
        except InvalidArgument as e:  # a message that does not parse is bad data too
            r.fail(e)
            raise
        if reqs:
            r.add_many(reqs)

    @property
    def node(self) -> str:
        """The uploading node once its header was accepted (it names a member of that
        node in a generation in flight, and under mTLS the node is the caller), else ""."""
        r = self.receiver
        return r.h.node if r is not None else ""

    def end(self, raws: list[bytes]) -> MemberUpload:
        """The stream ended well after `raws`: the member's upload, complete."""
        if raws:
            self.take(raws)
        if self.receiver is None:
            raise InvalidArgument("an upload stream starts with a header")
        return self.receiver.end()

    def fail(self, e: BaseException) -> None:
        """The stream broke: what that means for the generation (Receiver.fail)."""
        if self.receiver is not None:
            self.receiver.fail(e)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
STORE_THREADS = 8


def _store_pool() -> ThreadPoolExecutor:
    """The threads that store batches while their streams receive the next one, shared
    by all streams (each keeps at most one batch in flight): a thread started and joined
    per stream cost more than a small upload itself, with thousands of agents."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="ingest")
        return _POOL


class Receiver:
    """One member's upload stream, fed message by message (`add`) and ended (`end`), so
    an event loop can read the stream and hand each batch to a thread. Bad data aborts
    the generation (BAD_DATA), a store failure too (store_error), as the module says."""

    def __init__(self, engine: EngineView, f: Flight, header: common_pb2.PagesHeader) -> None:
        self.engine, self.f, self.h = engine, f, header
        self.asm = UploadAssembler(header, engine.opt.page_size, engine.opt.max_batch_entries)
        self.stored = [0, 0]  # chunks, bytes new to the store
        # Storing batch i (BLAKE3, zstd and pack writes release the GIL) overlaps receiving
        # and checking batch i+1: one batch in flight, its error raised at the next one.
        self.pending: Future[None] | None = None
        # Batches are stored in groups of STORE_BYTES: the store's cost per call (index
        # lookups, sampling, locking) is paid once per group, not once per message.
        self.group_ids: list[IdArray] = []
        self.group: list[memoryview] = []
        self.group_bytes = 0
        self.first = True
        self.t_check = self.t_store = 0.0  # where the stream's time goes (logged)
        self.direct = False  # the agent reported packs it put itself (StoredPacks)
        self.ended = False  # the agent's end message arrived: the stream is complete
        self.packs = 0

    @classmethod
    def open(cls, engine: EngineView, header: common_pb2.PagesHeader, caller: str = "") -> Receiver:
        """`caller`: the agent certificate's node: an agent uploads (and reports packs
        under a node's prefix) only as itself."""
        check_name(header.node)
        if caller and header.node != caller:
            raise AgentIdentityMismatch(caller, header.node)
        f = flight_for(engine, header.job, header.generation, header.member, header.node)
        return cls(engine, f, header)

    def fail(self, e: BaseException) -> None:
        """What a failure means for the generation (then the caller re-raises it)."""
        h, f, engine = self.h, self.f, self.engine
        self._settle()
        if isinstance(e, _BAD_DATA):
            log_event(
                log, logging.WARNING, "bad upload", job=h.job, generation=h.generation,
                member=h.member, node=h.node, why=str(e),
            )  # fmt: skip
            engine.feed(f, MemberFailed(h.node, h.member, AbortReason.BAD_DATA, str(e)))
        elif isinstance(e, GenerationStateError):
            pass  # aborted meanwhile: nothing more to say
        elif isinstance(e, StoreError):
            engine.feed(f, StoreFailed(f"upload of {h.member}: {e}"))

    def _settle(self) -> None:
        if self.pending is not None:  # a failure while a group was being stored: let it end
            with contextlib.suppress(Exception):
                self.pending.result()
            self.pending = None

    def _store(self, ids: IdArray, chunks: list[memoryview]) -> None:
        r = self.engine.repo.add_chunks(self.f.job, self.f.number, ids, chunks)
        self.stored[0] += r.stored
        self.stored[1] += r.bytes_stored

    def _take_group(self) -> tuple[IdArray, list[memoryview]]:
        ids = self.group_ids[0] if len(self.group_ids) == 1 else np.concatenate(self.group_ids)
        out = (ids, self.group)
        self.group_ids, self.group, self.group_bytes = [], [], 0
        return out

    def add(self, req: agent_pb2.UploadRequest) -> None:
        self.add_many([req])

    def add_many(self, reqs: list[agent_pb2.UploadRequest]) -> None:
        """Batches of the stream, in order: checked together (one vectorised pass for
        any number of them), their chunks stored in groups."""
        try:
            self._add(reqs)
        except BaseException as e:
            self.fail(e)
            raise

    def _add(self, reqs: list[agent_pb2.UploadRequest]) -> None:
        t1 = time.perf_counter()
        batches = []
        for req in reqs:
            kind = req.WhichOneof("body")
            if self.ended:
                raise InvalidArgument("an upload stream ends with its end message, last")
            if kind == "end":
                self.ended = True
            elif kind == "packs":
                self._take_packs(req.packs)
            elif kind == "batch":
                batches.append(req.batch)
            else:
                raise InvalidArgument("an upload stream has exactly one header, first")
        ids, chunks = self.asm.add_batches(batches)
        t2 = time.perf_counter()
        if chunks:
            self.group_ids.append(ids)
            self.group.extend(chunks)
            self.group_bytes += sum(len(c) for c in chunks)
        if self.first:  # stored before anything else is read (the fault point's promise)
            self.first = False
            if self.group:
                self._store(*self._take_group())
            fault_point("coordinator.upload")
        elif self.group_bytes >= STORE_BYTES:
            if self.pending is not None:
                self.pending.result()
            self.pending = _store_pool().submit(self._store, *self._take_group())
        t3 = time.perf_counter()
        self.t_check, self.t_store = self.t_check + t2 - t1, self.t_store + t3 - t2

    def _take_packs(self, msg: agent_pb2.StoredPacks) -> None:
        """Packs the agent put itself (direct data path), checked and indexed."""
        self.direct = True
        if not msg.packs:
            return
        reports = [nodepacks.Report(p.name, p.size, p.ids, p.cached) for p in msg.packs]
        s = self.engine.agents.current(self.h.node)
        cache_id = s.hello.cache_id if s is not None else ""
        chunks, nbytes = self.engine.repo.take_packs(
            self.f.job, self.f.number, self.h.node, reports, cache_id
        )
        self.stored[0] += chunks
        self.stored[1] += nbytes
        self.packs += len(reports)

    def end(self) -> MemberUpload:
        """The stream ended well: store the rest, complete the member's tables, keep the
        upload on the flight until its agent reports Uploaded."""
        try:
            done = self._end()
        except BaseException as e:
            self.fail(e)
            raise
        h, f, engine = self.h, self.f, self.engine
        with engine.lock:
            if engine.flights.get(h.job) is not f or not f.in_flight:
                raise GenerationStateError(h.generation, h.job, "take pages", "it is not in flight")
            f.uploads[h.member] = done
        log_event(
            log, logging.INFO, "member uploaded", job=h.job, generation=h.generation,
            member=h.member, pages=done.pages, chunks_new=done.chunks_new,
            bytes_received=done.bytes_received, bytes_new=done.bytes_stored_new,
        )  # fmt: skip
        return done

    def _end(self) -> MemberUpload:
        t0 = time.perf_counter()
        if not self.ended:
            # gRPC shows a dead client's stream as ended, like a half-close: only the
            # end message says the agent meant it complete. Cut short is not bad data:
            # the agent's loss (agent_lost) or its own report ends the generation.
            h = self.h
            raise UploadFailed(h.member, h.job, h.generation, "the stream was cut short")
        if self.pending is not None:
            self.pending.result()
        self.pending = None
        if self.group:  # the last group: nothing left to overlap with, so store it here
            self._store(*self._take_group())
        engine, f, job, n = self.engine, self.f, self.f.job, self.f.number
        chunks_new, bytes_new = self.stored
        parent = f.parent_manifest(engine.repo.manifest)
        pm = None
        if parent is not None:
            with contextlib.suppress(KeyError):
                pm = parent.member(self.asm.header.member)
        done = self.asm.finish(pm, chunks_new, bytes_new)
        if self.direct:
            done = replace(done, data_path="direct", packs=self.packs)
        # Claim every chunk the tables name (kept from gc until commit) and check it is
        # there for this node (another node's chunk counts once verified: nodepacks.py).
        lacking = engine.repo.missing(job, n, done.chunk_ids, self.h.node)
        blame(engine, f, self.h.node, self.h.member)
        if lacking.size:
            raise ChunkMissing(lacking.size, n, job, lacking[0].tobytes().hex())
        log_event(
            log, logging.DEBUG, "upload timing", job=job, generation=n, member=done.member,
            check_s=round(self.t_check, 3), store_s=round(self.t_store, 3),
            finish_s=round(time.perf_counter() - t0, 3),
        )  # fmt: skip
        return done
