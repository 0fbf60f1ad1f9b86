"""`cpcoord.api.Client`: the scheduler's typed client of the `cpcoord.v1.Coordinator`
service (docs/api.md), the same operations the `cpcoord` command uses.

    from cpcoord.api import Client

    with Client("coord:7070", tls_cert=..., tls_key=..., tls_ca=..., token=...) as c:
        c.attach("train", "rank-0", pid=4242, node="node-a")
        gen = c.checkpoint("train")              # blocks; raises GenerationAborted
        for ev in c.checkpoint_events("train"):  # or follow the steps
            print(ev.kind, ev.member)

Connection options match the CLI's (`--coordinator`, `--tls-*`, `--token[-file]`,
`--insecure`, `--timeout`) with the same environment fallbacks ($CPCOORD_COORDINATOR,
$CPCOORD_TLS_CERT/_KEY/_CA, $CPCOORD_TOKEN); the channel is cpcoord/clientconn.py's.
Every failure is a `cpcoord.errors.CpcoordError` of the class the coordinator raised
(converted in cpcoord/grpcutil.py only). Unary calls have a deadline (`timeout`);
streams have none: the coordinator's protocol deadlines bound them, and a watch runs
until closed. Results are frozen dataclasses (cpcoord/api/values.py).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cpcoord import clientconn, readpath
from cpcoord.api import convert, export, results
from cpcoord.api import values as v
from cpcoord.api.watch import Watch
from cpcoord.closing import Closing
from cpcoord.gen.v1 import coordinator_pb2, types_pb2

RegionSpec = tuple[str, int, int]  # (name, start, end); name may be "" for "r0", "r1", ...
OnEvent = Callable[[v.ProgressEvent], None]

log = logging.getLogger("cpcoord.api")


class Client(Closing):
    def __init__(
        self,
        address: str | None = None,
        *,
        insecure: bool = False,
        tls_cert: Path | str | None = None,
        tls_key: Path | str | None = None,
        tls_ca: Path | str | None = None,
        token: str | None = None,
        token_file: Path | str | None = None,
        timeout: float = 30.0,
    ) -> None:
        from cpcoord.tokens import client_token

        def path(p: Path | str | None) -> Path | None:
            return Path(p) if p is not None else None

        ns = argparse.Namespace(
            coordinator=address, tls_cert=path(tls_cert), tls_key=path(tls_key), tls_ca=path(tls_ca)
        )
        self._conn = clientconn.Client(
            clientconn.address(ns),
            insecure,
            timeout,
            tls=clientconn.tls_from_args(ns),
            token=client_token(token, path(token_file)),
        )
        self.address = self._conn.address

    @classmethod
    def over(cls, conn: clientconn.Client) -> Client:
        """A Client on a connection made elsewhere, with its own credentials and no
        environment fallbacks (the node agent's local API)."""
        c = cls.__new__(cls)
        c._conn = conn
        c.address = conn.address
        return c

    def close(self) -> None:
        self._conn.close()

    def _call(self, method: str, request: Any) -> Any:
        return self._conn.call(method, request)

    def _stream(self, method: str, request: Any) -> Iterator[Any]:
        return self._conn.stream(method, request)

    # -- jobs, members, agents -------------------------------------------------------

    def jobs(self, job: str = "") -> list[v.Job]:
        """Jobs by name with their members (UnknownJob if `job` is given and unknown)."""
        r = self._call("ListJobs", coordinator_pb2.ListJobsRequest(job=job))
        return [convert.job(j) for j in r.jobs]

    def job(self, name: str) -> v.Job:
        return self.jobs(name)[0]

    def agents(self) -> list[v.Agent]:
        r = self._call("ListAgents", coordinator_pb2.ListAgentsRequest())
        return [convert.agent(a) for a in r.agents]

    def attach(
        self,
        job: str,
        member: str,
        pid: int,
        *,
        start_time: int = 0,
        node: str = "",
        regions: Sequence[RegionSpec] = (),
        tracker: str = "",
        tree: bool = False,
    ) -> v.Member:
        """Make process `pid` member `member` of `job` (created on its first member).
        `regions` empty: every writable private mapping. `tree`: its descendants too, as
        members `<member>.<pid>` of one group (docs/decisions.md, "Process trees")."""
        req = coordinator_pb2.AttachMemberRequest(
            job=job,
            member=member,
            process=types_pb2.ProcessIdentity(pid=pid, start_time=start_time),
            node=node,
            regions=[types_pb2.Region(name=n, start=s, end=e) for n, s, e in regions],
            tracker=tracker,
            tree=tree,
        )
        return convert.member(self._call("AttachMember", req).member)

    def detach(self, job: str, member: str) -> None:
        self._call("DetachMember", coordinator_pb2.DetachMemberRequest(job=job, member=member))

    # -- checkpoint ------------------------------------------------------------------

    def checkpoint_events(
        self,
        job: str,
        *,
        full: bool = False,
        lease_ms: int = 0,
        freeze_timeout_ms: int = 0,
        commit_timeout_ms: int = 0,
        pin: bool = False,
        wait: v.Level = v.Level.STORE,
    ) -> Iterator[v.ProgressEvent]:
        """The steps of one checkpoint, ending with one COMMITTED or ABORTED event (with
        `info`). Leaving the loop early cancels the call: before CAPTURED that aborts the
        generation (reason CANCELLED). `wait`: the stream ends once the generation
        reaches that durability level (docs/multilevel.md); a generation committed at
        `local` while waiting for `store` first yields COMMITTED_LOCAL."""
        req = coordinator_pb2.CheckpointRequest(
            job=job,
            full=full,
            lease_ms=lease_ms,
            freeze_timeout_ms=freeze_timeout_ms,
            commit_timeout_ms=commit_timeout_ms,
            pin=pin,
            wait=convert.level_name(wait),
        )
        for msg in self._stream("Checkpoint", req):
            yield convert.progress(msg)

    def checkpoint(
        self,
        job: str,
        *,
        full: bool = False,
        lease_ms: int = 0,
        freeze_timeout_ms: int = 0,
        commit_timeout_ms: int = 0,
        pin: bool = False,
        on_event: OnEvent | None = None,
        check: bool = True,
        wait: v.Level = v.Level.STORE,
    ) -> v.Generation:
        """Take one checkpoint and return the generation as recorded. An aborted one
        raises GenerationAborted (with `check=False` it is returned, state ABORTED)."""
        last: v.ProgressEvent | None = None
        for ev in self.checkpoint_events(
            job,
            full=full,
            lease_ms=lease_ms,
            freeze_timeout_ms=freeze_timeout_ms,
            commit_timeout_ms=commit_timeout_ms,
            pin=pin,
            wait=wait,
        ):
            if on_event is not None:
                on_event(ev)
            last = ev
        return results.checkpoint(job, last, check)

    # -- generations -----------------------------------------------------------------

    def generations(
        self, job: str, *, include_aborted: bool = False, limit: int = 0
    ) -> list[v.Generation]:
        """Newest first."""
        req = coordinator_pb2.ListGenerationsRequest(
            job=job, include_aborted=include_aborted, limit=limit
        )
        return [convert.generation(g) for g in self._call("ListGenerations", req).generations]

    def generation(self, job: str, number: int = 0) -> v.GenerationDetail:
        """One generation with its members and regions; 0 = the latest committed."""
        r = self._call(
            "GetGeneration", coordinator_pb2.GetGenerationRequest(job=job, generation=number)
        )
        members = tuple(convert.member_generation(m) for m in r.members)
        return v.GenerationDetail(convert.generation(r.info), members)

    def delete_generation(self, job: str, number: int, *, force: bool = False) -> None:
        req = coordinator_pb2.DeleteGenerationRequest(job=job, generation=number, force=force)
        self._call("DeleteGeneration", req)

    def pin(self, job: str, number: int, pinned: bool = True) -> v.Generation:
        req = coordinator_pb2.PinGenerationRequest(job=job, generation=number, pinned=pinned)
        return convert.generation(self._call("PinGeneration", req).info)

    def forget_node(self, node: str) -> v.ForgottenNode:
        """The node is gone for good, with its cache: its undrained generations become
        lost (docs/multilevel.md). NodeConnected while its agent is connected."""
        r = self._call("ForgetNode", coordinator_pb2.ForgetNodeRequest(node=node))
        return convert.forgotten(node, r)

    # -- restore ---------------------------------------------------------------------

    def restore_events(
        self,
        job: str,
        generation: int = 0,
        *,
        members: Sequence[str] = (),
        lease_ms: int = 0,
        freeze_timeout_ms: int = 0,
        force: bool = False,
    ) -> Iterator[v.ProgressEvent]:
        """The steps of an in-place restore (roll the live members back); `force`: even
        where a member's kernel side changed since the cut (docs/restore.md)."""
        req = coordinator_pb2.RestoreRequest(
            job=job,
            generation=generation,
            members=list(members),
            lease_ms=lease_ms,
            freeze_timeout_ms=freeze_timeout_ms,
            force=force,
        )
        for msg in self._stream("Restore", req):
            yield convert.progress(msg)

    def restore(
        self,
        job: str,
        generation: int = 0,
        *,
        members: Sequence[str] = (),
        lease_ms: int = 0,
        freeze_timeout_ms: int = 0,
        check: bool = True,
        force: bool = False,
    ) -> v.RestoreResult:
        """Roll the live members of `job` back to `generation` (0 = the latest
        committed). An abort raises RestoreAborted unless `check=False`."""
        evs = self.restore_events(
            job,
            generation,
            members=members,
            lease_ms=lease_ms,
            freeze_timeout_ms=freeze_timeout_ms,
            force=force,
        )
        return results.restore(job, list(evs), check)

    def restore_into(
        self,
        job: str,
        member: str,
        pid: int,
        *,
        generation: int = 0,
        start_time: int = 0,
        node: str = "",
        regions: Sequence[RegionSpec] = (),
    ) -> v.RestoreResult:
        """Write one member's pages into a new process, its regions where they live now
        (empty: the addresses of the cut)."""
        req = coordinator_pb2.RestoreRequest(
            job=job,
            generation=generation,
            into=coordinator_pb2.RestoreTarget(
                member=member,
                process=types_pb2.ProcessIdentity(pid=pid, start_time=start_time),
                node=node,
                regions=[types_pb2.Region(name=n, start=s, end=e) for n, s, e in regions],
            ),
        )
        evs = [convert.progress(m) for m in self._stream("Restore", req)]
        return results.restore(job, evs, True)

    # -- diff and pages --------------------------------------------------------------

    def diff(self, job: str, a: int, b: int, *, members: Sequence[str] = ()) -> list[v.RegionDiff]:
        """Per member and region, the runs of pages that differ from generation a to b."""
        req = coordinator_pb2.DiffRequest(
            job=job, from_generation=a, to_generation=b, members=list(members)
        )
        return convert.region_diffs(self._stream("Diff", req))

    def read_generation(
        self,
        job: str,
        generation: int = 0,
        *,
        members: Sequence[str] = (),
        regions: Sequence[str] = (),
        data_path: str = "auto",
        store_key_file: Path | None = None,
    ) -> Iterator[v.MemberPages]:
        """The pages of a committed generation (0 = latest), member by member, each chunk
        re-hashed against its id; `data_path` auto|direct|coordinator: read the packs
        from the store here when it opens here (cpcoord/readpath.py; a fallback is
        logged), or through the coordinator."""
        req = coordinator_pb2.ReadGenerationRequest(
            job=job, generation=generation, members=list(members), regions=list(regions)
        )
        store = readpath.choose(self._call, data_path, store_key_file, log.info)
        try:
            reads = readpath.Reads()
            for mp in readpath.members(self._stream, req, store, data_path, reads, _warn):
                yield convert.member_pages(job, mp)
        finally:
            if store is not None:
                store.close()

    def export(
        self,
        job: str,
        out: Path | str,
        generation: int = 0,
        *,
        members: Sequence[str] = (),
        data_path: str = "auto",
        store_key_file: Path | None = None,
    ) -> Path:
        """Write a committed generation as an image directory (as `cpcoord export`)."""
        return export.export(self, job, out, generation, members, data_path, store_key_file)

    # -- store upkeep ----------------------------------------------------------------

    def gc(self, *, keep: int = 0, dry_run: bool = False) -> v.GcReport:
        """Apply retention (keep N per job, 0 = the coordinator's) and drop chunks."""
        req = coordinator_pb2.GarbageCollectRequest(keep=keep, dry_run=dry_run)
        return results.gc(self._stream("GarbageCollect", req))

    def verify(self, job: str = "", generation: int = 0) -> v.VerifyReport:
        """Re-read and re-hash every chunk (of `job`, of one `generation`)."""
        req = coordinator_pb2.VerifyRequest(job=job, generation=generation)
        return results.verify(self._stream("Verify", req))

    def store_stats(self) -> v.StoreStats:
        return convert.store_stats(self._call("StoreStats", coordinator_pb2.StoreStatsRequest()))

    # -- watch -----------------------------------------------------------------------

    def watch(self, jobs: Iterable[str] = (), *, include_progress: bool = False) -> Watch:
        """Job events of `jobs` (empty: all; agent and gc events always) from the
        moment this returns, until closed. Iterate it; close it from any thread."""
        req = coordinator_pb2.WatchRequest(jobs=list(jobs), include_progress=include_progress)

        def start(stub: Any, addr: str) -> Watch:
            w = Watch(stub.Watch(req), addr)
            try:
                w.wait_subscribed()
            except BaseException:
                w.close()
                raise
            return w

        return self._conn.with_failover(start)


def _warn(text: str) -> None:
    log.warning(text)
