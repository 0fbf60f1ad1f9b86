"""The partner listener (`cpcoord agent --partner-listen HOST:PORT`): the one service an
agent serves, `PartnerCache`, through which other agents put copies of their cached
packs here (docs/multilevel.md, "Partner copies"; the store is nodeagent/cache/partner.py,
the sending side nodeagent/daemon/partner_send.py).

mTLS with the agent's own certificate when the agent has TLS configured (the caller's
certificate must name the sender: PartnerIdentityMismatch otherwise), plaintext in the
agent's insecure mode. Each Put carries one generation's packs; every pack is checked in
full and written durably before anything is said, and then this node (the holder)
reports `Partnered` on its own control stream: only the node that holds a copy can say
it does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc

from cpcoord import grpcopts, grpcutil
from cpcoord.errors import InvalidArgument, PartnerIdentityMismatch, PartnerNotAllowed
from cpcoord.gen.v1 import agent_pb2, agent_pb2_grpc
from cpcoord.tls import TlsFiles, peer_agent, server_credentials
from nodeagent.cache.partner import PartnerStore, check_pack_name
from storecore.crypt import Sealer

log = logging.getLogger(__name__)
MAX_PACK_BYTES = 1 << 30  # a pack bigger than any --pack-size the store allows


class PartnerServicer(agent_pb2_grpc.PartnerCacheServicer):
    def __init__(
        self,
        store: PartnerStore,
        sealer: Callable[[], Sealer | None],
        report: Callable[[agent_pb2.Partnered], None],
        tls: bool,
    ) -> None:
        self.store = store
        self.sealer = sealer
        self.report = report
        self.tls = tls
        # The senders the coordinator names (PartnerChanged.senders); none until told.
        self.allowed: frozenset[str] = frozenset()

    def _check_peer(self, context: grpc.ServicerContext, sender: str) -> None:
        if sender not in self.allowed:
            raise PartnerNotAllowed(sender)
        if not self.tls:
            return  # the insecure test mode, as for the rest of the agent
        peer = peer_agent(context)
        if peer != sender:
            raise PartnerIdentityMismatch(peer or "", sender)

    @grpcutil.rpc_errors
    def Lacks(
        self, request: agent_pb2.LacksRequest, context: grpc.ServicerContext
    ) -> agent_pb2.LacksResponse:
        self._check_peer(context, request.sender)
        return agent_pb2.LacksResponse(packs=self.store.lacks(request.sender, request.packs))

    @grpcutil.rpc_errors
    def Put(
        self, request_iterator: Iterator[agent_pb2.PartnerPut], context: grpc.ServicerContext
    ) -> agent_pb2.PartnerPutResponse:
        it = iter(request_iterator)
        first = next(it, None)
        if first is None or first.WhichOneof("body") != "generation":
            raise InvalidArgument("Put: the first message must be a PartnerGeneration")
        g = first.generation
        self._check_peer(context, g.sender)
        for name in g.packs:
            check_pack_name(g.sender, name)
        want = set(g.packs)
        # A pack's pieces are copied into one buffer, reused for the call's packs (a
        # bytearray grown piece by piece was reallocated and copied again and again,
        # and fresh pages are zeroed by the kernel first); the check and the write read
        # it in place, and the write returns before the next pack's pieces arrive.
        name, size, got, room = "", 0, 0, bytearray()
        buf = memoryview(room)
        for msg in it:
            body = msg.WhichOneof("body")
            if body == "pack":
                if name:
                    raise InvalidArgument(f"Put: pack {name} ended after {got} bytes")
                name, size = msg.pack.name, msg.pack.size
                if name not in want or not 0 < size <= MAX_PACK_BYTES:
                    raise InvalidArgument(f"Put: pack {name!r} of {size} bytes not expected")
                if size > len(room):
                    room = bytearray(size)
                got, buf = 0, memoryview(room)[:size]
            elif body == "data":
                piece = msg.data
                if not name or got + len(piece) > size:
                    raise InvalidArgument("Put: bytes outside a pack")
                buf[got : got + len(piece)] = piece
                got += len(piece)
            else:
                raise InvalidArgument("Put: a second PartnerGeneration")
            if name and got == size:
                self.store.put(g.sender, name, buf, self.sealer())
                name, got = "", 0
        if name:
            raise InvalidArgument(f"Put: pack {name} ended after {got} bytes")
        held = [n for n in g.packs if self.store.has(n)]
        if held:
            self.report(
                agent_pb2.Partnered(sender=g.sender, job=g.job, generation=g.generation, packs=held)
            )
            log.info("partner copies held", extra={"fields": {
                "sender": g.sender, "job": g.job, "generation": g.generation,
                "packs": len(held)}})  # fmt: skip
        return agent_pb2.PartnerPutResponse(packs=held)


class PartnerServer:
    """The gRPC server of the partner listener; `address` is where it listens (port 0
    bound to a free port)."""

    def __init__(self, listen: str, servicer: PartnerServicer, tls: TlsFiles | None) -> None:
        self.server = grpc.server(
            futures.ThreadPoolExecutor(4, thread_name_prefix="partner"),
            options=grpcopts.server_options(),
        )
        add = agent_pb2_grpc.add_PartnerCacheServicer_to_server
        grpcutil.add_servicer(add, servicer, self.server)
        host = listen.rpartition(":")[0]
        if tls is not None:
            port = self.server.add_secure_port(listen, server_credentials(tls))
        else:
            port = self.server.add_insecure_port(listen)
        if not port:
            raise InvalidArgument(f"--partner-listen: cannot listen on {listen}")
        self.address = f"{host}:{port}"

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=1.0).wait(5)
