from cpcoord.gen.v1 import agent_pb2 as _agent_pb2
from cpcoord.gen.v1 import common_pb2 as _common_pb2
from cpcoord.gen.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MemberHealth(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMBER_HEALTH_UNSPECIFIED: _ClassVar[MemberHealth]
    MEMBER_HEALTH_RUNNING: _ClassVar[MemberHealth]
    MEMBER_HEALTH_GONE: _ClassVar[MemberHealth]
    MEMBER_HEALTH_AGENT_DISCONNECTED: _ClassVar[MemberHealth]

class WatchEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WATCH_EVENT_KIND_UNSPECIFIED: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_AGENT_CONNECTED: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_AGENT_DISCONNECTED: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_MEMBER_ATTACHED: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_MEMBER_DETACHED: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_MEMBER_GONE: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_CHECKPOINT_PROGRESS: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_GENERATION_COMMITTED: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_GENERATION_ABORTED: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_GENERATION_DELETED: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_RESTORE_PROGRESS: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_GENERATION_STARTED: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_GENERATION_FROZEN: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_GC_RAN: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_RESTORE_STARTED: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_RESTORE_ENDED: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_GENERATION_LEVEL: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_GENERATION_LOST: _ClassVar[WatchEventKind]
MEMBER_HEALTH_UNSPECIFIED: MemberHealth
MEMBER_HEALTH_RUNNING: MemberHealth
MEMBER_HEALTH_GONE: MemberHealth
MEMBER_HEALTH_AGENT_DISCONNECTED: MemberHealth
WATCH_EVENT_KIND_UNSPECIFIED: WatchEventKind
WATCH_EVENT_KIND_AGENT_CONNECTED: WatchEventKind
WATCH_EVENT_KIND_AGENT_DISCONNECTED: WatchEventKind
WATCH_EVENT_KIND_MEMBER_ATTACHED: WatchEventKind
WATCH_EVENT_KIND_MEMBER_DETACHED: WatchEventKind
WATCH_EVENT_KIND_MEMBER_GONE: WatchEventKind
WATCH_EVENT_KIND_CHECKPOINT_PROGRESS: WatchEventKind
WATCH_EVENT_KIND_GENERATION_COMMITTED: WatchEventKind
WATCH_EVENT_KIND_GENERATION_ABORTED: WatchEventKind
WATCH_EVENT_KIND_GENERATION_DELETED: WatchEventKind
WATCH_EVENT_KIND_RESTORE_PROGRESS: WatchEventKind
WATCH_EVENT_KIND_GENERATION_STARTED: WatchEventKind
WATCH_EVENT_KIND_GENERATION_FROZEN: WatchEventKind
WATCH_EVENT_KIND_GC_RAN: WatchEventKind
WATCH_EVENT_KIND_RESTORE_STARTED: WatchEventKind
WATCH_EVENT_KIND_RESTORE_ENDED: WatchEventKind
WATCH_EVENT_KIND_GENERATION_LEVEL: WatchEventKind
WATCH_EVENT_KIND_GENERATION_LOST: WatchEventKind

class MemberInfo(_message.Message):
    __slots__ = ("job", "name", "node", "process", "regions", "health", "tracker", "attached_unix_ms", "detail", "group")
    JOB_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    TRACKER_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    job: str
    name: str
    node: str
    process: _types_pb2.ProcessIdentity
    regions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Region]
    health: MemberHealth
    tracker: str
    attached_unix_ms: int
    detail: str
    group: str
    def __init__(self, job: _Optional[str] = ..., name: _Optional[str] = ..., node: _Optional[str] = ..., process: _Optional[_Union[_types_pb2.ProcessIdentity, _Mapping]] = ..., regions: _Optional[_Iterable[_Union[_types_pb2.Region, _Mapping]]] = ..., health: _Optional[_Union[MemberHealth, str]] = ..., tracker: _Optional[str] = ..., attached_unix_ms: _Optional[int] = ..., detail: _Optional[str] = ..., group: _Optional[str] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("name", "members", "last_committed", "in_flight", "generations")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    members: _containers.RepeatedCompositeFieldContainer[MemberInfo]
    last_committed: GenerationInfo
    in_flight: int
    generations: int
    def __init__(self, name: _Optional[str] = ..., members: _Optional[_Iterable[_Union[MemberInfo, _Mapping]]] = ..., last_committed: _Optional[_Union[GenerationInfo, _Mapping]] = ..., in_flight: _Optional[int] = ..., generations: _Optional[int] = ...) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("node", "version", "capabilities", "trackers", "connected", "connected_unix_ms", "members", "peer")
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    TRACKERS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    node: str
    version: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    trackers: _containers.RepeatedCompositeFieldContainer[_agent_pb2.TrackerBackend]
    connected: bool
    connected_unix_ms: int
    members: int
    peer: str
    def __init__(self, node: _Optional[str] = ..., version: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., trackers: _Optional[_Iterable[_Union[_agent_pb2.TrackerBackend, _Mapping]]] = ..., connected: _Optional[bool] = ..., connected_unix_ms: _Optional[int] = ..., members: _Optional[int] = ..., peer: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentInfo]
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentInfo, _Mapping]]] = ...) -> None: ...

class AttachMemberRequest(_message.Message):
    __slots__ = ("job", "member", "process", "node", "regions", "tracker", "tree")
    JOB_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    TRACKER_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    job: str
    member: str
    process: _types_pb2.ProcessIdentity
    node: str
    regions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Region]
    tracker: str
    tree: bool
    def __init__(self, job: _Optional[str] = ..., member: _Optional[str] = ..., process: _Optional[_Union[_types_pb2.ProcessIdentity, _Mapping]] = ..., node: _Optional[str] = ..., regions: _Optional[_Iterable[_Union[_types_pb2.Region, _Mapping]]] = ..., tracker: _Optional[str] = ..., tree: _Optional[bool] = ...) -> None: ...

class AttachMemberResponse(_message.Message):
    __slots__ = ("member",)
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    member: MemberInfo
    def __init__(self, member: _Optional[_Union[MemberInfo, _Mapping]] = ...) -> None: ...

class DetachMemberRequest(_message.Message):
    __slots__ = ("job", "member")
    JOB_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    job: str
    member: str
    def __init__(self, job: _Optional[str] = ..., member: _Optional[str] = ...) -> None: ...

class DetachMemberResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GenerationInfo(_message.Message):
    __slots__ = ("job", "number", "parent", "state", "reason", "detail", "started_unix_ms", "finished_unix_ms", "pinned", "members", "pages", "zero_pages", "bytes_logical", "bytes_stored", "bytes_new", "pages_captured", "frozen_seconds", "seconds", "full", "data_paths", "level", "lost", "cache_nodes")
    class DataPathsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    ZERO_PAGES_FIELD_NUMBER: _ClassVar[int]
    BYTES_LOGICAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_STORED_FIELD_NUMBER: _ClassVar[int]
    BYTES_NEW_FIELD_NUMBER: _ClassVar[int]
    PAGES_CAPTURED_FIELD_NUMBER: _ClassVar[int]
    FROZEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    DATA_PATHS_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    CACHE_NODES_FIELD_NUMBER: _ClassVar[int]
    job: str
    number: int
    parent: int
    state: _common_pb2.GenerationState
    reason: _common_pb2.AbortReason
    detail: str
    started_unix_ms: int
    finished_unix_ms: int
    pinned: bool
    members: int
    pages: int
    zero_pages: int
    bytes_logical: int
    bytes_stored: int
    bytes_new: int
    pages_captured: int
    frozen_seconds: float
    seconds: float
    full: bool
    data_paths: _containers.ScalarMap[str, str]
    level: _common_pb2.DurabilityLevel
    lost: str
    cache_nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job: _Optional[str] = ..., number: _Optional[int] = ..., parent: _Optional[int] = ..., state: _Optional[_Union[_common_pb2.GenerationState, str]] = ..., reason: _Optional[_Union[_common_pb2.AbortReason, str]] = ..., detail: _Optional[str] = ..., started_unix_ms: _Optional[int] = ..., finished_unix_ms: _Optional[int] = ..., pinned: _Optional[bool] = ..., members: _Optional[int] = ..., pages: _Optional[int] = ..., zero_pages: _Optional[int] = ..., bytes_logical: _Optional[int] = ..., bytes_stored: _Optional[int] = ..., bytes_new: _Optional[int] = ..., pages_captured: _Optional[int] = ..., frozen_seconds: _Optional[float] = ..., seconds: _Optional[float] = ..., full: _Optional[bool] = ..., data_paths: _Optional[_Mapping[str, str]] = ..., level: _Optional[_Union[_common_pb2.DurabilityLevel, str]] = ..., lost: _Optional[str] = ..., cache_nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class ListGenerationsRequest(_message.Message):
    __slots__ = ("job", "include_aborted", "limit")
    JOB_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ABORTED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    job: str
    include_aborted: bool
    limit: int
    def __init__(self, job: _Optional[str] = ..., include_aborted: _Optional[bool] = ..., limit: _Optional[int] = ...) -> None: ...

class ListGenerationsResponse(_message.Message):
    __slots__ = ("generations",)
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    generations: _containers.RepeatedCompositeFieldContainer[GenerationInfo]
    def __init__(self, generations: _Optional[_Iterable[_Union[GenerationInfo, _Mapping]]] = ...) -> None: ...

class GetGenerationRequest(_message.Message):
    __slots__ = ("job", "generation")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class MemberGeneration(_message.Message):
    __slots__ = ("member", "node", "regions", "stats", "threads")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    member: str
    node: str
    regions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Region]
    stats: _common_pb2.MemberStats
    threads: int
    def __init__(self, member: _Optional[str] = ..., node: _Optional[str] = ..., regions: _Optional[_Iterable[_Union[_types_pb2.Region, _Mapping]]] = ..., stats: _Optional[_Union[_common_pb2.MemberStats, _Mapping]] = ..., threads: _Optional[int] = ...) -> None: ...

class GetGenerationResponse(_message.Message):
    __slots__ = ("info", "members")
    INFO_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    info: GenerationInfo
    members: _containers.RepeatedCompositeFieldContainer[MemberGeneration]
    def __init__(self, info: _Optional[_Union[GenerationInfo, _Mapping]] = ..., members: _Optional[_Iterable[_Union[MemberGeneration, _Mapping]]] = ...) -> None: ...

class DeleteGenerationRequest(_message.Message):
    __slots__ = ("job", "generation", "force")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    force: bool
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., force: _Optional[bool] = ...) -> None: ...

class DeleteGenerationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForgetNodeRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class ForgetNodeResponse(_message.Message):
    __slots__ = ("lost", "packs", "members")
    LOST_FIELD_NUMBER: _ClassVar[int]
    PACKS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    lost: _containers.RepeatedCompositeFieldContainer[GenerationInfo]
    packs: int
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lost: _Optional[_Iterable[_Union[GenerationInfo, _Mapping]]] = ..., packs: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class PinGenerationRequest(_message.Message):
    __slots__ = ("job", "generation", "pinned")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    pinned: bool
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., pinned: _Optional[bool] = ...) -> None: ...

class PinGenerationResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: GenerationInfo
    def __init__(self, info: _Optional[_Union[GenerationInfo, _Mapping]] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("job", "full", "lease_ms", "freeze_timeout_ms", "commit_timeout_ms", "pin", "no_precopy", "wait")
    JOB_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    FREEZE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    NO_PRECOPY_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    job: str
    full: bool
    lease_ms: int
    freeze_timeout_ms: int
    commit_timeout_ms: int
    pin: bool
    no_precopy: bool
    wait: _common_pb2.DurabilityLevel
    def __init__(self, job: _Optional[str] = ..., full: _Optional[bool] = ..., lease_ms: _Optional[int] = ..., freeze_timeout_ms: _Optional[int] = ..., commit_timeout_ms: _Optional[int] = ..., pin: _Optional[bool] = ..., no_precopy: _Optional[bool] = ..., wait: _Optional[_Union[_common_pb2.DurabilityLevel, str]] = ...) -> None: ...

class CheckpointEvent(_message.Message):
    __slots__ = ("kind", "job", "generation", "member", "node", "stats", "members_done", "members_total", "reason", "detail", "elapsed_seconds", "info")
    KIND_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_DONE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    kind: _common_pb2.ProgressKind
    job: str
    generation: int
    member: str
    node: str
    stats: _common_pb2.MemberStats
    members_done: int
    members_total: int
    reason: _common_pb2.AbortReason
    detail: str
    elapsed_seconds: float
    info: GenerationInfo
    def __init__(self, kind: _Optional[_Union[_common_pb2.ProgressKind, str]] = ..., job: _Optional[str] = ..., generation: _Optional[int] = ..., member: _Optional[str] = ..., node: _Optional[str] = ..., stats: _Optional[_Union[_common_pb2.MemberStats, _Mapping]] = ..., members_done: _Optional[int] = ..., members_total: _Optional[int] = ..., reason: _Optional[_Union[_common_pb2.AbortReason, str]] = ..., detail: _Optional[str] = ..., elapsed_seconds: _Optional[float] = ..., info: _Optional[_Union[GenerationInfo, _Mapping]] = ...) -> None: ...

class RestoreTarget(_message.Message):
    __slots__ = ("member", "process", "node", "regions")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    member: str
    process: _types_pb2.ProcessIdentity
    node: str
    regions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Region]
    def __init__(self, member: _Optional[str] = ..., process: _Optional[_Union[_types_pb2.ProcessIdentity, _Mapping]] = ..., node: _Optional[str] = ..., regions: _Optional[_Iterable[_Union[_types_pb2.Region, _Mapping]]] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("job", "generation", "members", "into", "lease_ms", "freeze_timeout_ms", "force")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    INTO_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    FREEZE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    members: _containers.RepeatedScalarFieldContainer[str]
    into: RestoreTarget
    lease_ms: int
    freeze_timeout_ms: int
    force: bool
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ..., into: _Optional[_Union[RestoreTarget, _Mapping]] = ..., lease_ms: _Optional[int] = ..., freeze_timeout_ms: _Optional[int] = ..., force: _Optional[bool] = ...) -> None: ...

class RestoreEvent(_message.Message):
    __slots__ = ("kind", "job", "generation", "member", "node", "stats", "members_done", "members_total", "reason", "detail", "elapsed_seconds")
    KIND_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_DONE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    kind: _common_pb2.ProgressKind
    job: str
    generation: int
    member: str
    node: str
    stats: _common_pb2.MemberStats
    members_done: int
    members_total: int
    reason: _common_pb2.AbortReason
    detail: str
    elapsed_seconds: float
    def __init__(self, kind: _Optional[_Union[_common_pb2.ProgressKind, str]] = ..., job: _Optional[str] = ..., generation: _Optional[int] = ..., member: _Optional[str] = ..., node: _Optional[str] = ..., stats: _Optional[_Union[_common_pb2.MemberStats, _Mapping]] = ..., members_done: _Optional[int] = ..., members_total: _Optional[int] = ..., reason: _Optional[_Union[_common_pb2.AbortReason, str]] = ..., detail: _Optional[str] = ..., elapsed_seconds: _Optional[float] = ...) -> None: ...

class DiffRequest(_message.Message):
    __slots__ = ("job", "from_generation", "to_generation", "members")
    JOB_FIELD_NUMBER: _ClassVar[int]
    FROM_GENERATION_FIELD_NUMBER: _ClassVar[int]
    TO_GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    job: str
    from_generation: int
    to_generation: int
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job: _Optional[str] = ..., from_generation: _Optional[int] = ..., to_generation: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class DiffResponse(_message.Message):
    __slots__ = ("member", "region", "added", "removed", "changed", "pages_changed", "bytes_changed")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    PAGES_CHANGED_FIELD_NUMBER: _ClassVar[int]
    BYTES_CHANGED_FIELD_NUMBER: _ClassVar[int]
    member: str
    region: str
    added: bool
    removed: bool
    changed: _containers.RepeatedCompositeFieldContainer[_types_pb2.PageRun]
    pages_changed: int
    bytes_changed: int
    def __init__(self, member: _Optional[str] = ..., region: _Optional[str] = ..., added: _Optional[bool] = ..., removed: _Optional[bool] = ..., changed: _Optional[_Iterable[_Union[_types_pb2.PageRun, _Mapping]]] = ..., pages_changed: _Optional[int] = ..., bytes_changed: _Optional[int] = ...) -> None: ...

class ReadGenerationRequest(_message.Message):
    __slots__ = ("job", "generation", "members", "regions", "chunk_locations")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    members: _containers.RepeatedScalarFieldContainer[str]
    regions: _containers.RepeatedScalarFieldContainer[str]
    chunk_locations: bool
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ..., regions: _Optional[_Iterable[str]] = ..., chunk_locations: _Optional[bool] = ...) -> None: ...

class GarbageCollectRequest(_message.Message):
    __slots__ = ("keep", "dry_run")
    KEEP_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    keep: int
    dry_run: bool
    def __init__(self, keep: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class GarbageCollectEvent(_message.Message):
    __slots__ = ("phase", "done", "total", "dropped", "chunks_dropped", "packs_deleted", "packs_repacked", "bytes_freed", "orphan_manifests")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    PACKS_DELETED_FIELD_NUMBER: _ClassVar[int]
    PACKS_REPACKED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    ORPHAN_MANIFESTS_FIELD_NUMBER: _ClassVar[int]
    phase: str
    done: int
    total: int
    dropped: _containers.RepeatedCompositeFieldContainer[GenerationRef]
    chunks_dropped: int
    packs_deleted: int
    packs_repacked: int
    bytes_freed: int
    orphan_manifests: int
    def __init__(self, phase: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., dropped: _Optional[_Iterable[_Union[GenerationRef, _Mapping]]] = ..., chunks_dropped: _Optional[int] = ..., packs_deleted: _Optional[int] = ..., packs_repacked: _Optional[int] = ..., bytes_freed: _Optional[int] = ..., orphan_manifests: _Optional[int] = ...) -> None: ...

class GenerationRef(_message.Message):
    __slots__ = ("job", "generation")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("job", "generation")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class Damage(_message.Message):
    __slots__ = ("job", "generation", "member", "chunks", "first_chunk", "why")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    member: str
    chunks: int
    first_chunk: str
    why: str
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., member: _Optional[str] = ..., chunks: _Optional[int] = ..., first_chunk: _Optional[str] = ..., why: _Optional[str] = ...) -> None: ...

class VerifyEvent(_message.Message):
    __slots__ = ("chunks_checked", "chunks_total", "bytes_read", "damage", "final", "generations", "damaged_packs", "ok")
    CHUNKS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    DAMAGE_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    DAMAGED_PACKS_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    chunks_checked: int
    chunks_total: int
    bytes_read: int
    damage: _containers.RepeatedCompositeFieldContainer[Damage]
    final: bool
    generations: int
    damaged_packs: _containers.RepeatedScalarFieldContainer[str]
    ok: bool
    def __init__(self, chunks_checked: _Optional[int] = ..., chunks_total: _Optional[int] = ..., bytes_read: _Optional[int] = ..., damage: _Optional[_Iterable[_Union[Damage, _Mapping]]] = ..., final: _Optional[bool] = ..., generations: _Optional[int] = ..., damaged_packs: _Optional[_Iterable[str]] = ..., ok: _Optional[bool] = ...) -> None: ...

class StoreStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StoreStatsResponse(_message.Message):
    __slots__ = ("chunks", "packs", "pack_bytes", "chunk_bytes", "stored_chunk_bytes", "generations", "logical_bytes", "index_memory_bytes", "dedup_ratio", "compression_ratio", "store_location", "store_id", "store_encrypted")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PACKS_FIELD_NUMBER: _ClassVar[int]
    PACK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORED_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    INDEX_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEDUP_RATIO_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_RATIO_FIELD_NUMBER: _ClassVar[int]
    STORE_LOCATION_FIELD_NUMBER: _ClassVar[int]
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    STORE_ENCRYPTED_FIELD_NUMBER: _ClassVar[int]
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
    store_location: str
    store_id: str
    store_encrypted: bool
    def __init__(self, chunks: _Optional[int] = ..., packs: _Optional[int] = ..., pack_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., stored_chunk_bytes: _Optional[int] = ..., generations: _Optional[int] = ..., logical_bytes: _Optional[int] = ..., index_memory_bytes: _Optional[int] = ..., dedup_ratio: _Optional[float] = ..., compression_ratio: _Optional[float] = ..., store_location: _Optional[str] = ..., store_id: _Optional[str] = ..., store_encrypted: _Optional[bool] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("jobs", "include_progress")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedScalarFieldContainer[str]
    include_progress: bool
    def __init__(self, jobs: _Optional[_Iterable[str]] = ..., include_progress: _Optional[bool] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("kind", "time_unix_ms", "job", "member", "node", "generation", "reason", "detail", "info", "checkpoint", "restore", "lost", "seq", "gc")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    GC_FIELD_NUMBER: _ClassVar[int]
    kind: WatchEventKind
    time_unix_ms: int
    job: str
    member: str
    node: str
    generation: int
    reason: _common_pb2.AbortReason
    detail: str
    info: GenerationInfo
    checkpoint: CheckpointEvent
    restore: RestoreEvent
    lost: int
    seq: int
    gc: GarbageCollectEvent
    def __init__(self, kind: _Optional[_Union[WatchEventKind, str]] = ..., time_unix_ms: _Optional[int] = ..., job: _Optional[str] = ..., member: _Optional[str] = ..., node: _Optional[str] = ..., generation: _Optional[int] = ..., reason: _Optional[_Union[_common_pb2.AbortReason, str]] = ..., detail: _Optional[str] = ..., info: _Optional[_Union[GenerationInfo, _Mapping]] = ..., checkpoint: _Optional[_Union[CheckpointEvent, _Mapping]] = ..., restore: _Optional[_Union[RestoreEvent, _Mapping]] = ..., lost: _Optional[int] = ..., seq: _Optional[int] = ..., gc: _Optional[_Union[GarbageCollectEvent, _Mapping]] = ...) -> None: ...
