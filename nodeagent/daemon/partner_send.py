"""Copies of this node's cached packs to its partner (docs/multilevel.md, "Partner copies";
the listener that takes them is nodeagent/daemon/partner_server.py).

One thread (nodeagent/cache/worklist.py). The coordinator names the partner
(Welcome.partner, PartnerChanged) and, with it, what this node owes it: its undrained
cached packs without a checked copy on another node, oldest generation first (the
authority, as Welcome.drain is for the drain). A generation this agent sees commit with
cached packs is added (`want`). Per generation: `Lacks` asks which packs the partner
does not hold, `Put` sends those whole (named as in the cache: the coordinator's records
name them), and the partner reports the copies itself. A failure is retried after the
others; a partner whose cache is full is warned about once per generation and counted
(`full`): the generation stays `local` and drains as usual, never a failed checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from cpcoord import grpcopts, grpcutil
from cpcoord.gen.v1 import agent_pb2, agent_pb2_grpc
from cpcoord.tls import TlsFiles, agent_server_name
from nodeagent.cache.store import GenKey, NodeCache, mapped_cached
from nodeagent.cache.worklist import Worklist

log = logging.getLogger(__name__)
PIECE_BYTES = 4 << 20  # fewer messages through gRPC Python; well under any message limit
CALL_TIMEOUT_S = 300.0


class PartnerSender(Worklist[tuple[str, str]]):
    """The copy thread (module docstring); its target is the partner (node, address)."""

    def __init__(self, node: str, cache: NodeCache, tls: TlsFiles | None) -> None:
        super().__init__("partner-send")
        self.node = node
        self.cache = cache
        self.tls = tls
        self.full = 0  # generations a partner's full cache refused
        self.sent_bytes = 0
        self._channel: tuple[str, grpc.Channel] | None = None

    @property
    def partner(self) -> tuple[str, str] | None:
        return self.target

    def stop(self) -> None:
        super().stop()
        self._close()

    def set_partner(self, pc: agent_pb2.PartnerChanged) -> None:
        """The coordinator's word: the partner now and exactly what it is owed."""
        with self._cond:  # one step: never the new partner with the old list
            self.set_target((pc.node, pc.address) if pc.node and pc.address else None)
            self.replace((i.job, i.generation, i.packs) for i in pc.owed)
        log.info("partner", extra={"fields": {
            "partner": pc.node or "none", "owed_generations": len(pc.owed)}})  # fmt: skip

    def work(self, k: GenKey, names: list[str], target: tuple[str, str]) -> bool:
        return self._send(k, names, target)

    def _stub(self, node: str, address: str) -> agent_pb2_grpc.PartnerCacheStub:
        if self._channel is None or self._channel[0] != address:
            self._close()
            ch = grpcopts.make_channel(
                address, tls=self.tls, server_name=agent_server_name(node) if self.tls else None
            )
            self._channel = (address, ch)
        return agent_pb2_grpc.PartnerCacheStub(self._channel[1])

    def _close(self) -> None:
        if self._channel is not None:
            self._channel[1].close()
            self._channel = None

    def _send(self, k: GenKey, names: list[str], partner: tuple[str, str]) -> bool:
        """One generation to the partner; True when it is done with (sent, or refused
        for good)."""
        node, address = partner
        have = [n for n in names if self.cache.has(n)]
        if not have:
            return True  # nothing left here to copy (drained and evicted, or lost)
        try:
            stub = self._stub(node, address)
            lacks = stub.Lacks(
                agent_pb2.LacksRequest(sender=self.node, packs=have), timeout=CALL_TIMEOUT_S
            ).packs
            stub.Put(self._stream(k, have, list(lacks)), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as e:
            err = grpcutil.rpc_to_error(e, "partner Put", address)
            if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.full += 1
                log.warning("partner cache full: the generation stays local", extra={
                    "fields": {"partner": node, "job": k[0], "generation": k[1],
                               "error": str(err)}})  # fmt: skip
                return True
            log.warning("partner copy failed", extra={"fields": {
                "partner": node, "job": k[0], "generation": k[1], "error": str(err)}})  # fmt: skip
            return False
        except Exception as e:  # a pack the cache lost meanwhile: the next list says
            log.warning("partner copy failed", extra={"fields": {
                "partner": node, "job": k[0], "generation": k[1], "error": str(e)}})  # fmt: skip
            return False
        log.info("partner copies sent", extra={"fields": {
            "partner": node, "job": k[0], "generation": k[1], "packs": len(lacks)}})  # fmt: skip
        return True

    def _stream(
        self, k: GenKey, names: list[str], lacks: list[str]
    ) -> Iterator[agent_pb2.PartnerPut]:
        yield agent_pb2.PartnerPut(generation=agent_pb2.PartnerGeneration(
            sender=self.node, job=k[0], generation=k[1], packs=names))  # fmt: skip
        for name in lacks:
            # Pieces are cut from the cached file's mapping: reading the pack whole first
            # put every byte into fresh pages once more (zeroed by the kernel, the largest
            # single cost of a partner copy in perf).
            with mapped_cached(self.cache, name) as view:
                n = view.nbytes
                yield agent_pb2.PartnerPut(pack=agent_pb2.PartnerPack(name=name, size=n))
                for lo in range(0, n, PIECE_BYTES):
                    yield agent_pb2.PartnerPut(data=bytes(view[lo : lo + PIECE_BYTES]))
            self.sent_bytes += n
