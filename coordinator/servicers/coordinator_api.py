"""`cpcoord.v1.Coordinator`: the clients' API, a thin adapter over the engine.

Each method validates nothing itself beyond message shape: the engine modules check and
raise CpcoordErrors, which `rpc_errors` turns into statuses. These run on the server's
thread pool; the calls that mostly wait (Checkpoint, Restore, Watch) are coroutines in
coordinator/servicers/streams.py and hold no thread. Diff compares two manifests
(coordinator/diff.py); `restore_into_events` is Restore's RestoreInto, one command.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from coordinator import (
    cacheread,
    diff,
    generations,
    members_ops,
    nodeloss,
    pagestream,
    restore,
)
from coordinator.dataplane import announcement
from coordinator.engine import Engine
from coordinator.servicers import convert, watch
from coordinator.store import GcReport
from cpcoord.errors import DataPathUnavailable, InvalidArgument, UnknownJob
from cpcoord.gen.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, types_pb2
from cpcoord.grpcutil import rpc_errors
from cpcoord.ranges import check_name

DIFF_RUNS_PER_MESSAGE = 65536


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- jobs, members, agents -------------------------------------------------------

    def _job_info(self, job: str) -> coordinator_pb2.JobInfo:
        e = self.engine
        with e.lock:
            recs = e.members.of_job(job)
            members = [convert.member_info(r, *members_ops.health(e, r)) for r in recs]
            f = e.flights.get(job)
            in_flight = f.number if f is not None else 0
        gens = e.repo.generations(job)
        out = coordinator_pb2.JobInfo(
            name=job, members=members, in_flight=in_flight, generations=len(gens)
        )
        if gens:
            out.last_committed.CopyFrom(
                convert.generation_info(
                    generations.summarize(e, job, gens[-1].number, info=gens[-1])
                )
            )
        return out

    @rpc_errors
    def ListJobs(
        self, request: coordinator_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ListJobsResponse:
        e = self.engine
        with e.lock:
            names = sorted(set(e.members.jobs()) | set(e.repo.catalog.jobs()))
        if request.job:
            check_name(request.job)
            if request.job not in names:
                raise UnknownJob(request.job)
            names = [request.job]
        return coordinator_pb2.ListJobsResponse(jobs=[self._job_info(n) for n in names])

    @rpc_errors
    def ListAgents(
        self, request: coordinator_pb2.ListAgentsRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ListAgentsResponse:
        e = self.engine
        out = []
        with e.lock:
            for rec in e.agents.records():
                s, h = rec.session, rec.session.hello
                out.append(
                    coordinator_pb2.AgentInfo(
                        node=s.node,
                        version=h.version,
                        capabilities=h.capabilities,
                        trackers=h.trackers,
                        connected=s.alive and not rec.disconnected_ms,
                        connected_unix_ms=rec.disconnected_ms or s.connected_ms,
                        members=len(e.members.on_node(s.node)),
                        peer=s.peer,
                    )
                )
        return coordinator_pb2.ListAgentsResponse(agents=out)

    @rpc_errors
    def AttachMember(
        self, request: coordinator_pb2.AttachMemberRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.AttachMemberResponse:
        req = members_ops.AttachRequest(
            job=request.job,
            member=request.member,
            pid=request.process.pid,
            start_time=request.process.start_time,
            node=request.node,
            regions=[(r.name, r.start, r.end) for r in request.regions],
            tracker=request.tracker,
            tree=request.tree,
        )
        rec, seen = members_ops.attach(self.engine, req)
        regions = [
            types_pb2.Region(name=r.name, start=r.start, end=r.end) for r in seen.regions
        ] or None
        with self.engine.lock:
            health = members_ops.health(self.engine, rec)
        return coordinator_pb2.AttachMemberResponse(
            member=convert.member_info(rec, *health, regions=regions)
        )

    @rpc_errors
    def DetachMember(
        self, request: coordinator_pb2.DetachMemberRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.DetachMemberResponse:
        members_ops.detach(self.engine, request.job, request.member)
        return coordinator_pb2.DetachMemberResponse()

    # -- checkpoint ------------------------------------------------------------------

    # -- generations -----------------------------------------------------------------

    @rpc_errors
    def ListGenerations(
        self, request: coordinator_pb2.ListGenerationsRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ListGenerationsResponse:
        rows = generations.list_generations(
            self.engine, request.job, request.include_aborted, request.limit
        )
        return coordinator_pb2.ListGenerationsResponse(
            generations=[convert.generation_info(s) for s in rows]
        )

    @rpc_errors
    def GetGeneration(
        self, request: coordinator_pb2.GetGenerationRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.GetGenerationResponse:
        d = generations.get_generation(self.engine, request.job, request.generation)
        members = []
        for mm in d.manifest.members:
            regions = [
                types_pb2.Region(
                    name=r.name, start=r.start, end=r.end, all_pages=pagestream.region_runs(r.pages)
                )
                for r in mm.regions
            ]
            pages = sum(r.pages.page_count for r in mm.regions)
            zero = sum(r.pages.zero_pages for r in mm.regions)
            members.append(
                coordinator_pb2.MemberGeneration(
                    member=mm.name,
                    node=d.nodes.get(mm.name, ""),
                    regions=regions,
                    stats=common_pb2.MemberStats(
                        pages=pages, zero_pages=zero, bytes_logical=pages * d.manifest.page_size
                    ),
                    threads=len(mm.threads),
                )
            )
        return coordinator_pb2.GetGenerationResponse(
            info=convert.generation_info(d.summary), members=members
        )

    @rpc_errors
    def DeleteGeneration(
        self, request: coordinator_pb2.DeleteGenerationRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.DeleteGenerationResponse:
        generations.delete_generation(self.engine, request.job, request.generation, request.force)
        return coordinator_pb2.DeleteGenerationResponse()

    @rpc_errors
    def PinGeneration(
        self, request: coordinator_pb2.PinGenerationRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.PinGenerationResponse:
        s = generations.pin(self.engine, request.job, request.generation, request.pinned)
        return coordinator_pb2.PinGenerationResponse(info=convert.generation_info(s))

    @rpc_errors
    def ReadGeneration(
        self, request: coordinator_pb2.ReadGenerationRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.PageData]:
        m, nodes = generations.manifest(self.engine, request.job, request.generation)
        for name in request.members:
            check_name(name)
        if request.chunk_locations and not self.engine.opt.direct_data_path:
            raise DataPathUnavailable("(export)", "the coordinator offers no direct data path")
        # Export reads count like restore reads, under node "export".
        dp = self.engine.dataplane
        yield from pagestream.stream(
            self.engine.repo,
            m,
            list(request.members),
            list(request.regions),
            nodes,
            self.engine.opt.max_batch_entries,
            locate=request.chunk_locations,
            record=lambda sent, located: dp.record_read("export", sent, located),
            relay=cacheread.Relay(self.engine),
        )

    @rpc_errors
    def ForgetNode(
        self, request: coordinator_pb2.ForgetNodeRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ForgetNodeResponse:
        check_name(request.node)
        lost, packs = nodeloss.forget(self.engine, request.node)
        with self.engine.lock:
            members = [f"{m.job}/{m.name}" for m in self.engine.members.on_node(request.node)]
        return coordinator_pb2.ForgetNodeResponse(
            lost=[convert.generation_info(s) for s in lost], packs=packs, members=members
        )

    # -- store upkeep ----------------------------------------------------------------

    @rpc_errors
    def GarbageCollect(
        self, request: coordinator_pb2.GarbageCollectRequest, context: grpc.ServicerContext
    ) -> Iterator[coordinator_pb2.GarbageCollectEvent]:
        yield coordinator_pb2.GarbageCollectEvent(phase="retention")
        r: GcReport = generations.gc(self.engine, request.keep, request.dry_run)
        yield watch.gc_event(r)

    @rpc_errors
    def Verify(
        self, request: coordinator_pb2.VerifyRequest, context: grpc.ServicerContext
    ) -> Iterator[coordinator_pb2.VerifyEvent]:
        r = generations.verify(self.engine, request.job, request.generation)
        yield coordinator_pb2.VerifyEvent(
            chunks_checked=r.chunks,
            chunks_total=r.chunks,
            bytes_read=r.bytes_read,
            damage=[
                coordinator_pb2.Damage(
                    job=d.job,
                    generation=d.generation,
                    member=d.member,
                    chunks=d.chunks,
                    first_chunk=d.first_chunk,
                    why=d.why,
                )
                for d in r.damage
            ],
            final=True,
            generations=r.generations,
            damaged_packs=[f"{name}: {why}" for name, why in r.damaged_packs],
            ok=not r.damage and not r.damaged_packs,
        )

    @rpc_errors
    def StoreStats(
        self, request: coordinator_pb2.StoreStatsRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.StoreStatsResponse:
        out = convert.store_stats(generations.stats(self.engine))
        if self.engine.opt.direct_data_path:  # where clients may read packs themselves
            a = announcement(self.engine.repo, send_key=False)
            out.store_location = str(a["store_location"])
            out.store_id = str(a["store_id"])
            out.store_encrypted = bool(a["store_encrypted"])
        return out

    @rpc_errors
    def Diff(
        self, request: coordinator_pb2.DiffRequest, context: grpc.ServicerContext
    ) -> Iterator[coordinator_pb2.DiffResponse]:
        if request.from_generation < 1 or request.to_generation < 1:
            raise InvalidArgument("diff needs two committed generations, each >= 1")
        for name in request.members:
            check_name(name)
        a, _ = generations.manifest(self.engine, request.job, request.from_generation)
        b, _ = generations.manifest(self.engine, request.job, request.to_generation)
        ps = b.page_size
        for d in diff.diff(a, b, list(request.members)):
            # A region with very many runs spans several messages (proto: runs continue).
            for lo in range(0, max(1, len(d.runs)), DIFF_RUNS_PER_MESSAGE):
                runs = d.runs[lo : lo + DIFF_RUNS_PER_MESSAGE]
                n = int(runs[:, 1].sum()) if len(runs) else 0
                yield coordinator_pb2.DiffResponse(
                    member=d.member,
                    region=d.region,
                    added=d.added,
                    removed=d.removed,
                    changed=[types_pb2.PageRun(offset=o, count=c) for o, c in runs.tolist()],
                    pages_changed=n,
                    bytes_changed=n * ps,
                )


def restore_into_events(
    engine: Engine, request: coordinator_pb2.RestoreRequest
) -> list[coordinator_pb2.RestoreEvent]:
    """Restore(into): one command to the member's agent (blocks until it answers), as
    the two events of the stream."""
    t = request.into
    n, stats = restore.into(
        engine,
        restore.IntoOptions(
            job=request.job,
            generation=request.generation,
            member=t.member,
            pid=t.process.pid,
            start_time=t.process.start_time,
            node=t.node,
            regions=tuple((r.name, r.start, r.end) for r in t.regions),
        ),
    )
    return [
        coordinator_pb2.RestoreEvent(
            kind="PROGRESS_KIND_MEMBER_RESTORED",
            job=request.job,
            generation=n,
            node=t.node,
            member=t.member,
            stats=stats,
            members_done=1,
            members_total=1,
        ),
        coordinator_pb2.RestoreEvent(
            kind="PROGRESS_KIND_COMMITTED",
            job=request.job,
            generation=n,
            members_done=1,
            members_total=1,
        ),
    ]
