"""How a scripted agent describes and uploads pages over the real AgentControl protocol:
the test's FakeAgent (tests/helpers/fake_agent.py) and the benchmark's SimAgent
(bench/agent_sim.py) both hold plain bytes, not processes, and encode them here: which
pages changed, their runs, their chunk ids (zero pages get the zero id), the page
entries and chunk data of a batch, the header of an upload, and the member-level
replies (staged, uploaded, upload failed).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import blake3
import numpy as np
import numpy.typing as npt

from cpcoord.gen.v1 import agent_pb2, common_pb2, manifest_pb2, types_pb2

PAGE = 4096
ZERO_ID = bytes(32)


def changed_pages(data: npt.NDArray[np.uint8], committed: bytes | None) -> npt.NDArray[np.intp]:
    """Page indices of `data` ((pages, PAGE) bytes) that differ from the last committed
    copy; all of them without one."""
    if committed is None:
        return np.arange(data.shape[0])
    old = np.frombuffer(committed, np.uint8).reshape(-1, PAGE)
    return np.flatnonzero((data != old).any(axis=1))


def page_runs(pages: npt.NDArray[np.intp]) -> list[types_pb2.PageRun]:
    """Sorted page indices as runs of consecutive pages."""
    if not pages.size:
        return []
    brk = np.flatnonzero(np.diff(pages) != 1) + 1
    lo = np.concatenate(([0], brk))
    hi = np.concatenate((brk, [pages.size]))
    return [
        types_pb2.PageRun(offset=int(pages[a]), count=int(b - a))
        for a, b in zip(lo, hi, strict=True)
    ]


def region(name: str, start: int, pages: int, changed: npt.NDArray[np.intp]) -> types_pb2.Region:
    """A region of `pages` pages at `start` of which `changed` are uploaded."""
    return types_pb2.Region(
        name=name,
        start=start,
        end=start + pages * PAGE,
        pages=page_runs(changed),
        all_pages=[types_pb2.PageRun(offset=0, count=pages)],
    )


def chunk_ids(
    data: npt.NDArray[np.uint8], changed: npt.NDArray[np.intp]
) -> tuple[list[bytes], list[bool]]:
    """(chunk id, is zero) of each changed page: BLAKE3 of its bytes, the zero id for a
    page of zeros."""
    zero: list[bool] = np.asarray(~data[changed].any(axis=1)).tolist()
    ids = [
        ZERO_ID if z else blake3.blake3(data[p].tobytes()).digest()
        for p, z in zip(changed.tolist(), zero, strict=True)
    ]
    return ids, zero


def page_entries(changed: npt.NDArray[np.intp], ids: Sequence[bytes]) -> manifest_pb2.PageEntries:
    """One entry per changed page, each its own chunk."""
    return manifest_pb2.PageEntries(
        page_offsets=changed.astype("<u8").tobytes(),
        page_counts=np.ones(changed.size, "<u4").tobytes(),
        chunk_skips=np.zeros(changed.size, "<u4").tobytes(),
        chunk_ids=b"".join(ids),
    )


def chunk_data(ids: Sequence[bytes], blobs: Sequence[bytes]) -> common_pb2.ChunkData:
    """Uncompressed page-sized chunks."""
    sizes = np.full(len(blobs), PAGE, "<u4").tobytes()
    return common_pb2.ChunkData(
        ids=b"".join(ids),
        methods=bytes(len(blobs)),
        raw_sizes=sizes,
        stored_sizes=sizes,
        data=b"".join(blobs),
    )


def pages_header(
    job: str, gen: int, member: str, node: str, regions: Sequence[types_pb2.Region], full: bool
) -> common_pb2.PagesHeader:
    return common_pb2.PagesHeader(
        job=job,
        generation=gen,
        member=member,
        node=node,
        page_size=PAGE,
        regions=regions,
        tracker="none",
        full=full,
        cut_unix_ns=time.time_ns(),
    )


def upload_failed(job: str, gen: int, member: str, detail: str) -> agent_pb2.Failed:
    return agent_pb2.Failed(
        job=job,
        generation=gen,
        member=member,
        reason=common_pb2.ABORT_REASON_UPLOAD_FAILED,
        detail=detail,
    )
