"""What the node agent reports up when an upload of a member ends: `Uploaded` with the
member's stats (and the upload metrics), or `Failed` with the abort reason its error
maps to (bad data, the agent's own store put, or the upload itself). A cancelled
upload (an Abort or a broken stream) says nothing.
"""

from __future__ import annotations

import logging

from cpcoord.errors import ChunkMismatch, CpcoordError, StoreError
from cpcoord.gen.v1 import agent_pb2, common_pb2
from cpcoord.ranges import PAGE_SIZE
from nodeagent.daemon.metrics import AgentMetrics
from nodeagent.daemon.worker_ops import R, failed
from nodeagent.upload.stream import StagedMember, UploadResult

log = logging.getLogger("nodeagent.daemon.agent")


def upload_report(
    sm: StagedMember, res: UploadResult | CpcoordError | None, metrics: AgentMetrics
) -> agent_pb2.AgentMessage | None:
    """The message an upload's end sends up (None: nothing to say); counts a success in
    `metrics`."""
    if res is None:  # cancelled: an Abort or a broken stream; nothing to say
        return None
    if isinstance(res, CpcoordError):
        if isinstance(res, ChunkMismatch):
            reason = R.ABORT_REASON_BAD_DATA
        elif isinstance(res, StoreError):  # its own put failed (direct data path)
            reason = R.ABORT_REASON_STORE_ERROR
        else:
            reason = R.ABORT_REASON_UPLOAD_FAILED
        log.warning("upload failed", extra={"fields": {"member": sm.member, "error": str(res)}})
        return failed(sm.job, sm.generation, sm.member, reason, res)
    m = metrics
    m.upload_seconds.observe(res.seconds)
    m.upload_bytes.inc(res.bytes_sent)
    m.upload_chunks.labels("sent").inc(res.chunks_sent)
    m.upload_chunks.labels("present").inc(res.chunks - res.chunks_sent)
    m.zero_pages.inc(res.zero_pages)
    stats = common_pb2.MemberStats(
        pages=res.pages,
        zero_pages=res.zero_pages,
        bytes_logical=res.pages * PAGE_SIZE,
        bytes_stored_new=res.bytes_stored_new,
        frozen_seconds=sm.frozen_seconds,
        tracker=sm.tracker,
        full=sm.full,
    )
    up = agent_pb2.Uploaded(job=sm.job, generation=sm.generation, member=sm.member, stats=stats)
    return agent_pb2.AgentMessage(uploaded=up)
