"""The members an agent holds: who they are, what to capture, and what is still owed.

Owns, per member (job + name): the process identity (pid + start time, so a reused pid
is never mistaken for it), its regions (explicit, or None for the default set), the
tracker preference and its MemberTracker (nodeagent/capture/trackstate.py), and the
changed-page sets of captures not yet committed (*pending*, kept per generation until
`Committed`, merged into every later capture: an aborted generation can never make a
later incremental one miss a page). Also: validating an AttachMember, the exit status of
a member that died, and `DeathWatch`, which notices a member's exit through a pidfd.

State lives here; the worker thread (nodeagent/daemon/worker.py) is the only writer, except for
the table's lock-protected add/remove, which the agent thread reads for Hello.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from cpcoord.errors import (
    DuplicateMember,
    InvalidArgument,
    MemberNotRunning,
    NoSuchProcess,
    PidAttached,
    PidReused,
    RangeBeyondAddressSpace,
    RangesOverlap,
    RangeUnmapped,
)
from cpcoord.gen.v1 import agent_pb2, types_pb2
from cpcoord.ranges import PAGE_SIZE, check_name, user_space_end
from nodeagent.capture.livecopy import LiveCopy
from nodeagent.capture.regions import RegionSpec
from nodeagent.capture.trackstate import MemberTracker
from nodeagent.pages import PageNumbers, empty_pages, union_sorted
from nodeagent.proc.procfs import Mapping, ProcessIdentity, live_tid, read_maps
from nodeagent.proc.staging import Staging
from nodeagent.trackers import registry
from nodeagent.upload.recent import RecentChunks

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (job, member)
Layout = dict[str, tuple[int, int]]  # region name -> (start, end)
MAX_REGIONS = 4096


@dataclass
class HeldMember:
    """One member and its tracking state (mutable; owned by the worker thread)."""

    job: str
    name: str
    ident: ProcessIdentity
    regions: tuple[RegionSpec, ...] | None  # None: every writable private mapping
    tracker_pref: str = registry.AUTO
    track: MemberTracker = field(init=False)  # the tracker and what it last saw
    committed: int = 0  # last generation the coordinator told us is Committed, 0: none
    base_layout: Layout | None = None  # region layout of that generation
    pending: dict[int, PageNumbers] = field(default_factory=dict)  # gen -> delivered pages
    layouts: dict[int, Layout] = field(default_factory=dict)  # gen -> region layout
    alive: bool = True
    exit_status: int = -1
    gone_detail: str = ""
    staging: Staging | None = None
    staging_busy: bool = False  # an upload still reads it: the next capture gets a new one
    # (generation, live copy): pre-copied at that generation's Freeze, for its Capture
    precopied: tuple[int, LiveCopy] | None = None
    group: str = ""  # tree group (the root member's name; nodeagent/daemon/tree.py); "": none
    # The chunks of its last upload that its staging holds (a restore reads them there;
    # set on the upload's thread, read on a download's: one reference, swapped whole).
    recent: RecentChunks | None = None

    def __post_init__(self) -> None:
        self.track = MemberTracker(self.tracker_pref, {"job": self.job, "member": self.name})

    @property
    def key(self) -> Key:
        return (self.job, self.name)

    @property
    def tracker_name(self) -> str:
        """The armed tracker's name; "" when none is armed (the next capture is full)."""
        return self.track.name if self.track.armed else ""

    # -- pending changed sets ----------------------------------------------------------

    def pending_pages(self) -> PageNumbers:
        """Every page delivered by a capture not known to be committed (sorted)."""
        if not self.pending:
            return empty_pages()
        out = empty_pages()
        for p in self.pending.values():  # sorted, unique each: merged, never re-sorted
            out = union_sorted(out, p)
        return out

    def record_capture(self, generation: int, delivered: PageNumbers, layout: Layout) -> None:
        """Remember what generation `generation` delivered, until it is committed."""
        self.pending[generation] = delivered
        self.layouts[generation] = layout

    def committed_through(self, generation: int) -> bool:
        """`Committed(generation)`: forget what it and earlier captures delivered.
        Only when this member delivered for it (else it was not part of it)."""
        if generation not in self.pending:
            return False
        self.base_layout = self.layouts[generation]
        self.pending = {g: p for g, p in self.pending.items() if g > generation}
        self.layouts = {g: lay for g, lay in self.layouts.items() if g > generation}
        self.committed = max(self.committed, generation)
        return True

    def stable(self, spec: RegionSpec) -> bool:
        """Whether the region had this name, start and end in the last committed capture
        and in every capture since: then whichever of them the coordinator holds as the
        parent, it can inherit the region's undelivered pages; otherwise the region must
        be delivered whole (docs/protocol.md, "How the coordinator reads an upload")."""
        if self.base_layout is None:
            return False
        want = (spec.start, spec.end)
        return all(lay.get(spec.name) == want for lay in (self.base_layout, *self.layouts.values()))

    def unstable(self, specs: Sequence[RegionSpec], layout: Layout) -> npt.NDArray[np.bool_]:
        """Per region, `not stable(spec)`; `layout` is the regions' current layout. When
        the layout equals every remembered one (one dict comparison each, the common
        case), no region is unstable and nothing is looked up per region."""
        if self.base_layout is None:
            return np.ones(len(specs), dtype=np.bool_)
        if all(lay == layout for lay in (self.base_layout, *self.layouts.values())):
            return np.zeros(len(specs), dtype=np.bool_)
        return np.fromiter((not self.stable(s) for s in specs), dtype=np.bool_, count=len(specs))

    # -- wire ------------------------------------------------------------------------

    def member_proto(self) -> types_pb2.Member:
        regions = [
            types_pb2.Region(name=r.name, start=r.start, end=r.end) for r in self.regions or ()
        ]
        return types_pb2.Member(
            name=self.name,
            process=types_pb2.ProcessIdentity(pid=self.ident.pid, start_time=self.ident.start_time),
            regions=regions,
        )

    def held_proto(self) -> agent_pb2.HeldMember:
        return agent_pb2.HeldMember(
            job=self.job,
            member=self.member_proto(),
            alive=self.alive,
            tracker=self.tracker_name,
            group=self.group,
        )


class Members:
    """The table of held members. Lock-protected: the agent thread lists it for Hello."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[Key, HeldMember] = {}

    def get(self, job: str, name: str) -> HeldMember | None:
        with self._lock:
            return self._by_key.get((job, name))

    def all(self) -> list[HeldMember]:
        with self._lock:
            return [self._by_key[k] for k in sorted(self._by_key)]

    def of_job(self, job: str) -> list[HeldMember]:
        return [m for m in self.all() if m.job == job]

    def by_pid(self, pid: int) -> HeldMember | None:
        return next((m for m in self.all() if m.ident.pid == pid and m.alive), None)

    def add(self, m: HeldMember) -> None:
        with self._lock:
            if m.key in self._by_key:
                raise DuplicateMember(m.job, m.name)
            self._by_key[m.key] = m

    def remove(self, job: str, name: str) -> HeldMember | None:
        with self._lock:
            return self._by_key.pop((job, name), None)

    def held(self) -> list[agent_pb2.HeldMember]:
        return [m.held_proto() for m in self.all()]


# -- AttachMember ------------------------------------------------------------------------


def check_regions(
    regions: Sequence[types_pb2.Region], maps: Sequence[Mapping], pid: int
) -> tuple[RegionSpec, ...] | None:
    """Explicit regions as RegionSpecs (None when none are given: the default set).
    Page-aligned, non-empty, inside the user address space, non-overlapping, unique
    names (an empty name becomes r0, r1, ... by address), each touching a mapping."""
    if not regions:
        return None
    if len(regions) > MAX_REGIONS:
        raise InvalidArgument(f"{len(regions)} regions: at most {MAX_REGIONS} per member")
    specs: list[RegionSpec] = []
    for i, r in enumerate(regions):
        rng = f"0x{r.start:x}-0x{r.end:x}"
        if r.start % PAGE_SIZE or r.end % PAGE_SIZE:
            raise InvalidArgument(f"region {r.name or i}: {rng} is not page-aligned")
        if r.end <= r.start:
            raise InvalidArgument(f"region {r.name or i}: {rng} is empty or inverted")
        if r.end > user_space_end():
            raise RangeBeyondAddressSpace(rng, f"0x{user_space_end():x}")
        specs.append(RegionSpec(r.name, r.start, r.end))
    specs.sort(key=lambda s: s.start)
    for a, b in itertools.pairwise(specs):
        if b.start < a.end:
            raise RangesOverlap(a.range.format(), b.range.format())
    specs = [s if s.name else RegionSpec(f"r{i}", s.start, s.end) for i, s in enumerate(specs)]
    names = [check_name(s.name) for s in specs]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"duplicate region name in {sorted(names)}")
    for s in specs:
        if not any(m.start < s.end and s.start < m.end for m in maps):
            raise RangeUnmapped(s.range.format(), pid)
    return tuple(specs)


def new_member(req: agent_pb2.AttachMember, default_tracker: str, members: Members) -> HeldMember:
    """Validate an AttachMember and build the member (not yet added). Nothing changes on
    any error. An identical repeat of a held member is refused as DuplicateMember by the
    caller only when it differs (see `same_attach`)."""
    check_name(req.job)
    check_name(req.member)
    pid = req.process.pid
    if pid <= 0:
        raise NoSuchProcess(pid)
    ident = ProcessIdentity.of(pid)
    if req.process.start_time and req.process.start_time != ident.start_time:
        raise PidReused(pid, req.process.start_time, ident.start_time)
    if live_tid(pid) is None:  # a zombie leader whose threads run on is alive
        raise MemberNotRunning(req.member, req.job, "the process is a zombie")
    if pid == os.getpid():
        raise InvalidArgument("the agent cannot checkpoint itself")
    pref = registry.canonical(req.tracker or default_tracker)
    if pref != registry.AUTO:
        registry.choose(pref)  # TrackerUnavailable now, not at the first capture
    specs = check_regions(req.regions, read_maps(pid), pid)
    other = members.by_pid(pid)
    if other is not None and other.key != (req.job, req.member):
        raise PidAttached(pid, other.name, other.job)
    if req.group:
        check_name(req.group)
    return HeldMember(req.job, req.member, ident, specs, pref, group=req.group)


def same_attach(a: HeldMember, b: HeldMember) -> bool:
    """Whether two attach requests name the same thing (a repeat is answered OK)."""
    return (a.ident, a.regions, a.tracker_pref, a.group) == (
        b.ident,
        b.regions,
        b.tracker_pref,
        b.group,
    )


# -- death -------------------------------------------------------------------------------


def exit_status(pid: int) -> tuple[int, str]:
    """(wait status, detail) of a process that exited, as far as /proc still tells: a
    zombie shows its wait status in field 52 of /proc/PID/stat; a reaped one is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        if fields[0] in ("Z", "X") and len(fields) >= 50:
            status = int(fields[49])
            if os.WIFSIGNALED(status):
                return status, f"killed by signal {os.WTERMSIG(status)}"
            if os.WIFEXITED(status):
                return status, f"exited with status {os.WEXITSTATUS(status)}"
            return status, f"wait status {status}"
    except (OSError, IndexError, ValueError):
        pass
    return -1, "the process exited"


class DeathWatch:
    """Calls `on_gone(key)` once when a watched process exits (pidfd readable), on its own
    thread; the callback must only hand the news on (e.g. queue it)."""

    def __init__(self, on_gone: Callable[[Key], None]) -> None:
        self._on_gone = on_gone
        self._lock = threading.Lock()
        self._fds: dict[int, Key] = {}
        self._rd, self._wr = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="cpcoord-deathwatch", daemon=True)
        self._thread.start()

    def add(self, key: Key, ident: ProcessIdentity) -> None:
        try:
            fd = os.pidfd_open(ident.pid)
        except ProcessLookupError:
            self._on_gone(key)
            return
        with self._lock:
            self._fds[fd] = key
        self._wake()
        # The pid may have been reused between the identity check and pidfd_open.
        if not ident.alive():
            self.remove(key)
            self._on_gone(key)

    def remove(self, key: Key) -> None:
        with self._lock:
            fds = [fd for fd, k in self._fds.items() if k == key]
            for fd in fds:
                del self._fds[fd]
                os.close(fd)
        self._wake()

    def close(self) -> None:
        self._stop = True
        self._wake()
        self._thread.join(timeout=5)
        with self._lock:
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()
        os.close(self._rd)
        os.close(self._wr)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wr, b"x")

    def _run(self) -> None:
        while not self._stop:
            poller = select.poll()
            poller.register(self._rd, select.POLLIN)
            with self._lock:
                for fd in self._fds:
                    poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll():
                if fd == self._rd:
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.read(self._rd, 4096)
                    continue
                with self._lock:
                    key = self._fds.pop(fd, None)
                    if key is not None:
                        os.close(fd)
                if key is not None:
                    log.info("member exited", extra={"fields": {"job": key[0], "member": key[1]}})
                    self._on_gone(key)
