"""`cpcoord.v1.AgentControl`: the agents' side of the API, a thin adapter over the engine.

The calls that move pages (MissingChunks, UploadPages, DownloadPages) run here, on the
server's thread pool: they hash, compress and write or read the store. The control
stream (`Attach`) holds no thread: it is coordinator/servicers/streams.py, on the loop.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from coordinator import cacheread, generations, ingest, pagestream, restore_diff
from coordinator.auth import cert_identity
from coordinator.engine import Engine
from coordinator.servicers import convert
from cpcoord.gen.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from cpcoord.grpcutil import rpc_errors


class AgentControl(agent_pb2_grpc.AgentControlServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @rpc_errors
    def MissingChunks(
        self, request: agent_pb2.MissingChunksRequest, context: grpc.ServicerContext
    ) -> agent_pb2.MissingChunksResponse:
        caller = (cert_identity(context) or ("", ""))[1]
        missing = ingest.missing_chunks(self.engine, request, caller)
        return agent_pb2.MissingChunksResponse(missing=missing)

    @rpc_errors
    def UploadPages(
        self, request_iterator: Iterator[agent_pb2.UploadRequest], context: grpc.ServicerContext
    ) -> agent_pb2.UploadResponse:
        caller = (cert_identity(context) or ("", ""))[1]  # an agent uploads as itself
        done = ingest.upload(self.engine, request_iterator, caller)
        return convert.upload_response(done)

    @rpc_errors
    def DownloadPages(
        self, request: agent_pb2.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.PageData]:
        m, nodes = generations.manifest(self.engine, request.job, request.generation)
        only = None
        if request.page_filter:  # the restore's prefetch: only the pages it will write
            only = {r.name: restore_diff.pages_of_runs(r.pages) for r in request.page_filter}
        cache_node = ""
        if request.chunk_locations and request.read_cache:  # it reads its own node cache
            cache_node = (cert_identity(context) or ("", ""))[1] or nodes.get(request.member, "")
        node, dp = nodes.get(request.member, ""), self.engine.dataplane
        yield from pagestream.stream(
            self.engine.repo,
            m,
            [request.member],
            list(request.regions),
            nodes,
            self.engine.opt.max_batch_entries,
            only=only,
            locate=request.chunk_locations,
            record=lambda sent, located: dp.record_read(node, sent, located),
            cache_node=cache_node,
            relay=cacheread.Relay(self.engine),
        )

    @rpc_errors
    def SendCached(
        self, request_iterator: Iterator[agent_pb2.CachedChunks], context: grpc.ServicerContext
    ) -> agent_pb2.SendCachedResponse:
        caller = (cert_identity(context) or ("", ""))[1]  # under mTLS: the node asked
        self.engine.cache_reads.deliver(caller, request_iterator)
        return agent_pb2.SendCachedResponse()
