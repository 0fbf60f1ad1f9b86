"""What the agent thread hands the ptrace thread (nodeagent/daemon/worker.py), and the event
messages the worker sends back: frozen values and small builders, no behaviour."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cpcoord.errors import CpcoordError
from cpcoord.gen.v1 import agent_pb2, common_pb2, types_pb2
from cpcoord.grpcutil import error_detail_fields
from nodeagent.daemon.membership import HeldMember, Key
from nodeagent.daemon.restore_ops import Layouts
from nodeagent.proc.freeze import FrozenProcess
from nodeagent.proc.procfs import ProcessIdentity
from nodeagent.restore.apply import Fitted, RegionContents
from nodeagent.restore.livebackup import LiveBackup
from nodeagent.trackers import registry

Scope = dict[str, npt.NDArray[np.uint64]]  # region name -> page offsets to write
Fetch = Callable[[Scope | None], tuple[RegionContents, ...]]


@dataclass(frozen=True)
class WorkerConfig:
    node: str = "node"
    lease_s: float = 10.0  # the agent's cap on any lease (`--lease`)
    freeze_timeout_s: float = 5.0
    default_tracker: str = registry.AUTO  # `--tracker`


@dataclass(frozen=True)
class FreezeOp:
    job: str
    generation: int
    lease_ms: int  # 0: the agent's lease
    members: tuple[str, ...]  # empty: every member of the job held here
    epoch: int
    restore: bool = False  # OPERATION_KIND_RESTORE: check each member fits the generation
    layouts: Layouts = ()  # restore: whole-memory members' regions and registers at the cut
    precopy_s: float = 0.0  # > 0: pre-copy members captured in full, for at most this long
    full: bool = False  # every member will be captured in full (pre-copy them all)
    # restore: per member, the prefetch's scope (absolute pages) to back up live first
    live: tuple[tuple[str, npt.NDArray[np.uint64]], ...] = ()


@dataclass(frozen=True)
class CaptureOp:
    job: str
    generation: int
    full: bool
    members: tuple[str, ...]
    epoch: int


@dataclass(frozen=True)
class RestoreOp:
    """Write a downloaded generation into a member frozen by a restore Freeze (or report
    `error`, the download's failure)."""

    job: str
    generation: int
    member: str
    contents: tuple[RegionContents, ...]
    error: CpcoordError | None
    epoch: int
    # Prefetched before the freeze (nodeagent/daemon/prefetch.py): the pages to write
    # per region (None: every page), the base they are relative to, a download for the
    # pages written since (frozen), and the bytes prefetched.
    scope: Scope | None = None
    base: int = 0
    fetch: Fetch | None = None
    prefetched: int = 0
    read_path: str = ""  # "direct" | "coordinator": how the pages came (Restored)


@dataclass(frozen=True)
class PeekOp:
    """A restore's prefetch: which pages of the member may differ from its tracker base
    (prefetch.written_since_base, on the ptrace thread), answered through `reply`."""

    job: str
    member: str
    base: int
    reply: Callable[[npt.NDArray[np.uint64] | None], None]


@dataclass(frozen=True)
class RestoreIntoOp:
    """Write a member's downloaded regions into another process, `regions_now[name] =
    (address, size)`; answered with a CommandResult."""

    command_id: int
    member: str
    target: ProcessIdentity | int
    regions_now: tuple[tuple[str, int, int], ...]
    contents: tuple[RegionContents, ...]
    error: CpcoordError | None
    epoch: int


@dataclass(frozen=True)
class AbortOp:
    job: str
    generation: int
    epoch: int


@dataclass(frozen=True)
class CommittedOp:
    job: str
    generation: int


@dataclass(frozen=True)
class AttachOp:
    command_id: int
    request: agent_pb2.AttachMember
    epoch: int


@dataclass(frozen=True)
class DetachOp:
    command_id: int
    job: str
    member: str
    epoch: int


@dataclass(frozen=True)
class GoneOp:
    key: Key


@dataclass(frozen=True)
class PrepareOp:
    """Size and prefault a new member's staging after its attach is answered, so its
    first Freeze does not wait for a member-sized allocation."""

    key: Key


@dataclass(frozen=True)
class DisconnectOp:
    """The control stream broke: thaw everything; pending sets stay."""


@dataclass(frozen=True)
class StopOp:
    """Thaw everything, disarm every tracker, end the thread."""


Op = (
    FreezeOp
    | CaptureOp
    | AbortOp
    | CommittedOp
    | AttachOp
    | DetachOp
    | GoneOp
    | PrepareOp
    | DisconnectOp
    | StopOp
    | RestoreOp
    | RestoreIntoOp
    | PeekOp
)


@dataclass
class FrozenEntry:
    """A member held frozen for a generation (mutable only by the worker thread)."""

    job: str
    generation: int
    fp: FrozenProcess
    started: float  # monotonic, before the first seize: downtime counts from here
    deadline: float  # monotonic: thawed by then, Capture or not
    lease_ms: int
    epoch: int
    fitted: Fitted | None = None  # a restore Freeze's member that fits the generation
    live: LiveBackup | None = None  # what its restore overwrites, backed up before the freeze
    # A descendant found at this Freeze: not in the generation, frozen with its tree group
    # so that nothing of the group runs under the cut; thawed with the group.
    passenger: bool = False


# -- messages ------------------------------------------------------------------------------

R = common_pb2.AbortReason


def reason_name(reason: int) -> str:
    return common_pb2.AbortReason.Name(reason).removeprefix("ABORT_REASON_").lower()


def error_detail(e: CpcoordError) -> common_pb2.ErrorDetail:
    return common_pb2.ErrorDetail(**error_detail_fields(e))


def process(m: HeldMember) -> types_pb2.ProcessIdentity:
    return types_pb2.ProcessIdentity(pid=m.ident.pid, start_time=m.ident.start_time)


def failed(
    job: str, gen: int, member: str, reason: int, err: CpcoordError
) -> agent_pb2.AgentMessage:
    f = agent_pb2.Failed(
        job=job,
        generation=gen,
        member=member,
        reason=reason,  # type: ignore[arg-type]
        detail=str(err),
        error=error_detail(err),
    )
    return agent_pb2.AgentMessage(failed=f)


def member_gone(m: HeldMember) -> agent_pb2.AgentMessage:
    g = agent_pb2.MemberGone(
        job=m.job,
        member=m.name,
        process=process(m),
        exit_status=m.exit_status,
        detail=m.gone_detail,
    )
    return agent_pb2.AgentMessage(member_gone=g)


def result(
    command_id: int, err: CpcoordError | None = None, member: types_pb2.Member | None = None
) -> agent_pb2.AgentMessage:
    r = agent_pb2.CommandResult(
        command_id=command_id, error=error_detail(err) if err else None, member=member
    )
    return agent_pb2.AgentMessage(result=r)
