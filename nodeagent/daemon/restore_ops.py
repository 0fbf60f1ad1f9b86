"""Restore glue between the control stream and the ptrace thread.

The agent thread downloads a member's generation (`DownloadPages`, off the stream's
reader thread) into `RegionContents`; the ptrace thread fits frozen members to their
regions (`fit`, at a restore Freeze) and writes them back (nodeagent/restore/apply.py).

Registers: a member of the default (whole-memory) region set has every
thread's registers saved while it is frozen for a capture (`cut_threads`, before any
tracker injects a system call), sent with its Staged and kept in the manifest. A
restore Freeze brings them back with the member's regions at the cut (`layouts_of`);
the fit check then accepts the member only with the same threads as at the cut, and the
write puts the registers back after the pages. Without them (an older generation) the
whole-memory set is refused, with the reason; explicit regions are restored alone.

Mappings: every region's mappings at the cut are recorded with its pages (copyout.py,
the manifest) and a restore Freeze brings them back for every member (`layouts_of`); an
explicit member's attached regions take them by name and bounds (`layout_of`). The fit
check refuses a region mapped otherwise now (restore.check_fit).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cpcoord import kstate, mapfacts, packread
from cpcoord.errors import (
    CpcoordError,
    InvalidArgument,
    RegionMismatch,
    RestoreRefused,
    ThreadStateInvalid,
)
from cpcoord.gen.v1 import agent_pb2, common_pb2, types_pb2
from cpcoord.pagedata import read_members
from cpcoord.ranges import PAGE_SIZE
from nodeagent.daemon.membership import HeldMember
from nodeagent.proc.freeze import FrozenProcess
from nodeagent.proc.registers import ARCH, ThreadState, ThreadStates, save_thread_state
from nodeagent.restore.apply import (
    Fitted,
    MemberLayout,
    RegionContents,
    RegionLayout,
    RestoreStats,
    check_fit,
)
from nodeagent.upload.direct import DirectStore

log = logging.getLogger(__name__)
# Registers per Staged at most (Welcome.max_message_bytes is 8 MiB; ~3 KiB per thread)
MAX_STAGED_BYTES = 4 << 20
# member -> its layout at the cut (whole-memory members of a restore Freeze), or why not
Layouts = tuple[tuple[str, MemberLayout | CpcoordError], ...]


def cut_threads(m: HeldMember, fp: FrozenProcess) -> ThreadStates | None:
    """Every thread's registers of a frozen whole-memory member (None for explicit
    regions, and where registers are not supported: such a generation is still taken,
    only not restorable in place). Call first in its capture: the cut's registers."""
    if m.regions is not None or platform.machine() != ARCH:
        return None
    return save_thread_state(fp)


def staged_threads(
    member: str, states: ThreadStates | None
) -> tuple[list[common_pb2.ThreadRegisters], list[int]]:
    """The registers and start times for Staged.threads / thread_start_times; none (and
    a warning) beyond MAX_STAGED_BYTES, so a process with thousands of threads still
    checkpoints (it is then not restorable in place as a whole) and the control stream
    never carries an oversized message."""
    if states is None:
        return [], []
    size = sum(len(t.regs) + len(t.fpregs) + 24 for t in states.threads)
    if size > MAX_STAGED_BYTES:
        fields = {"member": member, "threads": len(states.threads), "bytes": size}
        log.warning("registers too large to send: not kept", extra={"fields": fields})
        return [], []
    return states.to_proto(), [t.start_time for t in states.threads]


def layouts_of(f: agent_pb2.Freeze) -> Layouts:
    """A restore Freeze's layouts, checked (a bad one stays as its error, for the fit
    check to report against that member)."""
    out: list[tuple[str, MemberLayout | CpcoordError]] = []
    for lay in f.layouts:
        try:
            threads = _states(lay.threads, lay.thread_start_times) if lay.threads else None
            regions = tuple(
                RegionLayout(r.name, r.start, r.end, mappings=mapfacts.from_protos(r.mappings))
                for r in lay.regions
            )
            kernel = kstate.of_message(lay)
            cut = mapfacts.from_protos(lay.layout)
            whole = MemberLayout(lay.member, regions, False, threads, kernel, f.force, cut_maps=cut)
            out.append((lay.member, whole))
        except (ThreadStateInvalid, InvalidArgument) as e:
            out.append((lay.member, e))
    return tuple(out)


def _states(msgs: Sequence[common_pb2.ThreadRegisters], starts: Sequence[int]) -> ThreadStates:
    """Registers and (parallel, or empty = unknown) start times as ThreadStates."""
    if starts and len(starts) != len(msgs):
        raise ThreadStateInvalid(f"{len(starts)} start times for {len(msgs)} threads")
    times = list(starts) or [0] * len(msgs)
    return ThreadStates.of(
        ThreadState(m.tid, int(st), m.arch, bytes(m.regs), bytes(m.fpregs))
        for m, st in zip(msgs, times, strict=True)
    )


def layout_of(m: HeldMember, layouts: Layouts = ()) -> MemberLayout:
    """The member's regions as a restore layout: its explicit regions, or (default set)
    the regions and registers at the cut from the restore Freeze; without those the fit
    check refuses it with the reason."""
    given = dict(layouts).get(m.name)
    if m.regions is not None:
        # The regions attached; the generation's layout (when sent) adds the mappings at
        # the cut of each region it holds with the same name and bounds.
        cut = {}
        if isinstance(given, MemberLayout):
            cut = {(r.name, r.start, r.end): r.mappings for r in given.regions}
        regions = tuple(
            RegionLayout(r.name, r.start, r.end, mappings=cut.get((r.name, r.start, r.end), ()))
            for r in m.regions
        )
        return MemberLayout(m.name, regions, explicit=True)
    if isinstance(given, CpcoordError):
        raise given
    return given or MemberLayout(m.name, (), explicit=False, threads=None)


def fit(m: HeldMember, fp: FrozenProcess, layouts: Layouts = ()) -> Fitted:
    return check_fit(fp, layout_of(m, layouts))


def download(
    stub: Any,
    job: str,
    generation: int,
    member: str,
    timeout_s: float,
    only: list[types_pb2.Region] | None = None,
    store: DirectStore | None = None,
    on_read: Callable[[int], None] | None = None,
    local: packread.LocalChunks | None = None,
    on_local: Callable[[int], None] | None = None,
) -> tuple[RegionContents, ...]:
    """Every region of the member at `generation`, pages not listed (or ZERO) as zeros;
    `only` (DownloadRequest.page_filter): just those pages of each region. With `store`
    (the direct read path): the coordinator names where the chunks lie and they are
    read from the store here (cpcoord/packread.py), or from this node's cache for a
    generation not drained yet (level local), `on_read` told of each ranged read's bytes;
    chunks that `local` holds (the member's staging after its last upload) are taken
    from there when their bytes hash to their ids (`on_local` told of their bytes)."""
    req = agent_pb2.DownloadRequest(
        job=job,
        generation=generation,
        member=member,
        page_filter=only or [],
        chunk_locations=store is not None,
        read_cache=store is not None and store.cache is not None,
    )
    msgs = list(stub.DownloadPages(req, timeout=timeout_s))  # ids and locations: small
    checked = None
    if store is not None:
        batches = [m.batch for m in msgs if m.WhichOneof("body") == "batch"]
        cache = store.cache.reader if store.cache is not None else None
        checked = packread.fetch(
            store.backend, store.sealer, batches, on_read, cache, local, on_local
        )
    got = list(read_members(msgs, checked))
    if len(got) != 1 or got[0].name != member:
        raise InvalidArgument(f"DownloadPages for {member!r} sent {len(got)} members")
    mp = got[0]
    if mp.header.page_size != PAGE_SIZE:
        raise InvalidArgument(f"page size {mp.header.page_size}, this node has {PAGE_SIZE}")
    return tuple(
        RegionContents(r.name, r.start, r.end, np.asarray(r.pages, dtype=np.uint64), r.data)
        for r in mp.regions
    )


def restored(
    job: str,
    generation: int,
    member: str,
    st: RestoreStats,
    frozen_s: float,
    prefetched: int = 0,
    tracker_kept: bool = False,
    read_path: str = "",
    kernel_warnings: tuple[str, ...] = (),
) -> agent_pb2.AgentMessage:
    stats = common_pb2.MemberStats(
        pages=st.data_pages,
        bytes_logical=st.bytes_written,
        frozen_seconds=frozen_s,
        full=not tracker_kept,
        pages_written=(st.bytes_written + PAGE_SIZE - 1) // PAGE_SIZE,
        bytes_prefetched=prefetched,
        tracker_kept=tracker_kept,
        read_direct=read_path == "direct",
        kernel_warnings=kernel_warnings,
    )
    r = agent_pb2.Restored(job=job, generation=generation, member=member, stats=stats)
    return agent_pb2.AgentMessage(restored=r)


def fit_error(e: CpcoordError) -> bool:
    """Whether the error is a misfit (Failed MISMATCH) rather than a failure."""
    return isinstance(e, RegionMismatch | RestoreRefused)
