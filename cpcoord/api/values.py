"""What `cpcoord.api.Client` returns: frozen dataclasses and string enums, no protobufs.

Enum values are the lower-case suffixes of the proto enums (`ProgressKind.BARRIER` is
"barrier", proto PROGRESS_KIND_BARRIER), so they compare equal to plain strings and
print well in JSON. A value a newer coordinator sends that this client does not know
reads as UNSPECIFIED (the compatibility rule of docs/api.md). Times are milliseconds
since the Unix epoch (0 = not set); sizes are bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt


class _Enum(enum.StrEnum):
    @classmethod
    def _missing_(cls, value: object) -> _Enum:
        return cls("unspecified")


class ProgressKind(_Enum):
    UNSPECIFIED = "unspecified"
    FREEZE_SENT = "freeze_sent"  # Freeze went to every agent; the number is known
    BARRIER = "barrier"  # every member frozen: the cut
    MEMBER_STAGED = "member_staged"  # a member's copy is staged, it runs again
    MEMBER_UPLOADED = "member_uploaded"  # a member's pages are stored
    MEMBER_RESTORED = "member_restored"  # restore: a member's pages are written
    CAPTURED = "captured"  # every member uploaded; committing
    COMMITTED = "committed"  # terminal
    ABORTED = "aborted"  # terminal, see reason
    COMMITTED_LOCAL = "committed_local"  # committed at level local; waiting for store


class GenerationState(_Enum):
    UNSPECIFIED = "unspecified"
    NEW = "new"
    PREPARING = "preparing"
    FROZEN = "frozen"
    CAPTURED = "captured"
    COMMITTED = "committed"
    ABORTED = "aborted"


class AbortReason(_Enum):
    UNSPECIFIED = "unspecified"
    AGENT_LOST = "agent_lost"
    MEMBER_DIED = "member_died"
    FREEZE_FAILED = "freeze_failed"
    FREEZE_TIMEOUT = "freeze_timeout"
    LEASE_EXPIRED = "lease_expired"
    COMMIT_TIMEOUT = "commit_timeout"
    CAPTURE_FAILED = "capture_failed"
    UPLOAD_FAILED = "upload_failed"
    BAD_DATA = "bad_data"
    STORE_ERROR = "store_error"
    CANCELLED = "cancelled"
    MISMATCH = "mismatch"
    RESTORE_FAILED = "restore_failed"
    PREPARE_TIMEOUT = "prepare_timeout"
    KERNEL_STATE = "kernel_state"


class MemberHealth(_Enum):
    UNSPECIFIED = "unspecified"
    RUNNING = "running"
    GONE = "gone"
    AGENT_DISCONNECTED = "agent_disconnected"


class WatchKind(_Enum):
    UNSPECIFIED = "unspecified"
    AGENT_CONNECTED = "agent_connected"
    AGENT_DISCONNECTED = "agent_disconnected"
    MEMBER_ATTACHED = "member_attached"
    MEMBER_DETACHED = "member_detached"
    MEMBER_GONE = "member_gone"
    CHECKPOINT_PROGRESS = "checkpoint_progress"
    GENERATION_COMMITTED = "generation_committed"
    GENERATION_ABORTED = "generation_aborted"
    GENERATION_DELETED = "generation_deleted"
    RESTORE_PROGRESS = "restore_progress"
    GENERATION_STARTED = "generation_started"
    GENERATION_FROZEN = "generation_frozen"
    GC_RAN = "gc_ran"
    RESTORE_STARTED = "restore_started"
    RESTORE_ENDED = "restore_ended"
    GENERATION_LEVEL = "generation_level"
    GENERATION_LOST = "generation_lost"


class Level(_Enum):
    """A committed generation's durability level (docs/multilevel.md)."""

    LOCAL = "local"
    PARTNER = "partner"
    STORE = "store"


# -- jobs, members, agents ------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    name: str
    start: int  # first byte (page aligned)
    end: int  # one past the last byte
    pages: tuple[tuple[int, int], ...] = ()  # GenerationDetail: (offset, count) runs present

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Member:
    job: str
    name: str
    node: str
    pid: int
    start_time: int  # clock ticks since boot, as in /proc/PID/stat
    regions: tuple[Region, ...]
    health: MemberHealth
    tracker: str = ""
    attached_unix_ms: int = 0
    detail: str = ""
    group: str = ""  # tree group (`attach --tree`): the root member's name; "" none


@dataclass(frozen=True)
class Generation:
    """A generation as the catalog records it (GenerationInfo)."""

    job: str
    number: int
    parent: int | None
    state: GenerationState
    reason: AbortReason = AbortReason.UNSPECIFIED
    detail: str = ""
    started_unix_ms: int = 0
    finished_unix_ms: int = 0
    pinned: bool = False
    members: int = 0
    pages: int = 0
    zero_pages: int = 0
    bytes_logical: int = 0
    bytes_stored: int = 0
    bytes_new: int = 0
    pages_captured: int = 0
    frozen_seconds: float = 0.0
    seconds: float = 0.0
    full: bool = False
    level: Level = Level.STORE
    lost: str = ""  # committed but unrestorable: why (a node cache lost); "" = not lost
    cache_nodes: tuple[str, ...] = ()  # level local: nodes whose caches it still needs

    @property
    def committed(self) -> bool:
        return self.state is GenerationState.COMMITTED


@dataclass(frozen=True)
class Job:
    name: str
    members: tuple[Member, ...]
    last_committed: Generation | None
    in_flight: int  # generation being checkpointed or restored; 0 = none
    generations: int  # committed generations kept


@dataclass(frozen=True)
class Tracker:
    name: str
    available: bool
    reason: str = ""


@dataclass(frozen=True)
class Agent:
    node: str
    version: str
    capabilities: tuple[str, ...]
    trackers: tuple[Tracker, ...]
    connected: bool
    connected_unix_ms: int
    members: int
    peer: str


# -- progress ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberStats:
    pages: int = 0
    zero_pages: int = 0
    bytes_logical: int = 0
    bytes_stored_new: int = 0
    frozen_seconds: float = 0.0
    tracker: str = ""
    full: bool = False


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a checkpoint or restore; the last one is COMMITTED or ABORTED."""

    kind: ProgressKind
    job: str
    generation: int
    member: str = ""  # MEMBER_* events
    node: str = ""  # MEMBER_* events
    stats: MemberStats | None = None  # MEMBER_* events
    members_done: int = 0
    members_total: int = 0
    reason: AbortReason = AbortReason.UNSPECIFIED
    detail: str = ""
    elapsed_seconds: float = 0.0
    info: Generation | None = None  # checkpoint COMMITTED/ABORTED: as recorded

    @property
    def final(self) -> bool:
        return self.kind in (ProgressKind.COMMITTED, ProgressKind.ABORTED)


@dataclass(frozen=True)
class RestoreResult:
    job: str
    generation: int
    committed: bool  # written and thawed; False: aborted, nothing written
    reason: AbortReason
    detail: str
    members: tuple[str, ...]  # members written
    events: tuple[ProgressEvent, ...]


# -- generations --------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberGeneration:
    member: str
    node: str
    regions: tuple[Region, ...]  # with the runs of pages present at the cut
    stats: MemberStats
    threads: int = 0


@dataclass(frozen=True)
class GenerationDetail:
    info: Generation
    members: tuple[MemberGeneration, ...]


@dataclass(frozen=True)
class RegionDiff:
    """How one region changed from generation A to B (runs merged over messages)."""

    member: str
    region: str
    added: bool
    removed: bool
    changed: tuple[tuple[int, int], ...]  # (offset, count) runs, pages from the region start
    pages_changed: int
    bytes_changed: int


@dataclass(frozen=True)
class RegionPages:
    """Pages of one region of a generation: `pages[i]` is the page offset from `start`
    of row `data[i]`; `zero[i]` marks an all-zero page."""

    name: str
    start: int
    end: int
    pages: npt.NDArray[np.uint64]
    data: npt.NDArray[np.uint8]  # (len(pages), page_size)
    zero: npt.NDArray[np.bool_]

    def bytes_at(self, first: int, count: int, page_size: int) -> npt.NDArray[np.uint8]:
        """Rows for pages first..first+count-1 (absent pages read as zero)."""
        out = np.zeros((count, page_size), dtype=np.uint8)
        idx = self.pages.astype(np.int64) - first
        keep = (idx >= 0) & (idx < count)
        out[idx[keep]] = self.data[keep]
        return out


@dataclass(frozen=True)
class MemberPages:
    """One member's pages of a generation (ReadGeneration), checked against their ids."""

    job: str
    generation: int
    member: str
    node: str
    page_size: int
    regions: tuple[RegionPages, ...]

    def region(self, name: str) -> RegionPages:
        """By name: one dict lookup (a member may have tens of thousands of regions)."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(name) from None

    @cached_property
    def _by_name(self) -> dict[str, RegionPages]:
        return {r.name: r for r in self.regions}


# -- upkeep ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GcReport:
    dropped: tuple[tuple[str, int], ...] = ()  # (job, generation) removed by retention
    chunks_dropped: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    bytes_freed: int = 0
    orphan_manifests: int = 0


@dataclass(frozen=True)
class ForgottenNode:
    """What `Client.forget_node` gave up: generations lost with the node's cache (each
    with its `lost` reason), its undrained packs, and the members ("job/member") still
    attached there (their jobs' checkpoints need the node until they are detached)."""

    node: str
    lost: tuple[Generation, ...] = ()
    packs: int = 0
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class Damage:
    job: str
    generation: int
    member: str
    chunks: int
    first_chunk: str
    why: str


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    chunks_checked: int
    bytes_read: int
    generations: int
    damage: tuple[Damage, ...] = ()
    damaged_packs: tuple[str, ...] = ()


@dataclass(frozen=True)
class StoreStats:
    chunks: int
    packs: int
    pack_bytes: int
    chunk_bytes: int
    stored_chunk_bytes: int
    generations: int
    logical_bytes: int
    index_memory_bytes: int
    dedup_ratio: float
    compression_ratio: float


# -- watch ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WatchEvent:
    kind: WatchKind
    seq: int  # the coordinator's event number
    time_unix_ms: int
    job: str = ""
    member: str = ""
    node: str = ""
    generation: int = 0
    reason: AbortReason = AbortReason.UNSPECIFIED
    detail: str = ""
    info: Generation | None = None  # GENERATION_COMMITTED / _ABORTED
    progress: ProgressEvent | None = None  # CHECKPOINT_PROGRESS / RESTORE_PROGRESS
    gc: GcReport | None = None  # GC_RAN
    lost: int = 0  # events this watch missed just before this one (it read too slowly)
