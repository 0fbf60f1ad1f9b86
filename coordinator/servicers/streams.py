"""The long-lived and the frequent calls, on grpc.aio: an agent's `Attach`, its uploads
(`MissingChunks`, `UploadPages`: one per member per checkpoint, so thousands at once),
and the `Checkpoint`, `Restore` and `Watch` streams of clients. None of them holds a
thread while it waits for the network.

Each waits on an asyncio.Event that the engine side sets through a *waker*
(`loop.call_soon_threadsafe`), whatever thread queued the message: the agent session's
outbound queue (coordinator/agents.py), a flight's subscription (flight.py) or a Watch
queue (events.py). Work that may block (the store, waiting for an agent's answer) runs
on the server's thread pool (`blocking`); short engine calls under its lock (connect,
an agent's report, disconnect) run on the loop, as the lock is never held long.

The rest of both services (the clients' unary calls, exports, downloads, gc) stays in
the thread-pool servicers (agent_control.py, coordinator_api.py), which grpc.aio runs on
its migration pool; uploads store their batches there too (upload_pump.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from coordinator import agent_events, ingest, members_ops, restore
from coordinator.agents import AgentSession
from coordinator.auth import cert_identity
from coordinator.engine import Engine
from coordinator.flight import CheckpointOptions, Progress, Subscription
from coordinator.generations import summarize
from coordinator.servicers import convert
from coordinator.servicers.coordinator_api import restore_into_events
from coordinator.servicers.upload_pump import UploadPump
from coordinator.servicers.watch import META_SUBSCRIBED, watch_event
from coordinator.serving import Serving
from coordinator.store.catalog import Level
from cpcoord.errors import CoordinatorStopping, CpcoordError, InvalidArgument, NoSuchGeneration
from cpcoord.gen.v1 import agent_pb2, common_pb2, coordinator_pb2
from cpcoord.grpcutil import Malformed, rpc_errors_async
from cpcoord.log import log_event
from cpcoord.ranges import check_name

log = logging.getLogger("cpcoord.coordinator.rpc")
T = TypeVar("T")


def waker(event: asyncio.Event) -> Callable[[], None]:
    """A callable any thread may call to set `event` in its loop (never blocks)."""
    loop = asyncio.get_running_loop()

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(event.set)

    return wake


class Streams:
    # Methods whose requests reach them as bytes, parsed on the pool (aiohandlers.py).
    RAW_REQUESTS = frozenset({"UploadPages"})

    def __init__(self, serving: Serving, pool: Executor) -> None:
        self.serving = serving
        self.pool = pool
        # Work started for a call that may outlive it (the loop keeps weak references).
        self._background: set[asyncio.Future[Any]] = set()

    def _keep(self, fut: asyncio.Future[Any]) -> None:
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)
        fut.add_done_callback(_log_failure)

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the thread pool and await it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args))

    # -- agents -----------------------------------------------------------------------

    @rpc_errors_async
    async def Attach(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.CoordinatorMessage]:
        engine = self.serving.engine()
        it = request_iterator.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            return
        if isinstance(first, Malformed):
            raise first.error()
        if first.WhichOneof("body") != "hello":
            raise InvalidArgument("the first message on a control stream must be a Hello")
        s = engine.connect(first.hello, context.peer())
        wake = asyncio.Event()
        s.waker = waker(wake)
        reader = asyncio.create_task(self._read(engine, s, it), name=f"agent-{s.node}")
        self._keep(asyncio.ensure_future(self.blocking(members_ops.reconcile, engine, s)))
        try:
            while True:
                wake.clear()
                for msg in s.drain():
                    if msg is None:
                        return
                    yield msg
                await wake.wait()
        finally:
            reader.cancel()
            # Whatever ended it (the agent, the network, a violation, the engine closing
            # the session): the engine hears it once (a second call is a no-op).
            engine.disconnect(s, "the stream ended")

    async def _read(self, engine: Engine, s: AgentSession, it: AsyncIterator[Any]) -> None:
        """Take the agent's messages off the stream and hand them, in order, to a handler
        that feeds the engine on the thread pool. Reading and handling are apart so that
        liveness is what *arrives*: a report waiting behind the engine (its lock held by
        a long commit, a slow catalog write) never makes a live agent look silent, and
        never stalls the loop that reads every other agent."""
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._keep(asyncio.ensure_future(self._handle(engine, s, inbox)))
        detail = "the agent ended the stream"
        try:
            async for msg in it:
                s.heard()
                if isinstance(msg, Malformed):
                    detail = f"protocol violation: {msg.error()}"
                    break
                inbox.put_nowait(msg)
                if not s.alive:  # the handler closed it (a protocol violation)
                    break
        except asyncio.CancelledError:
            detail = "the stream ended"
            raise
        except grpc.RpcError:
            detail = "the stream broke"
        except Exception as e:  # a bug here must not leave the node half-attached
            log.exception("agent stream reader failed")
            detail = f"reader failed: {type(e).__name__}"
        finally:
            inbox.put_nowait(None)
            engine.disconnect(s, detail)

    async def _handle(self, engine: Engine, s: AgentSession, inbox: asyncio.Queue[Any]) -> None:
        """Feed what arrived to the engine, in order, a batch per trip to the pool."""
        while True:
            batch = [await inbox.get()]
            while not inbox.empty():
                batch.append(inbox.get_nowait())
            msgs = [m for m in batch if m is not None]
            if msgs and s.alive:
                await self.blocking(_handle_batch, engine, s, msgs)
            if len(msgs) < len(batch):
                return

    @rpc_errors_async
    async def MissingChunks(
        self, request: agent_pb2.MissingChunksRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.MissingChunksResponse:
        engine = self.serving.engine()
        caller = (cert_identity(context) or ("", ""))[1]
        missing = await self.blocking(ingest.missing_chunks, engine, request, caller)
        return agent_pb2.MissingChunksResponse(missing=missing)

    @rpc_errors_async
    async def UploadPages(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> agent_pb2.UploadResponse:
        """The loop only reads: messages arrive as bytes (RAW_REQUESTS) and are parsed,
        checked and stored on the pool (ingest.Inbound), whatever arrived meanwhile in
        one hop, so a member of 20 000 regions never holds the loop that reads every
        agent's heartbeats, and a small upload costs one hop."""
        caller = (cert_identity(context) or ("", ""))[1]  # an agent uploads as itself
        engine = self.serving.engine()
        up = UploadPump(self.pool, ingest.Inbound(engine, caller))
        try:
            async for raw in request_iterator:
                if up.failed is not None:
                    break
                # Pages arriving from a node prove it alive as well as its heartbeats
                # do (docs/decisions.md, "Liveness is what arrives").
                if node := up.inbound.node:
                    engine.heard_from(node)
                up.arrived(raw)
                await up.room()
            done = await up.end()
        except BaseException as e:  # the stream broke, the client left, or bad data
            if e is not up.failed:
                self._keep(asyncio.ensure_future(up.abandon(e)))
            raise
        finally:
            up.close()
        return convert.upload_response(done)

    # -- checkpoint and restore --------------------------------------------------------

    @rpc_errors_async
    async def Checkpoint(
        self, request: coordinator_pb2.CheckpointRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.CheckpointEvent]:
        engine = self.serving.engine()
        opts = CheckpointOptions(
            job=request.job,
            full=request.full,
            lease_ms=request.lease_ms,
            freeze_timeout_ms=request.freeze_timeout_ms,
            commit_timeout_ms=request.commit_timeout_ms,
            pin=request.pin,
            precopy=not request.no_precopy,
        )
        sub = await self._begin(engine, engine.checkpoint, opts, "Checkpoint")
        async for p in self._follow(engine, sub, "Checkpoint"):
            ev = convert.checkpoint_event(p)
            pre = sub.flight.precopy.get(p.event.member) if p.event.member else None
            if pre is not None and ev.HasField("stats"):
                ev.stats.precopy_rounds = pre.precopy_rounds
                ev.stats.precopy_bytes.extend(pre.precopy_bytes)
                ev.stats.precopy_frozen_pages = pre.precopy_frozen_pages
            if _waits_for_drain(ev, request.wait):
                local = coordinator_pb2.CheckpointEvent()
                local.CopyFrom(ev)
                local.kind = common_pb2.PROGRESS_KIND_COMMITTED_LOCAL
                yield local
                want = Level.PARTNER if request.wait == _PARTNER else Level.STORE
                ev = await self._until_level(engine, ev, want)
            yield ev

    async def _until_level(
        self, engine: Engine, ev: coordinator_pb2.CheckpointEvent, want: Level
    ) -> coordinator_pb2.CheckpointEvent:
        """The COMMITTED event again once the generation reached `want` or above (its
        level rose: docs/multilevel.md), or as it was if the generation was deleted."""
        delay = 0.05
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            try:
                info = await self.blocking(engine.repo.catalog.get, ev.job, ev.generation)
            except NoSuchGeneration:
                return ev
            lost = engine.repo.cached.lost.get((ev.job, ev.generation))
            if lost is not None:  # it can never reach the store: say why and end
                out = coordinator_pb2.CheckpointEvent()
                out.CopyFrom(ev)
                out.detail = f"generation {ev.generation} never reaches the {want}: {lost}"
                return out
            if info.level.rank >= want.rank:
                s = await self.blocking(
                    summarize, engine, ev.job, ev.generation, "", None, None, info
                )
                out = coordinator_pb2.CheckpointEvent()
                out.CopyFrom(ev)
                out.info.CopyFrom(convert.generation_info(s))
                out.info.data_paths.update(dict(ev.info.data_paths))
                return out

    @rpc_errors_async
    async def Restore(
        self, request: coordinator_pb2.RestoreRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.RestoreEvent]:
        engine = self.serving.engine()
        if request.HasField("into"):  # one command to one agent, answered once
            for ev in await self.blocking(restore_into_events, engine, request):
                yield ev
            return
        opts = restore.RestoreOptions(
            job=request.job,
            generation=request.generation,
            members=tuple(request.members),
            lease_ms=request.lease_ms,
            freeze_timeout_ms=request.freeze_timeout_ms,
            force=request.force,
        )
        sub = await self._begin(engine, engine.restore_in_place, opts, "Restore")
        async for p in self._follow(engine, sub, "Restore"):
            yield convert.restore_event(p)

    async def _begin(
        self, engine: Engine, start: Callable[[Any], Subscription], opts: Any, what: str
    ) -> Subscription:
        """Begin a flight on the pool; a client gone meanwhile cancels it once begun."""
        fut = asyncio.ensure_future(self.blocking(start, opts))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:

            def begun(f: asyncio.Future[Subscription]) -> None:
                if not f.cancelled() and f.exception() is None:
                    engine.cancel(f.result().flight, f"the client cancelled the {what} call")

            fut.add_done_callback(begun)
            self._keep(fut)
            raise

    async def _follow(
        self, engine: Engine, sub: Subscription, what: str
    ) -> AsyncIterator[Progress]:
        """A flight's progress until its final event; the client going away (the task is
        cancelled) cancels the flight unless the store is already committing it."""
        wake = asyncio.Event()
        sub.waker = waker(wake)
        try:
            while True:
                wake.clear()
                while (p := sub.get(timeout=0)) is not None:
                    yield p
                    if p.summary is not None:
                        return
                await wake.wait()
        finally:
            sub.waker = None
            if not sub.done:
                engine.cancel(sub.flight, f"the client cancelled the {what} call")

    # -- watch ------------------------------------------------------------------------

    @rpc_errors_async
    async def Watch(
        self, request: coordinator_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.WatchEvent]:
        engine = self.serving.engine()
        for job in request.jobs:
            check_name(job)
        w = engine.events.subscribe(request.jobs, request.include_progress)
        wake = asyncio.Event()
        w.waker = waker(wake)
        try:
            # Headers now tell the client it is subscribed (Client.watch waits for them).
            await context.send_initial_metadata(((META_SUBSCRIBED, "1"),))
            while not w.closed:
                wake.clear()
                while (ev := w.get(timeout=0)) is not None:
                    yield watch_event(ev)
                if w.closed:
                    break
                await wake.wait()  # an event, or the bus closing, sets it
            raise CoordinatorStopping("the Watch stream ends")
        finally:
            w.close()
            if w.lost_total:  # a dashboard too slow for the event rate: worth knowing
                log_event(
                    log, logging.INFO, "watch lost events", lost=w.lost_total, peer=context.peer()
                )


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("background work of a call failed", exc_info=fut.exception())


def _handle_batch(engine: Engine, s: AgentSession, msgs: list[agent_pb2.AgentMessage]) -> None:
    for msg in msgs:
        if not s.alive:
            return  # the session is over: drop the rest
        try:
            agent_events.handle(engine, s, msg)
        except CpcoordError as e:
            log_event(log, logging.WARNING, "closing agent stream", node=s.node, why=str(e))
            engine.disconnect(s, f"protocol violation: {e}")
            return
        except Exception as e:  # a bug here must not leave the node half-attached
            log.exception("agent message handler failed")
            engine.disconnect(s, f"handler failed: {type(e).__name__}")
            return


_PARTNER = common_pb2.DURABILITY_LEVEL_PARTNER


def _waits_for_drain(ev: coordinator_pb2.CheckpointEvent, wait: int) -> bool:
    """A generation committed at `local` by a request that waits for more (STORE, or
    UNSPECIFIED: the meaning of a checkpoint before levels)."""
    return (
        ev.kind == common_pb2.PROGRESS_KIND_COMMITTED
        and ev.info.level == common_pb2.DURABILITY_LEVEL_LOCAL
        and wait != common_pb2.DURABILITY_LEVEL_LOCAL
    )
