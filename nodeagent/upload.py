"""Uploading a staged member after its thaw: zero scan, ids, MissingChunks, UploadPages
(docs/protocol.md, "How the coordinator reads an upload"); the pool that runs them is
nodeagent/upload_pool.py.

The chunking rule (16-page groups, zero markers, BLAKE3 ids) lives in
nodeagent/chunks.py.

**Stream.** One `UploadPages` stream per member: the header (every region with `pages` =
the delivered runs and `all_pages` = every page present at the cut, so the coordinator
drops pages that vanished), then batches of one region's entries, ascending. Batches aim
at 1 MiB of chunk data (gRPC Python moves 1 MiB messages several times faster than tens
of MiB) and never exceed `max_message_bytes` or `max_batch_entries`. Batches are grouped
into windows of 64 MiB: one `MissingChunks` per window asks about the window's new ids
(not yet seen in this stream), and only missing chunks travel, raw on loopback (the
store compresses anyway) or as zstd frames when compression is on and saves >= 1/32.
The next window is hashed on a helper thread while gRPC sends this one. Batch messages
are filled in place (a nested message passed to a constructor is copied whole). Small
windows of consecutive regions share one MissingChunks (a *round*, up to 64 MiB): a
member with tens of thousands of small regions makes a few round trips, not one each.
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

import blake3
import grpc
import numpy as np
import numpy.typing as npt

from cpcoord import faults, mapfacts
from cpcoord.errors import CoordinatorUnavailable, CpcoordError, UploadFailed
from cpcoord.gen.v1 import agent_pb2, common_pb2, types_pb2
from cpcoord.grpcutil import rpc_to_error
from cpcoord.ranges import PAGE_SIZE
from nodeagent.capture import zero_rows
from nodeagent.chunks import (
    ID_SIZE,
    MAX_IDS,
    batches,
    chunk_parts,
    encode_batch,
    plan,
    windows,
)
from nodeagent.copyout import StagedRegion
from nodeagent.pagemap import runs_from_pages
from nodeagent.procfs import ProcessIdentity

log = logging.getLogger(__name__)

ATTEMPTS = 3


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
    window_bytes: int = 64 << 20
    compress: bool = False
    timeout_s: float = 600.0


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


def _runs(offsets: npt.NDArray[np.uint64]) -> list[types_pb2.PageRun]:
    return [types_pb2.PageRun(offset=o, count=c) for o, c in runs_from_pages(offsets).tolist()]


def header(sm: StagedMember) -> agent_pb2.UploadRequest:
    regions = [
        types_pb2.Region(
            name=r.name,
            start=r.start,
            end=r.end,
            pages=_runs(r.pages),
            all_pages=_runs(r.all_pages),
            mappings=mapfacts.to_protos(r.mappings),
        )
        for r in sm.regions
    ]
    return agent_pb2.UploadRequest(
        header=common_pb2.PagesHeader(
            job=sm.job,
            generation=sm.generation,
            member=sm.member,
            node=sm.node,
            page_size=PAGE_SIZE,
            regions=regions,
            tracker=sm.tracker,
            full=sm.full,
            base_generation=sm.base_generation,
            cut_unix_ns=sm.cut_unix_ns,
        )
    )


class _Region:
    """A region being uploaded: its entries and (once hashed) their chunk ids."""

    def __init__(self, r: StagedRegion) -> None:
        self.r = r
        self.entries = plan(r.pages, zero_rows(r.data))
        self.ids = np.zeros((len(self.entries), ID_SIZE), dtype=np.uint8)
        self.hashed = np.zeros(len(self.entries), dtype=np.bool_)
        self.send = np.zeros(len(self.entries), dtype=np.bool_)  # chunk travels with it

    def chunk(self, i: int) -> npt.NDArray[np.uint8]:
        row = int(self.entries.rows[i])
        return self.r.data[row : row + int(self.entries.counts[i])]

    def hash(self, idx: npt.NDArray[np.intp]) -> None:
        todo = idx[~self.hashed[idx]]
        if todo.size:
            digests = b"".join([blake3.blake3(self.chunk(int(i)).data).digest() for i in todo])
            self.ids[todo] = np.frombuffer(digests, dtype=np.uint8).reshape(-1, ID_SIZE)
            self.hashed[todo] = True


@dataclass
class _Stream:
    """Shared between the request generator (run by gRPC) and the waiting thread."""

    cancel: threading.Event
    error: CpcoordError | None = None
    done: threading.Event = field(default_factory=threading.Event)
    chunks_sent: int = 0
    bytes_sent: int = 0


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


def _hash_round(rnd: list[tuple[int, _Region, list[tuple[int, int]]]]) -> None:
    for _ri, reg, window in rnd:
        a, b = window[0][0], window[-1][1]
        reg.hash(np.arange(a, b)[~reg.entries.zero[a:b]])


class _Attempt:
    def __init__(self, stub: Any, sm: StagedMember, regions: list[_Region], limits: Limits) -> None:
        self.stub, self.sm, self.regions, self.limits = stub, sm, regions, limits
        self.seen: set[bytes] = set()
        self.framed = _accepts_frames(stub)

    def _missing(self, ids: list[bytes]) -> npt.NDArray[np.bool_]:
        req = agent_pb2.MissingChunksRequest(
            job=self.sm.job, generation=self.sm.generation, member=self.sm.member, ids=b"".join(ids)
        )
        resp = self.stub.MissingChunks(req, timeout=self.limits.timeout_s)
        bits = np.unpackbits(np.frombuffer(resp.missing, dtype=np.uint8), bitorder="little")
        if bits.size < len(ids):
            raise UploadFailed(self.sm.member, self.sm.job, self.sm.generation, "short bitmap")
        return bits[: len(ids)].astype(np.bool_)

    def _windows(self) -> list[tuple[int, _Region, list[tuple[int, int]]]]:
        lim = self.limits
        budget = min(lim.max_message_bytes, lim.batch_bytes)
        return [
            (ri, reg, w)
            for ri, reg in enumerate(self.regions)
            for w in windows(
                reg.entries, batches(reg.entries, budget, lim.max_batch_entries), lim.window_bytes
            )
        ]

    def _rounds(self) -> list[list[tuple[int, _Region, list[tuple[int, int]]]]]:
        """Consecutive windows, across regions, grouped up to `window_bytes` of chunk
        data: the unit of one MissingChunks round trip. A member of 20 000 one-page
        regions asks a few times, not 20 000 times."""
        budget = self.limits.window_bytes
        rounds: list[list[tuple[int, _Region, list[tuple[int, int]]]]] = []
        size = 0
        for ri, reg, window in self._windows():
            a, b = window[0][0], window[-1][1]
            e = reg.entries
            nbytes = int(e.counts[a:b][~e.zero[a:b]].sum()) * PAGE_SIZE
            if rounds and size + nbytes <= budget:
                rounds[-1].append((ri, reg, window))
                size += nbytes
            else:
                rounds.append([(ri, reg, window)])
                size = nbytes
        return rounds

    def requests(self, st: _Stream) -> Iterator[agent_pb2.UploadRequest | bytes]:
        # The next round is hashed on a helper thread while gRPC sends this one.
        pool = ThreadPoolExecutor(1, thread_name_prefix="cpcoord-hash")
        try:
            yield header(self.sm)
            first = True
            rounds = self._rounds()
            ahead = pool.submit(_hash_round, rounds[0]) if rounds else None
            for k, rnd in enumerate(rounds):
                assert ahead is not None
                ahead.result()
                if k + 1 < len(rounds):
                    ahead = pool.submit(_hash_round, rounds[k + 1])
                self._resolve(rnd)
                for ri, reg, window in rnd:
                    for a, b in window:
                        if st.cancel.is_set():
                            raise _Cancelled
                        yield self._batch(ri, reg, a, b, st)
                        if first:
                            first = False
                            faults.fault_point("agent.upload")
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

    def _resolve(self, rnd: list[tuple[int, _Region, list[tuple[int, int]]]]) -> None:
        """Hash the chunks of a round's windows and ask which are missing (one
        MissingChunks per round, not per batch or region). Sets `reg.send` at each entry
        whose chunk goes with it: the first entry naming a chunk neither in the store nor
        sent already."""
        new: list[tuple[_Region, int]] = []
        new_ids: list[bytes] = []
        for _ri, reg, window in rnd:
            a, b = window[0][0], window[-1][1]
            e = reg.entries
            nz = np.arange(a, b)[~e.zero[a:b]]
            reg.hash(nz)
            reg.send[a:b] = False
            for i in nz.tolist():  # one step per chunk (<= 16 pages), not per page
                d = reg.ids[i].tobytes()
                if d not in self.seen:
                    self.seen.add(d)
                    new.append((reg, i))
                    new_ids.append(d)
        for k in range(0, len(new), MAX_IDS):
            miss = self._missing(new_ids[k : k + MAX_IDS])
            for j in np.flatnonzero(miss).tolist():
                reg, i = new[k + j]
                reg.send[i] = True

    def _batch(
        self, ri: int, reg: _Region, a: int, b: int, st: _Stream
    ) -> agent_pb2.UploadRequest | bytes:
        # Filled in place: nested messages given to constructors are copied whole.
        req = agent_pb2.UploadRequest()
        batch = req.batch
        batch.region = ri
        e = reg.entries
        ent = batch.entries
        ent.page_offsets = e.offsets[a:b].astype("<u8").tobytes()
        ent.page_counts = e.counts[a:b].astype("<u4").tobytes()
        ent.chunk_skips = bytes(4 * (b - a))
        ent.chunk_ids = reg.ids[a:b].tobytes()
        send = np.flatnonzero(reg.send[a:b]) + a
        if not send.size:
            return req
        chunks = [reg.chunk(int(i)) for i in send]
        head, parts, nbytes = chunk_parts(chunks, reg.ids[send].tobytes(), self.limits.compress)
        st.chunks_sent += int(send.size)
        st.bytes_sent += nbytes
        if self.framed:
            return encode_batch(batch, head, parts)
        batch.chunks.CopyFrom(head)
        batch.chunks.data = b"".join(parts)
        return req

    def run(self, cancel: threading.Event) -> tuple[agent_pb2.UploadResponse, _Stream]:
        st = _Stream(cancel)
        fut = self.stub.UploadPages.future(self.requests(st), timeout=self.limits.timeout_s)
        try:
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
    regions = [_Region(r) for r in sm.regions]
    n_entries = sum(len(r.entries) for r in regions)
    zero_pages = sum(int(r.entries.counts[r.entries.zero].sum()) for r in regions)
    chunks = sum(int((~r.entries.zero).sum()) for r in regions)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            try:
                resp, st = _Attempt(stub, sm, regions, limits).run(cancel)
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
        )
    raise AssertionError("unreachable")  # pragma: no cover
