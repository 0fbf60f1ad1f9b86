"""Restore, coordinator side: in place (a protocol generation of kind RESTORE) and into
a new process (one RestoreInto command).

In place: first a prepare phase, nothing frozen (protocol/prepare.py): each agent gets
Prepare with, per member, its tracker base (the member's `committed` generation, which
its tracker counts from) and the pages that differ between the generation and that base
(`prepare_members`, from the manifests: restore_diff.py). The agent prefetches what it
will write (AgentControl.DownloadPages with a page filter: the differing pages and the
pages its tracker saw written since the base; or every page, for a member without such a
tracker) and answers Prepared. Then the chosen members (default: all of the job) are
frozen like a checkpoint; each agent checks that its members' mappings still hold the
generation's regions with the same sizes and answers Frozen or Failed(MISMATCH), so a
member that does not fit aborts the restore before anything is written anywhere. After
the barrier each agent gets Restore, fetches the few pages written since its prefetch,
writes, reports Restored per member, and when all are written every agent gets Thaw.
The flight is the job's generation in flight (a checkpoint and a restore of one job
exclude each other); its number is the generation written back, which stays committed
whatever happens.

The restore Freeze carries every member's regions with the mappings they lay in at the
cut (`freeze_layouts`, from the manifest): the agent's fit check, before anything is
written anywhere, refuses a region mapped otherwise now (other permissions, another
backing). A member of the default (whole-memory) region set is restored only together
with every thread's registers at the cut: its manifest holds them (saved by the agent
while frozen for the capture, reported with Staged) and its layout carries them too
(same threads as at the cut). A generation without them (an older one) is refused by
the agent, with the reason. Its kernel side at the cut (fds, offsets, pipe and socket
queues) travels the same way; the agent refuses a rollback that would leave memory and
kernel disagreeing unless the restore is forced (`RestoreOptions.force`).

A restored member whose agent reports its tracker kept (armed, relative to the same
base, the written pages counted as written) keeps its `committed` base: its next capture
stays incremental. Any other restored member's next capture is full (base cleared).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from coordinator import generations, members_ops, restore_diff
from coordinator.flight import CheckpointOptions, Flight, Subscription, Summary
from coordinator.protocol import Generation
from coordinator.protocol.values import GenState, Kind, Spec
from coordinator.store import Manifest
from cpcoord import kstate, mapfacts
from cpcoord.errors import (
    AgentUnavailable,
    CpcoordError,
    InvalidArgument,
    UnknownJob,
    UnknownMember,
)
from cpcoord.gen.v1 import agent_pb2, common_pb2, types_pb2
from cpcoord.log import log_event
from cpcoord.ranges import check_name

if TYPE_CHECKING:
    from coordinator.engine_view import EngineView

log = logging.getLogger("cpcoord.coordinator.restore")


@dataclass(frozen=True)
class RestoreOptions:
    job: str
    generation: int = 0  # 0 = the newest committed
    members: tuple[str, ...] = ()  # empty = every member of the job
    lease_ms: int = 0
    freeze_timeout_ms: int = 0
    force: bool = False  # roll back although the kernel side differs from the cut


@dataclass(frozen=True)
class IntoOptions:
    job: str
    generation: int  # 0 = the newest committed
    member: str
    pid: int
    start_time: int = 0
    node: str = ""  # empty: the member's node
    regions: tuple[tuple[str, int, int], ...] = ()  # (name, start, end) now; empty: as at the cut


def is_restore(f: Flight) -> bool:
    return f.gen.snapshot.spec.kind is Kind.RESTORE


def begin(engine: EngineView, opts: RestoreOptions) -> Subscription:
    """Start restoring in place; progress comes on the subscription. Errors before it
    begins: UnknownJob, NoSuchGeneration, UnknownMember, JobBusy, MemberNotRunning,
    AgentUnavailable."""
    check_name(opts.job)
    for name in opts.members:
        check_name(name)
    timing = CheckpointOptions(
        opts.job, lease_ms=opts.lease_ms, freeze_timeout_ms=opts.freeze_timeout_ms
    ).timing()
    info = generations.committed(engine, opts.job, opts.generation, readable=True)
    manifest = engine.repo.manifest(opts.job, info.number)
    in_gen = {m.name for m in manifest.members}
    with engine.lock:
        if not engine.members.has_job(opts.job):
            raise UnknownJob(opts.job)
        recs = engine.members.of_job(opts.job)
        by_name = {r.name: r for r in recs}
        names = list(opts.members) or sorted(by_name)
        for n in names:
            if n not in by_name:
                raise UnknownMember(opts.job, n, "attached now")
            if n not in in_gen:
                raise UnknownMember(opts.job, n, f"in generation {info.number}")
        chosen = [by_name[n] for n in names]
        members_ops.check_ready(engine, opts.job, chosen)
        spec = Spec(
            opts.job,
            info.number,
            tuple((m.name, m.node) for m in chosen),
            kind=Kind.RESTORE,
            timing=timing,
            prepare=True,
        )
        f = Flight(Generation(spec), None, frozenset(), started=engine.clock())
        f.force = opts.force
        return engine.launch(f)


def freeze_layouts(
    engine: EngineView, job: str, generation: int, members: Iterable[str]
) -> list[agent_pb2.RestoreLayout]:
    """The restore Freeze's layouts: each named member's regions with their mappings at
    the cut, and (a whole-memory member) every thread's registers at the cut."""
    manifest = engine.repo.manifest(job, generation)
    out = []
    for name in members:
        try:
            mm = manifest.member(name)
        except KeyError:
            continue
        out.append(
            agent_pb2.RestoreLayout(
                member=name,
                regions=[
                    types_pb2.Region(
                        name=r.name,
                        start=r.start,
                        end=r.end,
                        mappings=mapfacts.to_protos(r.mappings),
                    )
                    for r in mm.regions
                ],
                threads=[
                    common_pb2.ThreadRegisters(tid=t.tid, arch=t.arch, regs=t.regs, fpregs=t.fpregs)
                    for t in mm.threads
                ],
                thread_start_times=[t.start_time for t in mm.threads],
                kernel=kstate.to_proto(mm.kernel) if mm.kernel is not None else None,
                layout=mapfacts.to_protos(mm.layout),
            )
        )
    return out


def prepare_members(engine: EngineView, job: str, generation: int, msg: agent_pb2.Prepare) -> None:
    """Fill a restore Prepare: each member's tracker base and the pages that differ
    between the generation and it (none known: base 0, the agent writes every page)."""
    manifest = engine.repo.manifest(job, generation)
    bases: dict[int, Manifest] = {}
    for pm in msg.members:
        with engine.lock:
            rec = engine.members.get(job, pm.member)
        base = rec.committed if rec is not None else 0
        try:
            mm = manifest.member(pm.member)
            if base and base not in bases:
                bases[base] = engine.repo.manifest(job, base)
            bm = bases[base].member(pm.member) if base else None
        except (KeyError, CpcoordError) as e:
            log_event(log, logging.INFO, "restore without base", member=pm.member, why=str(e))
            continue
        if bm is None:
            continue
        pm.base_generation = base
        pm.differs.extend(restore_diff.differing_regions(mm, bm))


def finish(engine: EngineView, f: Flight) -> Summary:
    """Under the lock, at a restore's end (COMMITTED or ABORTED; the engine has ended
    the flight): written members capture in full next; the generation keeps its own
    record."""
    snap = f.gen.snapshot
    if snap.state is GenState.COMMITTED:
        for name, _ in snap.spec.members:
            r = engine.members.get(f.job, name)
            if r is not None and r.committed and name not in f.tracker_kept:
                engine.members.update_all([replace(r, committed=0)])
    f.summary = generations.summarize(
        engine, f.job, f.number, info=engine.repo.catalog.get(f.job, f.number)
    )
    log_event(
        log,
        logging.INFO,
        "restore ended",
        job=f.job,
        generation=f.number,
        state=snap.state.value,
        reason=snap.reason.value if snap.reason else "",
        detail=snap.detail,
        seconds=round(engine.clock() - f.started, 3),
    )
    return f.summary


def into(engine: EngineView, opts: IntoOptions) -> tuple[int, common_pb2.MemberStats]:
    """Write one member's pages of a committed generation into a new process, through
    the agent of its node (RestoreInto); returns the generation and what was written."""
    check_name(opts.job)
    check_name(opts.member)
    if opts.pid < 1:
        raise InvalidArgument(f"pid must be >= 1, got {opts.pid}")
    info = generations.committed(engine, opts.job, opts.generation, readable=True)
    m = engine.repo.manifest(opts.job, info.number)
    try:
        mm = m.member(opts.member)
    except KeyError:
        raise UnknownMember(opts.job, opts.member, f"in generation {info.number}") from None
    sizes = {r.name: r.end - r.start for r in mm.regions}
    for name, start, end in opts.regions:
        if name not in sizes:
            raise InvalidArgument(f"region {name!r} is not in {opts.member}'s generation")
        if end - start != sizes[name] or start % m.page_size or end <= start:
            raise InvalidArgument(
                f"region {name!r} at {start:#x}-{end:#x}: it must be page-aligned and "
                f"{sizes[name]} bytes as at the cut"
            )
    node = opts.node
    if node:
        check_name(node)
    else:
        with engine.lock:
            rec = engine.members.get(opts.job, opts.member)
        if rec is None:
            raise InvalidArgument(f"member {opts.member} is not attached: give its node")
        node = rec.node
    with engine.lock:
        s = engine.agents.current(node)
    if s is None or not s.ready:
        raise AgentUnavailable(node)
    msg = agent_pb2.RestoreInto(
        job=opts.job,
        generation=info.number,
        member=opts.member,
        target=types_pb2.ProcessIdentity(pid=opts.pid, start_time=opts.start_time),
        regions=[types_pb2.Region(name=n, start=a, end=b) for n, a, b in opts.regions],
    )
    # Writing a whole member can take a while: at least the command timeout, more when big.
    pages = sum(r.pages.page_count for r in mm.regions)
    timeout = engine.opt.command_timeout_s + pages * m.page_size / (200 << 20)
    res = s.ask("RestoreInto", timeout, restore_into=msg)
    return info.number, res.stats
