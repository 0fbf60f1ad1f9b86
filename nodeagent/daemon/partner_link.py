"""The agent's partner copies, both ways (docs/multilevel.md, "Partner copies"): the
listener that holds other nodes' packs (`--partner-listen`, nodeagent/daemon/
partner_server.py over nodeagent/cache/partner.py) and the sender of this node's cached
packs to the partner the coordinator names (nodeagent/daemon/partner_send.py). An agent
without a cache does neither; without `--partner-listen` it sends but holds nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cpcoord.gen.v1 import agent_pb2
from nodeagent.cache.partner import CacheView, PartnerStore
from nodeagent.cache.store import NodeCache
from nodeagent.daemon.agent_session import AgentConfig
from nodeagent.daemon.partner_send import PartnerSender
from nodeagent.daemon.partner_server import PartnerServer, PartnerServicer
from storecore.crypt import Sealer


class PartnerLink:
    def __init__(
        self,
        config: AgentConfig,
        cache: NodeCache | None,
        send: Callable[[agent_pb2.AgentMessage], bool],
        sealer: Callable[[], Sealer | None],
    ) -> None:
        self.store: PartnerStore | None = None
        self.server: PartnerServer | None = None
        self.sender: PartnerSender | None = None
        self.servicer: PartnerServicer | None = None
        if cache is None:
            return
        self.sender = PartnerSender(config.node, cache, config.tls)
        if config.partner_listen:
            self.store = store = PartnerStore(cache.root, lambda: cache.bytes, cache.size)
            cache.reader = CacheView(cache.backend, self.store)
            cache.others = lambda: store.held_bytes

            def report(p: agent_pb2.Partnered) -> None:
                send(agent_pb2.AgentMessage(partnered=p))

            servicer = PartnerServicer(self.store, sealer, report, config.tls is not None)
            self.servicer = servicer
            self.server = PartnerServer(config.partner_listen, servicer, config.tls)

    @property
    def address(self) -> str:
        """Where the listener is (Hello.partner_address); "" without one."""
        return self.server.address if self.server is not None else ""

    def stats(self) -> tuple[int, int, int] | None:
        """(bytes held for others, bytes sent to the partner, generations refused full)."""
        if self.sender is None:
            return None
        held = self.store.held_bytes if self.store is not None else 0
        return held, self.sender.sent_bytes, self.sender.full

    def start(self) -> None:
        if self.server is not None:
            self.server.start()
        if self.sender is not None:
            self.sender.start()

    def stop(self) -> None:
        if self.sender is not None:
            self.sender.stop()
        if self.server is not None:
            self.server.stop()

    def changed(self, pc: agent_pb2.PartnerChanged) -> None:
        if self.servicer is not None:
            self.servicer.allowed = frozenset(pc.senders)
        if self.sender is not None:
            self.sender.set_partner(pc)

    def release(self, names: Sequence[str]) -> None:
        """Copies of packs now in the store: delete them (they count against the cache)."""
        if self.store is not None:
            for n in names:
                self.store.delete(n)

    def committed(self, job: str, generation: int, names: Sequence[str]) -> None:
        if self.sender is not None:
            self.sender.want(job, generation, names)
