"""The page path into the store, for a generation in flight: MissingChunks and
UploadPages, checked against the flight (job, generation, member, node) before anything
is stored.

Refusals that name no valid member of a flight (an unknown generation, a member on
another node) change nothing. Once a stream is identified as a member's upload, bad data
in it (a malformed batch, a chunk that does not hash to its id, entries that do not
cover what the header announced, chunks named but never sent) refuses the stream *and*
aborts the generation with BAD_DATA, as docs/protocol.md says: the agent that sent it
cannot be trusted with this cut. The finished upload is kept on the flight until the
agent reports Uploaded; the engine builds the manifest from it at commit.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from coordinator.flight import Flight
from coordinator.protocol_messages import MemberFailed, StoreFailed
from coordinator.protocol_values import AbortReason
from coordinator.store.ids import ID_SIZE, IdArray, as_id_array, member_of
from coordinator.uploads import MemberUpload, UploadAssembler
from cpcoord.errors import (
    AgentUnavailable,
    ChunkMismatch,
    ChunkMissing,
    GenerationStateError,
    InvalidArgument,
    ManifestInvalid,
    StoreError,
    UnknownMember,
)
from cpcoord.faults import fault_point
from cpcoord.gen.v1 import agent_pb2, common_pb2
from cpcoord.log import log_event
from cpcoord.ranges import check_name

if TYPE_CHECKING:
    from coordinator.engine import Engine

log = logging.getLogger("cpcoord.coordinator.ingest")
MAX_IDS = 65536
STORE_BYTES = 8 << 20  # chunk bytes per call of the store (see _read)
_BAD_DATA = (InvalidArgument, ChunkMismatch, ChunkMissing, ManifestInvalid)


def bitmap(mask: np.ndarray) -> bytes:
    """Bit i (LSB first in each byte) set where mask[i]: MissingChunksResponse.missing."""
    return np.packbits(mask.astype(np.uint8), bitorder="little").tobytes()


def flight_for(engine: Engine, job: str, n: int, member: str, node: str | None = None) -> Flight:
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


def missing_chunks(engine: Engine, req: agent_pb2.MissingChunksRequest) -> bytes:
    """The bitmap of ids the store lacks; the others are claimed for the generation."""
    if len(req.ids) % ID_SIZE:
        raise InvalidArgument(f"ids: {len(req.ids)} bytes is not a multiple of {ID_SIZE}")
    if len(req.ids) // ID_SIZE > MAX_IDS:
        raise InvalidArgument(f"{len(req.ids) // ID_SIZE} ids: at most {MAX_IDS} per call")
    flight_for(engine, req.job, req.generation, req.member)
    arr = as_id_array(req.ids)
    missing = engine.repo.missing(req.job, req.generation, arr)
    return bitmap(member_of(arr, missing))


def upload(engine: Engine, requests: Iterator[agent_pb2.UploadRequest]) -> MemberUpload:
    first = next(requests, None)
    if first is None or not first.HasField("header"):
        raise InvalidArgument("an upload stream starts with a header")
    h = first.header
    check_name(h.node)
    f = flight_for(engine, h.job, h.generation, h.member, h.node)
    try:
        done = _read(engine, f, h, requests)
    except _BAD_DATA as e:
        log_event(
            log,
            logging.WARNING,
            "bad upload",
            job=h.job,
            generation=h.generation,
            member=h.member,
            node=h.node,
            why=str(e),
        )
        engine.feed(f, MemberFailed(h.node, h.member, AbortReason.BAD_DATA, str(e)))
        raise
    except GenerationStateError:
        raise  # aborted meanwhile: nothing more to say
    except StoreError as e:
        engine.feed(f, StoreFailed(f"upload of {h.member}: {e}"))
        raise
    with engine.lock:
        if engine.flights.get(h.job) is not f or not f.in_flight:
            raise GenerationStateError(h.generation, h.job, "take pages", "it is not in flight")
        f.uploads[h.member] = done
    log_event(
        log,
        logging.INFO,
        "member uploaded",
        job=h.job,
        generation=h.generation,
        member=h.member,
        pages=done.pages,
        chunks_new=done.chunks_new,
        bytes_new=done.bytes_stored_new,
    )
    return done


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


def _read(
    engine: Engine,
    f: Flight,
    header: common_pb2.PagesHeader,
    requests: Iterator[agent_pb2.UploadRequest],
) -> MemberUpload:
    asm = UploadAssembler(header, engine.opt.page_size, engine.opt.max_batch_entries)
    job, n = f.job, f.number
    stored = [0, 0]  # chunks, bytes new to the store
    # Storing batch i (BLAKE3, zstd and pack writes release the GIL) overlaps receiving
    # and checking batch i+1: one batch in flight, its error raised at the next one.
    pending: Future[None] | None = None
    t_wait = t_check = t_store = 0.0  # where the stream's time goes (logged)

    def store(ids: IdArray, chunks: list[memoryview]) -> None:
        r = engine.repo.add_chunks(job, n, ids, chunks)
        stored[0] += r.stored
        stored[1] += r.bytes_stored

    # Batches are stored in groups of STORE_BYTES: the store's cost per call (index
    # lookups, sampling, locking) is paid once per group, not once per message.
    group_ids: list[IdArray] = []
    group: list[memoryview] = []
    group_bytes = 0

    def submit() -> Future[None] | None:
        nonlocal group_ids, group, group_bytes
        if not group:
            return None
        ids = group_ids[0] if len(group_ids) == 1 else np.concatenate(group_ids)
        fut = _store_pool().submit(store, ids, group)
        group_ids, group, group_bytes = [], [], 0
        return fut

    t0 = time.perf_counter()
    first = True
    try:
        for req in requests:
            t1 = time.perf_counter()
            if not req.HasField("batch"):
                raise InvalidArgument("an upload stream has exactly one header, first")
            ids, chunks = asm.add_batch(req.batch)
            t2 = time.perf_counter()
            if chunks:
                group_ids.append(ids)
                group.extend(chunks)
                group_bytes += sum(len(c) for c in chunks)
            if first:  # stored before anything else is read (the fault point's promise)
                first = False
                if group:
                    ids_, group_, group_ids, group, group_bytes = (
                        group_ids[0] if len(group_ids) == 1 else np.concatenate(group_ids),
                        group, [], [], 0,
                    )  # fmt: skip
                    store(ids_, group_)
                fault_point("coordinator.upload")
            elif group_bytes >= STORE_BYTES:
                if pending is not None:
                    pending.result()
                pending = submit()
            t3 = time.perf_counter()
            t_wait, t_check, t_store = t_wait + t1 - t0, t_check + t2 - t1, t_store + t3 - t2
            t0 = time.perf_counter()
        if pending is not None:
            pending.result()
        pending = None
        if group:  # the last group: nothing left to overlap with, so store it here
            store(group_ids[0] if len(group_ids) == 1 else np.concatenate(group_ids), group)
    finally:
        if pending is not None:  # a failure while a group was being stored: let it end
            with contextlib.suppress(Exception):
                pending.result()
    chunks_new, bytes_new = stored
    parent = f.parent_manifest(engine.repo.manifest)
    pm = None
    if parent is not None:
        with contextlib.suppress(KeyError):
            pm = parent.member(asm.header.member)
    done = asm.finish(pm, chunks_new, bytes_new)
    # Claim every chunk the tables name (kept from gc until commit) and check it is there.
    lacking = engine.repo.missing(job, n, done.chunk_ids)
    if lacking.size:
        raise ChunkMissing(lacking.size, n, job, lacking[0].tobytes().hex())
    log_event(
        log,
        logging.DEBUG,
        "upload timing",
        job=job,
        generation=n,
        member=done.member,
        wait_s=round(t_wait, 3),
        check_s=round(t_check, 3),
        store_s=round(t_store, 3),
        finish_s=round(time.perf_counter() - t0, 3),
    )
    return done
