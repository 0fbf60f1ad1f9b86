"""The drain: cached packs of committed generations go to the store in the background,
oldest generation first, rate-limited, and are reported (docs/multilevel.md).

One thread (nodeagent/cache/worklist.py). Work comes from two places: a generation this
agent saw commit with cached packs (`want`, after Committed), and the coordinator's list
of what this node still owes the store (`Welcome.drain`, at every (re)connect: the
authority, so a coordinator or agent restart resumes where it stopped). Per generation:
each pack is read from the cache, put into the store under the same name (atomic and
durable there), then one Drained report goes on the control stream and the thread waits
for the DrainResult. Packs the cache no longer has are reported `missing`. A refused
report is logged and not retried until the next Welcome names the generation again.

Rate: a token bucket of `rate` bytes/s (0: unlimited) with one second of burst, so the
drain leaves the node's links to the application.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from cpcoord.errors import CpcoordError
from cpcoord.gen.v1 import agent_pb2
from nodeagent.cache.store import GenKey, NodeCache
from nodeagent.cache.worklist import Worklist
from storecore import packs
from storecore.backend import Backend, Kind

log = logging.getLogger(__name__)
RESULT_TIMEOUT_S = 120.0


class Bucket:
    """Token bucket: `take(n)` sleeps until n bytes may go at `rate` bytes/s."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.tokens = rate
        self.at = clock()

    def delay(self, n: int) -> float:
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= n
        return max(0.0, -self.tokens / self.rate)


class Drainer(Worklist[Backend]):
    """The drain thread (module docstring); its target is the store (None while the
    agent has no direct data path or no control stream)."""

    def __init__(
        self, cache: NodeCache, rate: float, send: Callable[[agent_pb2.AgentMessage], bool],
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:  # fmt: skip
        super().__init__("cache-drain")
        self.cache = cache
        self.bucket = Bucket(rate)
        self.send = send
        self.on_bytes = on_bytes
        self._results: dict[GenKey, agent_pb2.DrainResult] = {}
        self._streams = 0  # set_store calls: a new or broken stream ends a wait for a result
        self.drained_bytes = 0

    @property
    def store(self) -> Backend | None:
        return self.target

    def set_store(self, store: Backend | None) -> None:
        with self._cond:
            self._streams += 1
        self.set_target(store)

    def want(self, job: str, generation: int, names: Sequence[str]) -> None:
        if not names:
            return
        with self._cond:  # merged: a holder's taken-over packs join its own
            cur = self._todo.setdefault((job, generation), [])
            cur.extend(n for n in names if n not in cur)
            self._cond.notify_all()

    def welcome(self, items: Sequence[agent_pb2.DrainItem]) -> None:
        """The coordinator's list: exactly what this node owes, oldest first."""
        self.replace((i.job, i.generation, i.packs) for i in items)

    def result(self, r: agent_pb2.DrainResult) -> None:
        with self._cond:
            self._results[(r.job, r.generation)] = r
            self._cond.notify_all()

    def work(self, k: GenKey, names: list[str], target: Backend) -> bool:
        """Done with the generation unless a store error says: try again later."""
        try:
            return self._drain(k, names, target) is not None
        except CpcoordError as e:
            log.warning("drain failed", extra={"fields": {
                "job": k[0], "generation": k[1], "error": str(e)}})  # fmt: skip
            return False

    def _drain(self, k: GenKey, names: list[str], store: Backend) -> bool | None:
        msg = agent_pb2.Drained(job=k[0], generation=k[1])
        view = self.cache.reader  # the cache, and partner copies of owners that lost them
        for name in names:
            if not self.cache.has(name) and not view.exists(Kind.PACKS, name):
                msg.missing.append(name)
                continue
            # Mapped, not read: a store on disk writes the cache's pages with O_DIRECT
            # as they lie (storecore/directio.py), no copy in between.
            with view.mapped(Kind.PACKS, name) as data:
                size = len(data)
                wait = self.bucket.delay(size)
                if wait:
                    time.sleep(wait)
                store.put(Kind.PACKS, name, data)
                contents = packs.trailer_of(data, name)
            ids = np.ascontiguousarray(contents.entries["id"]).tobytes()
            msg.packs.add(name=name, size=size, ids=ids)
            self.drained_bytes += size
            if self.on_bytes is not None:
                self.on_bytes(size)
        with self._cond:
            self._results.pop(k, None)
            stream = self._streams
        if not self.send(agent_pb2.AgentMessage(drained=msg)):
            return None  # no stream: the next Welcome says what is still owed
        with self._cond:  # the answer, or the stream's end (the next Welcome re-asks)
            self._cond.wait_for(
                lambda: k in self._results or self._stop or self._streams != stream,
                RESULT_TIMEOUT_S,
            )
            r = self._results.pop(k, None)
        if r is None:
            return None
        if not r.ok:
            log.warning("drain refused", extra={"fields": {
                "job": k[0], "generation": k[1], "detail": r.detail}})  # fmt: skip
            return False
        self.cache.drained(k[0], k[1], [p.name for p in msg.packs if self.cache.has(p.name)])
        log.info("generation drained", extra={"fields": {
            "job": k[0], "generation": k[1], "packs": len(msg.packs)}})  # fmt: skip
        return True
