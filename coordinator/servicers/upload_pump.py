"""One UploadPages call between the event loop, which reads its messages as bytes, and
the thread pool, which parses, checks and stores them (`ingest.Inbound`) one list at a
time, in order: what arrived goes to the pool at once past DISPATCH_BYTES, else after
DISPATCH_DELAY_S, and the stream is not read further while QUEUE_BYTES wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import Executor

from coordinator import ingest
from coordinator.uploads import MemberUpload

# An upload's messages go to the pool at once from this many bytes, else after this
# long (unless the end comes first: a small upload is one hop), and its stream is not
# read further while this many bytes wait (the pool, or the store, is slower).
DISPATCH_BYTES = 256 << 10
DISPATCH_DELAY_S = 0.002
QUEUE_BYTES = 32 << 20


class UploadPump:
    """An UploadPages call between the loop, which reads its messages, and the pool,
    which takes them (`ingest.Inbound`) one list at a time, in order. Every message that
    arrived is handed over soon, even if the next one never comes or the stream breaks
    (an agent that dies after its first batch has it stored, as the thread-per-stream
    server did: the chunks are the aborted generation's, gc reclaims them)."""

    def __init__(self, pool: Executor, inbound: ingest.Inbound) -> None:
        self.loop = asyncio.get_running_loop()
        self.pool = pool
        self.inbound = inbound
        self.inbox: list[bytes] = []
        self.queued = 0
        self.work: asyncio.Future[None] | None = None
        self.failed: BaseException | None = None  # what the pool raised (it has failed it)
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False

    def arrived(self, raw: bytes) -> None:
        self.inbox.append(raw)
        self.queued += len(raw)
        if self.queued >= DISPATCH_BYTES:
            self._pump()
        elif self.timer is None:
            self.timer = self.loop.call_later(DISPATCH_DELAY_S, self._pump)

    def _busy(self) -> bool:
        return self.work is not None and not self.work.done()

    def _pump(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self._busy() or not self.inbox or self.failed is not None or self.closed:
            return
        msgs, self.inbox, self.queued = self.inbox, [], 0
        self.work = self.loop.run_in_executor(self.pool, self.inbound.take, msgs)
        self.work.add_done_callback(self._done)

    def _done(self, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled() and (e := fut.exception()) is not None:
            self.failed = e
        self._pump()  # what arrived meanwhile, at once

    async def _settled(self) -> None:
        while self._busy():
            assert self.work is not None
            await asyncio.wait([self.work])  # never cancels the work

    async def room(self) -> None:
        """Wait while too much waits for the pool (it takes it all when it is free)."""
        while self.queued > QUEUE_BYTES and self._busy():
            assert self.work is not None
            await asyncio.wait([self.work])

    async def end(self) -> MemberUpload:
        """The stream ended: the rest and the end in one hop, after the work before."""
        self.closed = True
        await self._settled()
        if self.failed is not None:
            raise self.failed
        msgs, self.inbox, self.queued = self.inbox, [], 0
        try:
            return await self.loop.run_in_executor(self.pool, self.inbound.end, msgs)
        except Exception as e:
            self.failed = e  # the pool has told the generation
            raise

    async def abandon(self, e: BaseException) -> None:
        """The stream broke (or the call was cancelled): what arrived is still stored,
        as if the break had come a moment later (its generation aborts; gc reclaims
        them), then the generation hears of the break."""
        self.close()
        await self._settled()
        msgs, self.inbox, self.queued = self.inbox, [], 0
        if msgs and self.failed is None:
            with contextlib.suppress(Exception):  # bad data: the pool has told it
                await self.loop.run_in_executor(self.pool, self.inbound.take, msgs)
        await self.loop.run_in_executor(self.pool, self.inbound.fail, e)

    def close(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
