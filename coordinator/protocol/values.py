"""The values of the protocol core (coordinator/protocol/table.py): states, timing, stats, the
generation's spec and snapshot (events and commands: coordinator/protocol/messages.py).

All frozen dataclasses and string enums, validated on construction (bad input raises
InvalidArgument and builds nothing). Enum values are the lower-case suffixes of the
matching proto enums in proto/cpcoord/v1/common.proto, so servicers translate by name;
tests/unit/test_protocol_proto.py keeps the two in step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from functools import cached_property

from cpcoord.errors import InvalidArgument


class Kind(StrEnum):
    """What a generation does after the barrier."""

    CHECKPOINT = "checkpoint"  # capture, stage, thaw each, upload, commit
    RESTORE = "restore"  # write the pages of a committed generation, then thaw all


class GenState(StrEnum):
    NEW = "new"  # built, nothing sent
    PRIMING = "priming"  # Prepare sent (a spec with a prepare phase), nothing frozen yet
    PREPARING = "preparing"  # Freeze sent, waiting for every member to be frozen
    FROZEN = "frozen"  # the barrier passed: the cut is taken; capture (write) runs
    CAPTURED = "captured"  # every member uploaded; Commit issued, the store decides
    COMMITTED = "committed"  # terminal: durable and visible (restore: written and thawed)
    ABORTED = "aborted"  # terminal: with a reason; nothing of it is visible


class MemberState(StrEnum):
    PENDING = "pending"  # Freeze sent
    FROZEN = "frozen"  # its agent reported it frozen
    STAGED = "staged"  # its copy is in staging and the agent has thawed it
    UPLOADED = "uploaded"  # its pages are stored (not yet committed)
    RESTORED = "restored"  # restore: its pages are written, it waits frozen for Thaw


class AbortReason(StrEnum):
    AGENT_LOST = "agent_lost"  # a control stream broke
    MEMBER_DIED = "member_died"  # a member's process exited before its copy was staged
    FREEZE_FAILED = "freeze_failed"
    FREEZE_TIMEOUT = "freeze_timeout"  # the barrier was not reached by the freeze deadline
    LEASE_EXPIRED = "lease_expired"  # a member was still frozen at the lease deadline
    COMMIT_TIMEOUT = "commit_timeout"  # not uploaded and committed by the commit deadline
    CAPTURE_FAILED = "capture_failed"
    UPLOAD_FAILED = "upload_failed"
    BAD_DATA = "bad_data"  # a chunk's bytes do not match its id, a malformed upload
    STORE_ERROR = "store_error"
    CANCELLED = "cancelled"
    MISMATCH = "mismatch"  # restore: a member's mappings no longer fit the generation
    RESTORE_FAILED = "restore_failed"
    PREPARE_TIMEOUT = "prepare_timeout"  # not every agent was prepared by its deadline
    KERNEL_STATE = "kernel_state"  # restore: fds/queues changed since the cut (no --force)


# Reasons a MemberFailed event may carry (the others belong to other events or to Tick).
AGENT_REASONS = frozenset(
    {
        AbortReason.FREEZE_FAILED,
        AbortReason.LEASE_EXPIRED,
        AbortReason.CAPTURE_FAILED,
        AbortReason.UPLOAD_FAILED,
        AbortReason.BAD_DATA,
        AbortReason.MISMATCH,
        AbortReason.KERNEL_STATE,
        AbortReason.RESTORE_FAILED,
    }
)


class ProgressKind(StrEnum):
    FREEZE_SENT = "freeze_sent"
    BARRIER = "barrier"  # every member frozen: the cut
    MEMBER_STAGED = "member_staged"  # that member runs again
    MEMBER_UPLOADED = "member_uploaded"
    MEMBER_RESTORED = "member_restored"
    CAPTURED = "captured"  # every member uploaded, committing
    COMMITTED = "committed"
    ABORTED = "aborted"
    # Never emitted by the core: the Checkpoint servicer's step for a generation
    # committed at level local while the request waits for the store (docs/multilevel.md).
    COMMITTED_LOCAL = "committed_local"


def check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} must be a non-empty string, got {value!r}")


def check_finite(what: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(f"{what} must be a finite number of seconds, got {value!r}")


@dataclass(frozen=True)
class Timing:
    """Durations in seconds; 0 < freeze_timeout_s <= lease_s <= commit_timeout_s and
    0 < prepare_timeout_s. With a prepare phase the freeze, lease and commit deadlines
    count from the Freeze (after every agent is prepared), not from Begin."""

    lease_s: float = 10.0  # the longest any member stays frozen (the agents enforce it too)
    freeze_timeout_s: float = 5.0  # from Begin (the Freeze) to the barrier
    commit_timeout_s: float = 300.0  # from Begin (the Freeze) to COMMITTED
    prepare_timeout_s: float = 600.0  # from Begin to every agent Prepared (downloads)

    def __post_init__(self) -> None:
        for f in fields(self):
            check_finite(f.name, getattr(self, f.name))
        if not 0 < self.freeze_timeout_s <= self.lease_s <= self.commit_timeout_s:
            raise InvalidArgument(
                "timing needs 0 < freeze_timeout_s <= lease_s <= commit_timeout_s, got "
                f"{self.freeze_timeout_s}, {self.lease_s}, {self.commit_timeout_s}"
            )
        if self.prepare_timeout_s <= 0:
            raise InvalidArgument(f"prepare_timeout_s must be > 0, got {self.prepare_timeout_s}")


@dataclass(frozen=True)
class Deadlines:
    """Absolute times on the driver's clock, set by Begin."""

    freeze_at: float
    lease_at: float
    commit_at: float
    prepare_at: float = math.inf  # a prepare phase: every agent Prepared by then


MAX_WARNINGS = 64  # kernel_warnings per member report, at most
MAX_WARNING = 1000  # characters of one


@dataclass(frozen=True)
class Stats:
    """What an agent reports for a member; each report fills the fields it knows."""

    pages: int = 0  # pages captured (changed and present), zero pages included
    bytes_logical: int = 0  # pages * page size
    bytes_stored_new: int = 0  # compressed bytes the store did not have before
    frozen_seconds: float = 0.0  # the member's downtime: freeze + barrier + own copy
    pages_written: int = 0  # restore: pages written (the differing ones, or all)
    bytes_prefetched: int = 0  # restore: page bytes downloaded before the freeze
    read_direct: int = 0  # restore: 1 when the agent read the packs itself (total: members)
    # restore in place: how the kernel side differs from the cut without refusing
    # (nodeagent/restore/kernel_check.py), as the agent words it; shown by the CLI
    kernel_warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "kernel_warnings":
                ok = isinstance(v, tuple) and len(v) <= MAX_WARNINGS
                if not ok or not all(isinstance(w, str) and len(w) <= MAX_WARNING for w in v):
                    raise InvalidArgument(
                        f"stats field {f.name}: at most {MAX_WARNINGS} strings of at most "
                        f"{MAX_WARNING} characters"
                    )
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf:
                raise InvalidArgument(f"stats field {f.name} must be >= 0, got {v!r}")

    def merge(self, other: Stats) -> Stats:
        """Field-wise maximum: a later report never shrinks what an earlier one said
        (warnings: both, each once)."""
        nums = {
            f.name: max(getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if f.name != "kernel_warnings"
        }
        seen = dict.fromkeys((*self.kernel_warnings, *other.kernel_warnings))
        return replace(Stats(**nums), kernel_warnings=tuple(seen)[:MAX_WARNINGS])

    @staticmethod
    def total(stats: Iterable[Stats]) -> Stats:
        """Sums, except frozen_seconds: the longest downtime of any member."""
        items = list(stats)
        return Stats(
            sum(s.pages for s in items),
            sum(s.bytes_logical for s in items),
            sum(s.bytes_stored_new for s in items),
            max((s.frozen_seconds for s in items), default=0.0),
            sum(s.pages_written for s in items),
            sum(s.bytes_prefetched for s in items),
            sum(s.read_direct for s in items),
        )  # warnings are per member: not totalled


@dataclass(frozen=True)
class Spec:
    """What the driver asks for: job, generation number, members and their nodes."""

    job: str
    generation: int  # checkpoint: the new number; restore: the generation written back
    members: tuple[tuple[str, str], ...]  # (member, node), in a stable order
    kind: Kind = Kind.CHECKPOINT
    full: bool = False  # checkpoint: capture every page, not only the changed ones
    # A prepare phase before the Freeze (Prepare to every node, Freeze once all answered
    # Prepared): a restore prefetches what it will write; a checkpoint could pre-copy.
    prepare: bool = False
    timing: Timing = field(default_factory=Timing)

    def __post_init__(self) -> None:
        check_name("job", self.job)
        if isinstance(self.generation, bool) or not isinstance(self.generation, int):
            raise InvalidArgument(f"generation must be an integer, got {self.generation!r}")
        if self.generation < 1:
            raise InvalidArgument(f"generation must be >= 1, got {self.generation}")
        if not self.members:
            raise InvalidArgument(f"job {self.job} has no members")
        for member, node in self.members:
            check_name("member", member)
            check_name("node", node)
        names = [m for m, _ in self.members]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"duplicate member in job {self.job}: {sorted(names)}")

    @classmethod
    def of(cls, job: str, generation: int, members: Mapping[str, str], **kw: object) -> Spec:
        return cls(job, generation, tuple(members.items()), **kw)  # type: ignore[arg-type]

    @cached_property
    def nodes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for _, n in self.members))

    # Lookups by name and by node, built once: the core handles one event per member
    # report, so a scan of every member per event is quadratic in the job's size.
    @cached_property
    def index(self) -> dict[str, int]:
        """Member name -> its position in `members` (and in Snapshot.members)."""
        return {m: i for i, (m, _) in enumerate(self.members)}

    @cached_property
    def _by_node(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for m, n in self.members:
            out.setdefault(n, []).append(m)
        return {n: tuple(ms) for n, ms in out.items()}

    def members_on(self, node: str) -> tuple[str, ...]:
        return self._by_node.get(node, ())

    @property
    def done_state(self) -> MemberState:
        """The member state after which its agent is no longer needed."""
        return MemberState.RESTORED if self.kind is Kind.RESTORE else MemberState.UPLOADED


@dataclass(frozen=True)
class MemberRecord:
    name: str
    node: str
    state: MemberState = MemberState.PENDING
    stats: Stats = field(default_factory=Stats)


@dataclass(frozen=True)
class Snapshot:
    """The whole state of one generation; a transition makes a new one."""

    spec: Spec
    state: GenState
    members: tuple[MemberRecord, ...]
    lost: frozenset[str] = frozenset()  # nodes whose control stream broke
    prepared: frozenset[str] = frozenset()  # nodes that answered the Prepare
    deadlines: Deadlines | None = None
    reason: AbortReason | None = None
    detail: str = ""

    @classmethod
    def start(cls, spec: Spec) -> Snapshot:
        return cls(spec, GenState.NEW, tuple(MemberRecord(m, n) for m, n in spec.members))

    def member(self, name: str) -> MemberRecord | None:
        i = self.spec.index.get(name)
        return None if i is None else self.members[i]

    @cached_property
    def _counts(self) -> dict[MemberState, int]:
        out = dict.fromkeys(MemberState, 0)
        for m in self.members:
            out[m.state] += 1
        return out

    def count(self, state: MemberState) -> int:
        """Members in `state` (kept up to date by `with_members`, else counted once)."""
        return self._counts[state]

    def with_members(self, recs: Iterable[MemberRecord]) -> Snapshot:
        """This snapshot with the given members' records replaced (by name), in O(k)
        besides one copy of the member tuple."""
        members = list(self.members)
        counts = dict(self._counts)
        idx = self.spec.index
        for r in recs:
            i = idx[r.name]
            counts[members[i].state] -= 1
            counts[r.state] += 1
            members[i] = r
        new = replace(self, members=tuple(members))
        new.__dict__["_counts"] = counts  # cached_property's slot, filled ahead
        return new

    def totals(self) -> Stats:
        return Stats.total(m.stats for m in self.members)
