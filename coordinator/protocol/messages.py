"""The messages of the protocol core (coordinator/protocol/table.py): events in, commands out.

Frozen dataclasses, validated on construction (a bad field raises InvalidArgument and
builds nothing). Events are what the driver heard (agents, store, client, clock);
commands are what it must do. docs/protocol.md maps each to its wire message.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

from coordinator.protocol.values import (
    AGENT_REASONS,
    AbortReason,
    Kind,
    ProgressKind,
    Stats,
    check_finite,
    check_name,
)
from cpcoord.errors import InvalidArgument

# -- events in -----------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """Base of every event. Fields named `node` (and `member`, unless the class lets it be
    empty) must be non-empty strings, `now` a finite number."""

    optional_member: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "node" or (f.name == "member" and not self.optional_member):
                check_name(f.name, v)
            elif f.name == "now":
                check_finite("now", v)


@dataclass(frozen=True)
class Begin(Event):
    now: float


@dataclass(frozen=True)
class AgentPrepared(Event):
    """An agent is ready for the Freeze (a restore: its members' pages are prefetched).
    `now`: the driver's clock when it heard it (the Freeze's deadlines start there)."""

    node: str
    now: float
    members: tuple[str, ...] = ()  # empty: every member of the job on this node


@dataclass(frozen=True)
class AgentFrozen(Event):
    node: str
    members: tuple[str, ...] = ()  # empty: every member of the job on this node


@dataclass(frozen=True)
class FreezeFailed(Event):
    node: str
    member: str = ""  # empty: the node's members
    detail: str = ""

    optional_member = True


@dataclass(frozen=True)
class _MemberReport(Event):
    node: str
    member: str
    stats: Stats = field(default_factory=Stats)


@dataclass(frozen=True)
class MemberStaged(_MemberReport):
    """The member's copy is in staging and the agent has thawed it."""


@dataclass(frozen=True)
class MemberUploaded(_MemberReport):
    """Every page of the member is stored (the agent's Uploaded, DESIGN's Captured)."""


@dataclass(frozen=True)
class MemberRestored(_MemberReport):
    """Restore: the member's pages are written; it stays frozen until Thaw."""


@dataclass(frozen=True)
class MemberFailed(Event):
    """A capture, upload or restore failure of a member (reported by its agent or by the
    upload servicer, e.g. bad_data)."""

    node: str
    member: str  # empty: the node's members
    reason: AbortReason
    detail: str = ""

    optional_member = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reason not in AGENT_REASONS:
            raise InvalidArgument(f"a member failure cannot have reason {self.reason!r}")


@dataclass(frozen=True)
class MemberGone(Event):
    node: str
    member: str
    detail: str = ""  # e.g. "exited with status 9"


@dataclass(frozen=True)
class AgentLost(Event):
    node: str
    detail: str = ""


@dataclass(frozen=True)
class Tick(Event):
    now: float


@dataclass(frozen=True)
class StoreCommitted(Event):
    """The manifest is durable and the catalog flipped the generation to COMMITTED."""


@dataclass(frozen=True)
class StoreFailed(Event):
    detail: str = ""


@dataclass(frozen=True)
class Cancel(Event):
    detail: str = ""


EVENT_TYPES: tuple[type[Event], ...] = (
    Begin,
    AgentPrepared,
    AgentFrozen,
    FreezeFailed,
    MemberStaged,
    MemberUploaded,
    MemberRestored,
    MemberFailed,
    MemberGone,
    AgentLost,
    Tick,
    StoreCommitted,
    StoreFailed,
    Cancel,
)


# -- commands out ---------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """Base of every command."""


@dataclass(frozen=True)
class SendPrepare(Command):
    """Get ready before the Freeze, nothing frozen (a restore: prefetch the pages)."""

    node: str
    job: str
    generation: int
    kind: Kind
    members: tuple[str, ...]


@dataclass(frozen=True)
class SendFreeze(Command):
    node: str
    job: str
    generation: int
    kind: Kind
    lease_s: float  # the agent thaws by itself this long after it froze
    members: tuple[str, ...]


@dataclass(frozen=True)
class SendCapture(Command):
    node: str
    job: str
    generation: int
    full: bool
    members: tuple[str, ...]


@dataclass(frozen=True)
class SendRestore(Command):
    node: str
    job: str
    generation: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class SendThaw(Command):
    node: str
    job: str
    generation: int


@dataclass(frozen=True)
class SendAbort(Command):
    """Thaw what is frozen, drop staging, keep the captured changed sets as pending."""

    node: str
    job: str
    generation: int
    reason: AbortReason
    detail: str


@dataclass(frozen=True)
class SendCommitted(Command):
    """The agent may forget the changed sets this generation captured."""

    node: str
    job: str
    generation: int


@dataclass(frozen=True)
class Commit(Command):
    """Write the manifest, fsync, flip the catalog; answer StoreCommitted or StoreFailed."""

    job: str
    generation: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class DropGeneration(Command):
    """Mark the generation aborted in the catalog (if the catalog knows it) and forget its
    upload sessions; its chunks are garbage for gc."""

    job: str
    generation: int
    reason: AbortReason


@dataclass(frozen=True)
class ProgressEvent:
    kind: ProgressKind
    job: str
    generation: int
    member: str = ""
    node: str = ""
    stats: Stats | None = None
    done: int = 0  # members done (uploaded / restored) so far
    total: int = 0  # members in the generation
    reason: AbortReason | None = None
    detail: str = ""


@dataclass(frozen=True)
class EmitProgress(Command):
    event: ProgressEvent
