"""The one error hierarchy of cpcoord.

Modeled on borg: each class's docstring is its message (a str.format template filled with
the constructor's arguments), `exit_code` is what the CLI exits with, and `status` names
the gRPC status code a servicer converts it to. Conversion happens only in the CLI entry
point and in servicers (cpcoord.grpcutil), nowhere else.

Exit codes (also in docs/exit-codes.md):
  0 success, 1 unexpected error, 2 usage error (argparse),
  10-19 process and capture errors, 20-29 ranges and input, 30-39 files and images,
  40-49 trackers, 50-59 coordinator and protocol, 60-69 store,
  70-79 coordinator service and clients, 140-144 coordinator replicas (high availability),
  145-146 restore refused for the kernel side,
  150-154 the data plane (agents that put packs themselves).
"""

from __future__ import annotations

from typing import ClassVar


class CpcoordError(Exception):
    """Error: {}"""

    exit_code: ClassVar[int] = 1
    status: ClassVar[str] = "INTERNAL"

    def message(self) -> str:
        template = (self.__doc__ or "{}").strip().splitlines()[0]
        try:
            return template.format(*self.args)
        except (IndexError, KeyError, ValueError):
            return f"{template} {self.args!r}"

    def __str__(self) -> str:
        return self.message()


# -- processes (10-19) --------------------------------------------------------------


class NoSuchProcess(CpcoordError):
    """no such process: pid {}"""

    exit_code = 10
    status = "NOT_FOUND"


class PidReused(CpcoordError):
    """pid {} was reused: expected start time {}, found {}"""

    exit_code = 11
    status = "FAILED_PRECONDITION"


class PermissionDenied(CpcoordError):
    """permission denied: cannot {} pid {} ({})"""

    exit_code = 12
    status = "PERMISSION_DENIED"


class ProcessExited(CpcoordError):
    """process {} exited during {}"""

    exit_code = 13
    status = "ABORTED"


class FreezeFailed(CpcoordError):
    """cannot freeze pid {}: {}"""

    exit_code = 14
    status = "FAILED_PRECONDITION"


_OURS = frozenset({"cpcoord", "nodeagent", "storecore", "coordinator"})  # our packages


class AgentStepFailed(CpcoordError):
    """the agent could not {}: an unexpected {} (the agent log has the details)"""

    exit_code = 16
    status = "INTERNAL"

    @classmethod
    def of(cls, what: str, e: BaseException) -> AgentStepFailed:
        """For a bug: the exception's type and the line it was raised at (a file and a
        line number, never a value), so a report names where without the agent's log."""
        at = ""
        tb = e.__traceback__
        while tb is not None:  # the innermost frame of this project's code
            parts = tb.tb_frame.f_code.co_filename.replace("\\", "/").split("/")
            if at == "" or not _OURS.isdisjoint(parts[:-1]):
                at = f" at {'/'.join(parts[-2:])}:{tb.tb_lineno}"
            tb = tb.tb_next
        return cls(what, f"{type(e).__name__}{at}")


class ReadFailed(CpcoordError):
    """cannot read memory of pid {} at {}: {}"""

    exit_code = 15
    status = "INTERNAL"


# -- ranges and input (20-29) --------------------------------------------------------


class InvalidArgument(CpcoordError):
    """invalid argument: {}"""

    exit_code = 20
    status = "INVALID_ARGUMENT"


class RangeSyntax(InvalidArgument):
    """bad range {!r}: expected START-END, hex (0x7f00...) or decimal"""

    exit_code = 21


class RangeEmpty(InvalidArgument):
    """range {} is empty: it holds no whole page"""

    exit_code = 22


class RangeInverted(InvalidArgument):
    """range {} is inverted: end is before start"""

    exit_code = 23


class RangeUnmapped(InvalidArgument):
    """range {} is not mapped in pid {}"""

    exit_code = 24


class RangeBeyondAddressSpace(InvalidArgument):
    """range {} lies beyond the user address space (ends at {})"""

    exit_code = 25


class InvalidName(InvalidArgument):
    """invalid name {!r}: use 1-64 characters from [A-Za-z0-9._-], not starting with '.'"""

    exit_code = 26


class RangesOverlap(InvalidArgument):
    """ranges {} and {} overlap: give each page to one range only"""

    exit_code = 27


# -- files and images (30-39) --------------------------------------------------------


class OutputNotWritable(CpcoordError):
    """cannot write output directory {}: {}"""

    exit_code = 30
    status = "FAILED_PRECONDITION"


class ImageInvalid(CpcoordError):
    """invalid image {}: {}"""

    exit_code = 31
    status = "INVALID_ARGUMENT"


class ImageMismatch(CpcoordError):
    """image {} does not fit: {}"""

    exit_code = 32
    status = "FAILED_PRECONDITION"


class OutputNotEmpty(CpcoordError):
    """output directory {} is not empty: refusing to overwrite what it holds"""

    exit_code = 33
    status = "ALREADY_EXISTS"


# -- trackers (40-49) -----------------------------------------------------------------


class TrackerUnavailable(CpcoordError):
    """tracker {} is not available: {}"""

    exit_code = 40
    status = "FAILED_PRECONDITION"


class TrackerFailed(CpcoordError):
    """tracker {} failed on pid {}: {}"""

    exit_code = 41
    status = "INTERNAL"


class NoKernelTracker(CpcoordError):
    """no kernel-assisted tracker works here ({}): incremental captures would read every page"""

    exit_code = 42
    status = "FAILED_PRECONDITION"


# uffd-wp tracker: 45-49 (40-44 belong to the generic and soft-dirty trackers).


class InjectionFailed(TrackerFailed):
    """syscall injection into pid {} failed at {}: {}"""

    exit_code = 45
    status = "INTERNAL"


class UffdLost(TrackerFailed):
    """uffd-wp lost track of pid {}: {} (the next capture must be full)"""

    exit_code = 46
    status = "FAILED_PRECONDITION"


class UffdScanFailed(TrackerFailed):
    """PAGEMAP_SCAN of pid {} failed over {}: {}"""

    exit_code = 47
    status = "INTERNAL"


# -- store (60-69) --------------------------------------------------------------------


class StoreError(CpcoordError):
    """store error: {}"""

    exit_code = 60
    status = "INTERNAL"


class ObjectNotFound(StoreError):
    """store object {}/{} not found"""

    exit_code = 61
    status = "NOT_FOUND"


class ChunkMismatch(StoreError):
    """chunk {} does not match its content (BLAKE3 of the bytes is {}): nothing stored"""

    exit_code = 62
    status = "INVALID_ARGUMENT"


class DataCorrupted(StoreError):
    """damaged {} {}: {}"""

    exit_code = 63
    status = "DATA_LOSS"


class ChunkMissing(StoreError):
    """{} chunk(s) referenced by generation {} of job {} are not in the store (first: {})"""

    exit_code = 64
    status = "FAILED_PRECONDITION"


class StoreLocked(StoreError):
    """store {} is in use by another process: {}"""

    exit_code = 65
    status = "UNAVAILABLE"


class NoSuchGeneration(StoreError):
    """generation {} of job {} not found"""

    exit_code = 66
    status = "NOT_FOUND"


class GenerationStateError(StoreError):
    """generation {} of job {}: cannot {} ({})"""

    exit_code = 67
    status = "FAILED_PRECONDITION"


class ManifestInvalid(StoreError):
    """invalid manifest for generation {} of job {}: {}"""

    exit_code = 68
    status = "INVALID_ARGUMENT"


class StoreInvalid(StoreError):
    """store {} cannot be used: {}"""

    exit_code = 69
    status = "FAILED_PRECONDITION"


# -- coordinator and protocol (50-59) -------------------------------------------------
# An unknown generation is the store's NoSuchGeneration (66).


class ProtocolViolation(CpcoordError):
    """protocol: {} refused in state {} of job {} generation {}: {}"""

    exit_code = 50
    status = "FAILED_PRECONDITION"


class UnknownMember(CpcoordError):
    """job {} has no member {!r} {}"""

    exit_code = 51
    status = "NOT_FOUND"


class GenerationAborted(CpcoordError):
    """generation {} of job {} aborted: {} ({})"""

    exit_code = 52
    status = "ABORTED"


class CancelTooLate(CpcoordError):
    """cannot cancel generation {} of job {}: it is {}"""

    exit_code = 53
    status = "FAILED_PRECONDITION"


class UnknownJob(CpcoordError):
    """no such job: {!r}"""

    exit_code = 54
    status = "NOT_FOUND"


class RestoreAborted(CpcoordError):
    """restore of generation {} of job {} aborted: {} ({}); the generation stays as it was"""

    exit_code = 59
    status = "ABORTED"


class JobBusy(CpcoordError):
    """job {} is busy: generation {} is in flight"""

    exit_code = 56
    status = "FAILED_PRECONDITION"


class NodeConnected(CpcoordError):
    """node {!r} has a connected agent: only a node whose agent is gone can be forgotten
    (stop its agent first)"""

    exit_code = 55
    status = "FAILED_PRECONDITION"


class AgentUnavailable(CpcoordError):
    """node {!r} has no connected agent"""

    exit_code = 57
    status = "UNAVAILABLE"


class DuplicateMember(CpcoordError):
    """job {} already has a member {!r}"""

    exit_code = 58
    status = "ALREADY_EXISTS"


# -- coordinator service and clients (70-79) ------------------------------------------


class CoordinatorUnavailable(CpcoordError):
    """cannot reach the coordinator at {}: {}"""

    exit_code = 70
    status = "UNAVAILABLE"


class RemoteError(CpcoordError):
    """{} failed: {} ({})"""

    exit_code = 71
    status = "INTERNAL"


class MessageTooLarge(CpcoordError):
    """message too large: {}"""

    exit_code = 72
    status = "RESOURCE_EXHAUSTED"


class NotImplementedYet(CpcoordError):
    """{} is not implemented yet: {}"""

    exit_code = 73
    status = "UNIMPLEMENTED"


class MemberNotRunning(CpcoordError):
    """member {!r} of job {} is not running: {}"""

    exit_code = 74
    status = "FAILED_PRECONDITION"


class AgentTimeout(CpcoordError):
    """the agent of node {!r} did not answer {} within {} s"""

    exit_code = 75
    status = "DEADLINE_EXCEEDED"


class NoCoordinatorAddress(InvalidArgument):
    """no coordinator address: pass --coordinator HOST:PORT or set CPCOORD_COORDINATOR"""

    exit_code = 76


class DuplicateAgent(CpcoordError):
    """node {!r} already has a connected agent ({})"""

    exit_code = 77
    status = "ALREADY_EXISTS"


class IncompatibleAgent(CpcoordError):
    """the agent of node {!r} cannot be used: {}"""

    exit_code = 78
    status = "FAILED_PRECONDITION"


class VerifyFailed(CpcoordError):
    """verify found damage: {}"""

    exit_code = 79
    status = "DATA_LOSS"


# -- node agent (80-89) ---------------------------------------------------------------


class LeaseExpired(CpcoordError):
    """member {!r} of job {} frozen {:.2f} s without a Capture, past its lease of {} ms: thawed"""

    exit_code = 80
    status = "ABORTED"


class UploadFailed(CpcoordError):
    """upload of member {!r} of job {} generation {} failed: {}"""

    exit_code = 81
    status = "UNAVAILABLE"


class NotFrozen(CpcoordError):
    """member {!r} of job {} is not frozen for generation {}: {}"""

    exit_code = 82
    status = "FAILED_PRECONDITION"


class PidAttached(CpcoordError):
    """pid {} is already attached as member {!r} of job {}"""

    exit_code = 83
    status = "ALREADY_EXISTS"


# -- restore and local API (90-99) ----------------------------------------------------


class RegionMismatch(CpcoordError):
    """member {} does not fit the generation: region {} {}"""

    exit_code = 90
    status = "FAILED_PRECONDITION"


class RestoreRefused(CpcoordError):
    """cannot restore member {} in place: {}"""

    exit_code = 91
    status = "FAILED_PRECONDITION"


class KernelStateChanged(RestoreRefused):
    """cannot restore member {} in place: kernel side changed: {} (--force rolls back anyway)

    A rollback in place puts memory and registers back, never the kernel side (open fds,
    file offsets, pipe and socket queues): docs/restore.md says what it covers."""

    exit_code = 145
    status = "FAILED_PRECONDITION"


class RestoreRefusedKernelState(RestoreAborted):
    """restore of generation {} of job {} refused: {}

    The coordinator-driven form of KernelStateChanged: a member's agent found the kernel
    side (fds, pipe and socket queues) changed since the cut and wrote nothing; `restore
    --force` rolls back anyway."""

    exit_code = 146
    status = "FAILED_PRECONDITION"


class WriteFailed(CpcoordError):
    """cannot write memory of pid {} at {}: {}"""

    exit_code = 92
    status = "INTERNAL"


class RestoreUndone(CpcoordError):
    """restore of member {} failed and was undone ({} bytes written were put back): {}

    Its memory (and registers) are as before the restore."""

    exit_code = 87
    status = "ABORTED"


class RestoreUndoFailed(CpcoordError):
    """restore of member {} failed part-way ({}); putting back what it wrote failed: {}

    Its memory is partly the generation's, partly its own: restart it or restore again."""

    exit_code = 88
    status = "DATA_LOSS"


class ContentsInvalid(CpcoordError):
    """restore contents of member {} region {} are invalid: {}"""

    exit_code = 93
    status = "INVALID_ARGUMENT"


class ThreadStateInvalid(CpcoordError):
    """saved thread registers are invalid: {}"""

    exit_code = 94
    status = "INVALID_ARGUMENT"


class AgentSocketUnavailable(CpcoordError):
    """cannot reach the cpcoord agent at {}: {} (is it running? see CPCOORD_AGENT_SOCKET)"""

    exit_code = 95
    status = "UNAVAILABLE"


class LocalApiError(CpcoordError):
    """local API: {}"""

    exit_code = 96
    status = "INVALID_ARGUMENT"


class NotAMember(CpcoordError):
    """pid {} is not a member of any job: register first (cpcoord.client.register, cpcoord run)"""

    exit_code = 97
    status = "FAILED_PRECONDITION"


class NotPermitted(PermissionDenied):
    """not permitted: {} (caller pid {}, uid {}; only root acts on other processes and jobs)"""

    exit_code = 98
    status = "PERMISSION_DENIED"


class RegionNotRegistered(CpcoordError):
    """pid {} has no registered region {!r}"""

    exit_code = 99
    status = "NOT_FOUND"


# -- incremental chains (34-35, files and images: the parent of `capture --parent`) ---


class ParentMismatch(ImageMismatch):
    """parent image {} does not fit this capture: {}"""

    exit_code = 34
    status = "FAILED_PRECONDITION"


class ParentStale(ImageMismatch):
    """parent image {} cannot be continued: {}"""

    exit_code = 35
    status = "FAILED_PRECONDITION"


# -- demo (100-109) ---------------------------------------------------------------------


class DemoFailed(CpcoordError):
    """demo failed: {}"""

    exit_code = 100
    status = "INTERNAL"


# -- security (110-119) -----------------------------------------------------------------


class InsecureRefused(CpcoordError):
    """refusing to start without TLS: give --tls-cert/--tls-key/--tls-ca, or --insecure"""

    exit_code = 110
    status = "FAILED_PRECONDITION"


class PlaintextBindRefused(CpcoordError):
    """plaintext gRPC binds only to loopback, not {}: use TLS or --insecure-bind-any"""

    exit_code = 111
    status = "FAILED_PRECONDITION"


class TlsConfigInvalid(CpcoordError):
    """TLS configuration invalid: {}"""

    exit_code = 112
    status = "INVALID_ARGUMENT"


class Unauthenticated(CpcoordError):
    """not authenticated: {}"""

    exit_code = 113
    status = "UNAUTHENTICATED"


class Forbidden(CpcoordError):
    """forbidden: role {} may not call {}"""

    exit_code = 114
    status = "PERMISSION_DENIED"


class TokensInvalid(CpcoordError):
    """token file {} invalid: {}"""

    exit_code = 115
    status = "INVALID_ARGUMENT"


class AgentIdentityMismatch(CpcoordError):
    """agent certificate is for node {!r}, but the agent says it is node {!r}"""

    exit_code = 116
    status = "PERMISSION_DENIED"


# -- scheduler API client (120-124) -------------------------------------------------------


class CoordinatorStopping(CpcoordError):
    """the coordinator is shutting down: {}"""

    exit_code = 120
    status = "UNAVAILABLE"


class StreamIncomplete(CpcoordError):
    """the {} stream ended without its final event"""

    exit_code = 121
    status = "INTERNAL"


class TooManyWatchers(CpcoordError):
    """too many Watch streams: {} are open (the limit); close one or watch fewer"""

    exit_code = 122
    status = "RESOURCE_EXHAUSTED"


# -- CLI configuration file (125-129) -----------------------------------------------------


class ConfigInvalid(InvalidArgument):
    """config file {}: {}"""

    exit_code = 125
    status = "INVALID_ARGUMENT"


class ConfigUnreadable(CpcoordError):
    """cannot read config file {}: {}"""

    exit_code = 126
    status = "FAILED_PRECONDITION"


# -- cpcoord run and the agent's local API (84-89) -----------------------------------------


class CommandNotFound(CpcoordError):
    """cannot run {!r}: {}"""

    exit_code = 84
    status = "NOT_FOUND"


class LocalCommandTimeout(CpcoordError):
    """the agent's ptrace thread did not finish {} within {} s"""

    exit_code = 85
    status = "DEADLINE_EXCEEDED"


class LocalApiSocketUnservable(CpcoordError):
    """cannot serve the local API on {}: {}"""

    exit_code = 86
    status = "UNAVAILABLE"


# -- the Slurm integration (135-139; 130 is "interrupted") ---------------------------------


class NotInSlurmJob(CpcoordError):
    """not inside a Slurm job: {} is {}"""

    exit_code = 135
    status = "FAILED_PRECONDITION"


class SlurmCommandFailed(CpcoordError):
    """{} failed: {}"""

    exit_code = 136
    status = "INTERNAL"


# -- high availability: coordinator replicas on etcd (140-144) ------------------------------


class NotLeader(CpcoordError):
    """this coordinator is not the leader; the leader is {}"""

    exit_code = 140
    status = "UNAVAILABLE"

    @property
    def leader(self) -> str:
        """The leader's address (HOST:PORT), "" when none is known (an election runs)."""
        v = str(self.args[0]) if self.args else ""
        return "" if v in ("", "unknown") else v


class LeadershipLost(CpcoordError):
    """this coordinator lost its leadership: {}"""

    exit_code = 141
    status = "UNAVAILABLE"


class EtcdUnavailable(CpcoordError):
    """cannot use etcd at {}: {}"""

    exit_code = 142
    status = "UNAVAILABLE"


# -- data plane: agents that put packs themselves (150-154) --------------------------------


class DataPathUnavailable(CpcoordError):
    """the direct data path cannot be used on node {}: {}"""

    exit_code = 150
    status = "FAILED_PRECONDITION"


class NodeDataBad(StoreError):
    """node {} stored data that does not match its chunk ids: {}"""

    exit_code = 151
    status = "INVALID_ARGUMENT"

    @property
    def node(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotDrained(StoreError):
    """{} chunk(s) of this generation are not in the store yet: they are in the node cache
    of {} (level local); read it after the drain (cpcoord checkpoint --wait store waits for
    it)"""

    exit_code = 155
    status = "FAILED_PRECONDITION"


class CacheUnreachable(NotDrained):
    """{} chunk(s) of this generation are only in the cache of node {}, not connected now

    Level local: read it when that agent is back, or after the drain."""

    exit_code = 156
    status = "UNAVAILABLE"


class PartnerFull(StoreError):
    """partner copy of {} ({} bytes) does not fit this node's cache"""

    exit_code = 157
    status = "RESOURCE_EXHAUSTED"


class PartnerIdentityMismatch(CpcoordError):
    """partner copy refused: the caller's certificate is for node {!r}, not the sender {!r}"""

    exit_code = 158
    status = "PERMISSION_DENIED"


class PartnerNotAllowed(CpcoordError):
    """partner copy refused: node {!r} is not a sender this node takes copies from now"""

    exit_code = 159
    status = "PERMISSION_DENIED"
