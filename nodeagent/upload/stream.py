"""Uploading a staged member after its thaw: zero scan, ids, MissingChunks, UploadPages
(docs/protocol.md, "How the coordinator reads an upload"); the pool that runs them is
nodeagent/upload/pool.py.

The chunking rule (16-page groups, zero markers, BLAKE3 ids) lives in
nodeagent/upload/chunks.py.

**Stream.** One `UploadPages` stream per member: the header (every region with `pages` =
the delivered runs and `all_pages` = every page present at the cut, so the coordinator
drops pages that vanished), then batches of one region's entries, ascending. Batches aim
at a few MiB of chunk data (gRPC Python moves MiB messages several times faster than tens
of MiB) and never exceed `max_message_bytes` or `max_batch_entries`. Consecutive batches,
of any regions, are grouped into *rounds* (16 MiB, then four times the last up to 256 MiB: the
first is hashed before anything else starts, the rest keep the calls few; on the direct
path a round's batches of one region are one message): one `MissingChunks` per round
asks about its new ids (not yet seen in this stream), and only missing chunks travel,
raw on loopback (the store compresses anyway) or as zstd frames when compression is on
and saves >= 1/32: a member with tens of thousands of small regions makes a few round
trips, not one each. The next round is hashed on a helper thread while gRPC sends this
one. Batch messages are filled in place (a nested message passed to a constructor is
copied whole). Entries, runs, batches and rounds are planned for the whole member at
once (nodeagent/upload/plan.py), never with NumPy calls per region.
`Uploaded` is reported by the caller only after the stream returned OK and its counts
match what was sent. A stream broken by the transport (UNAVAILABLE) is retried from its
header: the chunks that arrived are no longer reported missing. On cancel or error the
call is cancelled, never half-closed (which would look like a complete stream).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from cpcoord import faults, mapfacts
from cpcoord.errors import CoordinatorUnavailable, CpcoordError, UploadFailed
from cpcoord.gen.v1 import agent_pb2, types_pb2
from cpcoord.grpcutil import rpc_to_error
from cpcoord.ranges import PAGE_SIZE
from nodeagent.capture.copyout import StagedRegion
from nodeagent.proc.procfs import ProcessIdentity
from nodeagent.upload.chunks import (
    ENTRY_BYTES,
    ID_SIZE,
    MAX_IDS,
    MESSAGE_MARGIN,
    chunk_parts,
    encode_batch,
)
from nodeagent.upload.direct import DirectStore, PackBuilder
from nodeagent.upload.plan import Plan, member_runs, merge, rounds
from storecore.ids import as_id_array

log = logging.getLogger(__name__)

ATTEMPTS = 3


Uploaded = Callable[[npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.int64]], None]


@dataclass(frozen=True)
class StagedMember:
    """A member's copy at the cut, thawed, waiting for upload (views of its staging)."""

    job: str
    generation: int
    member: str
    node: str
    ident: ProcessIdentity
    regions: tuple[StagedRegion, ...]
    tracker: str  # tracker that produced the changed set, "none" when full
    full: bool
    base_generation: int  # the generation the changed set is relative to, 0 when full
    cut_unix_ns: int
    frozen_seconds: float
    release: Callable[[], None] = field(default=lambda: None, compare=False)
    # Every region's staged pages back to back, when staging holds them so (the
    # regions' `data` are views of it): the upload scans it for zero pages at once.
    rows: npt.NDArray[np.uint8] | None = field(default=None, repr=False, compare=False)
    # A whole-memory member: every mapping at the cut (nodeagent/restore/layout.py).
    layout: tuple[mapfacts.MapFact, ...] = field(default=(), repr=False, compare=False)
    # Told after a successful upload of `rows`: each chunk's id, first row (of `rows`)
    # and page count (nodeagent/upload/recent.py).
    uploaded: Uploaded = field(default=lambda ids, rows, counts: None, compare=False)

    @property
    def pages(self) -> int:
        return sum(int(r.pages.size) for r in self.regions)


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 64 << 20
    max_batch_entries: int = 65536
    # gRPC Python moves ~1 MiB messages 3-8x faster than tens of MiB: batches aim at
    # this, while MissingChunks is asked once per window of batches.
    batch_bytes: int = 4 << 20
    # Rounds start at first_window_bytes and grow up to window_bytes (plan.rounds):
    # each round costs the coordinator a MissingChunks call and, on the direct path, a
    # batch message per region; 64 MiB rounds were 8 of each per 512 MiB member.
    first_window_bytes: int = 16 << 20
    window_bytes: int = 256 << 20
    compress: bool = False
    timeout_s: float = 600.0
    # The direct data path (direct.py): the store this agent puts its packs into, None
    # for the coordinator path.
    direct: DirectStore | None = field(default=None, compare=False)


@dataclass(frozen=True)
class UploadResult:
    pages: int
    zero_pages: int
    entries: int
    chunks: int  # non-zero entries
    chunks_sent: int
    bytes_sent: int
    bytes_stored_new: int
    seconds: float
    attempts: int
    data_path: str = "coordinator"  # or "direct"
    packs: int = 0  # packs put by the agent (direct)


END = agent_pb2.UploadRequest(end=agent_pb2.UploadEnd())


def header(sm: StagedMember) -> agent_pb2.UploadRequest:
    """The stream's first message: every region with its delivered and present runs
    (computed for all regions at once; one Region message each)."""
    req = agent_pb2.UploadRequest()
    h = req.header
    h.job, h.generation, h.member, h.node = sm.job, sm.generation, sm.member, sm.node
    h.page_size = PAGE_SIZE
    h.tracker, h.full, h.base_generation = sm.tracker, sm.full, sm.base_generation
    h.cut_unix_ns = sm.cut_unix_ns
    h.layout.extend(mapfacts.to_protos(sm.layout))
    pr, pi = member_runs([r.pages for r in sm.regions])
    ar, ai = member_runs([r.all_pages for r in sm.regions])
    run = types_pb2.PageRun
    for i, r in enumerate(sm.regions):
        reg = h.regions.add(name=r.name, start=r.start, end=r.end)
        reg.pages.extend([run(offset=o, count=c) for o, c in pr[pi[i] : pi[i + 1]]])
        reg.all_pages.extend([run(offset=o, count=c) for o, c in ar[ai[i] : ai[i + 1]]])
        if r.mappings:
            reg.mappings.extend(mapfacts.to_protos(r.mappings))
    return req


@dataclass
class _Stream:
    """Shared between the request generator (run by gRPC) and the waiting thread."""

    cancel: threading.Event
    error: CpcoordError | None = None
    done: threading.Event = field(default_factory=threading.Event)
    chunks_sent: int = 0
    bytes_sent: int = 0
    packs: int = 0


class _Cancelled(Exception):
    """The upload was cancelled between two batches (internal to the generator)."""


def _serialize(req: agent_pb2.UploadRequest | bytes) -> bytes:
    """UploadPages' request serializer: messages, or batches already encoded."""
    return req if isinstance(req, bytes) else req.SerializeToString()


UPLOAD_PAGES = "/cpcoord.v1.AgentControl/UploadPages"


def enable_frames(stub: Any, channel: grpc.Channel) -> Any:
    """Give an AgentControl stub an UploadPages call that sends pre-encoded batches
    (chunks.encode_batch) as they are. The generated stub serialises with
    UploadRequest.SerializeToString, which refuses bytes; this call is built from the
    channel with `_serialize` (same bytes on the wire for messages). Returns the stub."""
    stub.UploadPages = channel.stream_unary(
        UPLOAD_PAGES,
        request_serializer=_serialize,
        response_deserializer=agent_pb2.UploadResponse.FromString,
    )
    stub.framed_uploads = True
    return stub


def _accepts_frames(stub: Any) -> bool:
    """Whether the stub's UploadPages sends pre-encoded batches (see enable_frames); any
    other stub (the generated one, a fake in tests) is sent messages."""
    return getattr(stub, "framed_uploads", False) is True


def _hash_round(p: Plan, rnd: list[tuple[int, int]]) -> None:
    a, b = rnd[0][0], rnd[-1][1]
    p.hash(np.arange(a, b)[~p.e.zero[a:b]])


class _Attempt:
    def __init__(self, stub: Any, sm: StagedMember, p: Plan, limits: Limits) -> None:
        self.stub, self.sm, self.p, self.limits = stub, sm, p, limits
        self.seen: set[bytes] = set()
        self.framed = _accepts_frames(stub)
        d = limits.direct
        self.builder = PackBuilder(d, sm.job, sm.generation, sm.member) if d is not None else None

    def _missing(self, ids: list[bytes]) -> npt.NDArray[np.bool_]:
        req = agent_pb2.MissingChunksRequest(
            job=self.sm.job, generation=self.sm.generation, member=self.sm.member, ids=b"".join(ids)
        )
        resp = self.stub.MissingChunks(req, timeout=self.limits.timeout_s)
        bits = np.unpackbits(np.frombuffer(resp.missing, dtype=np.uint8), bitorder="little")
        if bits.size < len(ids):
            raise UploadFailed(self.sm.member, self.sm.job, self.sm.generation, "short bitmap")
        return bits[: len(ids)].astype(np.bool_)

    def _rounds(self) -> list[list[tuple[int, int]]]:
        """Batches (entry ranges within one region), grouped into rounds of chunk data
        that start at `first_window_bytes` and grow up to `window_bytes` (plan.rounds):
        one MissingChunks per round."""
        lim = self.limits
        first = lim.first_window_bytes
        if self.builder is None:
            bs = self.p.batches(min(lim.max_message_bytes, lim.batch_bytes), lim.max_batch_entries)
            return rounds(bs, self.p.chunk_bytes(), lim.window_bytes, first)
        # Direct: a batch carries entries only (its chunks go into our packs), so it is
        # cut by the round (one message per round per region), not by the message size
        # its chunks would need: each message costs the coordinator a receive, a parse
        # and a check. Its entries alone must fit a message.
        fit = (lim.max_message_bytes - MESSAGE_MARGIN) // ENTRY_BYTES
        entries = max(1, min(lim.max_batch_entries, fit))
        bs = self.p.batches(min(first, lim.window_bytes) + MESSAGE_MARGIN, entries)
        rnds = rounds(bs, self.p.chunk_bytes(), lim.window_bytes, first)
        return [merge(r, self.p.rid, entries) for r in rnds]

    def requests(self, st: _Stream) -> Iterator[agent_pb2.UploadRequest | bytes]:
        # The next round is hashed on a helper thread while gRPC sends this one.
        pool = ThreadPoolExecutor(1, thread_name_prefix="cpcoord-hash")
        try:
            yield header(self.sm)
            first = True
            rnds = self._rounds()
            ahead = pool.submit(_hash_round, self.p, rnds[0]) if rnds else None
            for k, rnd in enumerate(rnds):
                assert ahead is not None
                ahead.result()
                if k + 1 < len(rnds):
                    ahead = pool.submit(_hash_round, self.p, rnds[k + 1])
                self._resolve(rnd)
                for a, b in rnd:
                    if st.cancel.is_set():
                        raise _Cancelled
                    yield self._batch(a, b, st)
                    if first:
                        first = False
                        faults.fault_point("agent.upload")
                    ready = self.builder.ready() if self.builder is not None else None
                    if ready is not None:
                        yield ready
            if self.builder is not None:  # every pack durable before the stream ends
                yield self.builder.finish()
                st.packs = self.builder.packs
            yield END  # only this says the stream is complete (a dead agent's ends too)
        except grpc.RpcError as e:
            st.error = rpc_to_error(e, "MissingChunks")
        except CpcoordError as e:
            st.error = e
        except _Cancelled:
            pass
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        # Ending the generator would half-close the stream as if it were complete: on
        # an error, wait until the waiting thread has cancelled the call.
        if st.error is not None or st.cancel.is_set():
            st.done.wait(self.limits.timeout_s)

    def _resolve(self, rnd: list[tuple[int, int]]) -> None:
        """Hash the chunks of a round and ask which are missing (one MissingChunks per
        round, not per batch or region). Sets `send` at each entry whose chunk goes
        with it: the first entry naming a chunk neither in the store nor sent already."""
        p = self.p
        a, b = rnd[0][0], rnd[-1][1]
        nz = np.arange(a, b)[~p.e.zero[a:b]]
        p.hash(nz)
        p.send[a:b] = False
        new: list[int] = []
        new_ids: list[bytes] = []
        ids = p.ids[nz].tobytes()
        for k, i in enumerate(nz.tolist()):  # one step per chunk (<= 16 pages), not per page
            d = ids[k * ID_SIZE : (k + 1) * ID_SIZE]
            if d not in self.seen:
                self.seen.add(d)
                new.append(i)
                new_ids.append(d)
        for k in range(0, len(new), MAX_IDS):
            miss = self._missing(new_ids[k : k + MAX_IDS])
            p.send[np.asarray(new[k : k + MAX_IDS], dtype=np.int64)[miss]] = True

    def _batch(self, a: int, b: int, st: _Stream) -> agent_pb2.UploadRequest | bytes:
        # Filled in place: nested messages given to constructors are copied whole.
        p = self.p
        e = p.e
        req = agent_pb2.UploadRequest()
        batch = req.batch
        batch.region = p.region_of(a)
        ent = batch.entries
        ent.page_offsets = e.offsets[a:b].astype("<u8").tobytes()
        ent.page_counts = e.counts[a:b].astype("<u4").tobytes()
        ent.chunk_skips = bytes(4 * (b - a))
        ent.chunk_ids = p.ids[a:b].tobytes()
        send = np.flatnonzero(p.send[a:b]) + a
        if not send.size:
            return req
        chunks = [p.chunk(i) for i in send.tolist()]
        if self.builder is not None:  # into our own packs; the batch names them only
            views = [np.ascontiguousarray(c).reshape(-1).data for c in chunks]
            self.builder.add(as_id_array(p.ids[send]), views)
            st.chunks_sent += int(send.size)
            st.bytes_sent += sum(v.nbytes for v in views)
            return req
        head, parts, nbytes = chunk_parts(chunks, p.ids[send].tobytes(), self.limits.compress)
        st.chunks_sent += int(send.size)
        st.bytes_sent += nbytes
        if self.framed:
            return encode_batch(batch, head, parts)
        batch.chunks.CopyFrom(head)
        batch.chunks.data = b"".join(parts)
        return req

    def run(self, cancel: threading.Event) -> tuple[agent_pb2.UploadResponse, _Stream]:
        st = _Stream(cancel)
        try:
            fut = self.stub.UploadPages.future(self.requests(st), timeout=self.limits.timeout_s)
            while True:
                try:
                    resp = fut.result(timeout=0.2)
                    break
                except grpc.FutureTimeoutError:
                    if cancel.is_set() or st.error is not None:
                        fut.cancel()
                except grpc.FutureCancelledError:
                    raise st.error or UploadFailed(
                        self.sm.member, self.sm.job, self.sm.generation, "cancelled"
                    ) from None
        finally:
            st.done.set()
            if self.builder is not None:  # before the caller releases the staging
                self.builder.close()
        if st.error is not None:
            raise st.error
        return resp, st


def upload(
    stub: Any, sm: StagedMember, limits: Limits, cancel: threading.Event | None = None
) -> UploadResult:
    """Upload one staged member. Raises UploadFailed (or the coordinator's error, e.g.
    ChunkMismatch) on failure; on `cancel` raises UploadFailed("cancelled")."""
    t0 = time.perf_counter()
    cancel = cancel or threading.Event()
    p = Plan(sm.regions, sm.rows)
    n_entries, zero_pages, chunks = len(p), p.zero_pages, p.chunks
    for attempt in range(1, ATTEMPTS + 1):
        try:
            try:
                resp, st = _Attempt(stub, sm, p, limits).run(cancel)
            except grpc.RpcError as e:
                raise rpc_to_error(e, "UploadPages") from None
        except CpcoordError as err:
            # The transport broke (UNAVAILABLE): try again from the header.
            if (
                isinstance(err, CoordinatorUnavailable)
                and attempt < ATTEMPTS
                and not cancel.is_set()
            ):
                log.warning(
                    "upload retried", extra={"fields": {"member": sm.member, "error": str(err)}}
                )
                time.sleep(0.2 * 2**attempt)
                continue
            if isinstance(err, CoordinatorUnavailable):
                raise UploadFailed(sm.member, sm.job, sm.generation, str(err)) from err
            raise  # the coordinator's own verdict (e.g. ChunkMismatch): its class tells why
        if resp.pages != sm.pages or resp.entries != n_entries:
            why = (
                f"coordinator counted {resp.pages} pages / {resp.entries} entries, "
                f"sent {sm.pages} / {n_entries}"
            )
            raise UploadFailed(sm.member, sm.job, sm.generation, why)
        if p.rows is not None:  # staging holds these chunks until it is written again
            sel = ~p.e.zero & p.hashed
            sm.uploaded(p.ids[sel], p.e.rows[sel], p.e.counts[sel])
        return UploadResult(
            pages=sm.pages,
            zero_pages=zero_pages,
            entries=n_entries,
            chunks=chunks,
            chunks_sent=st.chunks_sent,
            bytes_sent=st.bytes_sent,
            bytes_stored_new=resp.bytes_stored_new,
            seconds=time.perf_counter() - t0,
            attempts=attempt,
            data_path="direct" if limits.direct is not None else "coordinator",
            packs=st.packs,
        )
    raise AssertionError("unreachable")  # pragma: no cover
