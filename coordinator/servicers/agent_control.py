"""`cpcoord.v1.AgentControl`: the agents' side of the API, a thin adapter over the engine.

Attach: the first message must be a Hello; the session is registered (its Welcome goes
first), a reader thread takes the agent's messages off the stream, a handler thread feeds
them to the engine in order, a third thread reconciles its members, and this handler
drains the session's outbound queue until the stream ends. Whatever ends it (the agent
hangs up, the connection breaks, a protocol violation, silence), the engine hears
`disconnect` exactly once.

Reading and handling are apart so that liveness is what *arrives*: the reader marks the
session heard for every message as it comes, whatever the handler is waiting for (the
engine lock, a catalog write on a slow disk). A handler stuck for a while behind the
engine must never make a live agent look silent (issue 12: an agent declared lost).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator

import grpc

from coordinator import agent_events, generations, ingest, members_ops, pagestream
from coordinator.agents import AgentSession
from coordinator.engine import Engine
from cpcoord.errors import CpcoordError, InvalidArgument
from cpcoord.gen.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from cpcoord.grpcutil import rpc_errors
from cpcoord.log import log_event

log = logging.getLogger("cpcoord.coordinator.rpc")


class AgentControl(agent_pb2_grpc.AgentControlServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @rpc_errors
    def Attach(
        self, request_iterator: Iterator[agent_pb2.AgentMessage], context: grpc.ServicerContext
    ) -> Iterator[agent_pb2.CoordinatorMessage]:
        first = next(request_iterator, None)
        if first is None:
            return
        if first.WhichOneof("body") != "hello":
            raise InvalidArgument("the first message on a control stream must be a Hello")
        s = self.engine.connect(first.hello, context.peer())
        context.add_callback(lambda: self.engine.disconnect(s, "the stream ended"))
        threading.Thread(
            target=self._read, args=(s, request_iterator), name=f"agent-{s.node}", daemon=True
        ).start()
        threading.Thread(
            target=members_ops.reconcile,
            args=(self.engine, s),
            name=f"reconcile-{s.node}",
            daemon=True,
        ).start()
        while True:
            msg = s.next_outbound()
            if msg is None:
                return
            yield msg

    def _read(self, s: AgentSession, it: Iterator[agent_pb2.AgentMessage]) -> None:
        inbox: queue.SimpleQueue[agent_pb2.AgentMessage | None] = queue.SimpleQueue()
        handler = threading.Thread(
            target=self._handle, args=(s, inbox), name=f"agent-{s.node}-handler", daemon=True
        )
        handler.start()
        detail = "the agent ended the stream"
        try:
            for msg in it:
                s.heard()
                inbox.put(msg)
                if not s.alive:  # the handler closed it (a protocol violation)
                    break
        except grpc.RpcError:
            detail = "the stream broke"
        except Exception as e:  # a bug here must not leave the node half-attached
            log.exception("agent stream reader failed")
            detail = f"reader failed: {type(e).__name__}"
        inbox.put(None)
        self.engine.disconnect(s, detail)

    def _handle(
        self, s: AgentSession, inbox: queue.SimpleQueue[agent_pb2.AgentMessage | None]
    ) -> None:
        """Feed the agent's messages to the engine, in order, until the reader is done."""
        while (msg := inbox.get()) is not None:
            if not s.alive:
                continue  # drain: the session is over
            try:
                agent_events.handle(self.engine, s, msg)
            except CpcoordError as e:
                log_event(log, logging.WARNING, "closing agent stream", node=s.node, why=str(e))
                self.engine.disconnect(s, f"protocol violation: {e}")
            except Exception as e:  # a bug here must not leave the node half-attached
                log.exception("agent message handler failed")
                self.engine.disconnect(s, f"handler failed: {type(e).__name__}")

    @rpc_errors
    def MissingChunks(
        self, request: agent_pb2.MissingChunksRequest, context: grpc.ServicerContext
    ) -> agent_pb2.MissingChunksResponse:
        return agent_pb2.MissingChunksResponse(missing=ingest.missing_chunks(self.engine, request))

    @rpc_errors
    def UploadPages(
        self, request_iterator: Iterator[agent_pb2.UploadRequest], context: grpc.ServicerContext
    ) -> agent_pb2.UploadResponse:
        done = ingest.upload(self.engine, request_iterator)
        return agent_pb2.UploadResponse(
            pages=done.pages,
            entries=done.entries,
            chunks=done.chunks,
            chunks_new=done.chunks_new,
            bytes_received=done.bytes_received,
            bytes_stored_new=done.bytes_stored_new,
        )

    @rpc_errors
    def DownloadPages(
        self, request: agent_pb2.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.PageData]:
        m, nodes = generations.manifest(self.engine, request.job, request.generation)
        yield from pagestream.stream(
            self.engine.repo,
            m,
            [request.member],
            list(request.regions),
            nodes,
            self.engine.opt.max_batch_entries,
        )
