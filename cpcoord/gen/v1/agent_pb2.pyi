from cpcoord.gen.v1 import common_pb2 as _common_pb2
from cpcoord.gen.v1 import manifest_pb2 as _manifest_pb2
from cpcoord.gen.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LacksRequest(_message.Message):
    __slots__ = ("sender", "packs")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    PACKS_FIELD_NUMBER: _ClassVar[int]
    sender: str
    packs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sender: _Optional[str] = ..., packs: _Optional[_Iterable[str]] = ...) -> None: ...

class LacksResponse(_message.Message):
    __slots__ = ("packs",)
    PACKS_FIELD_NUMBER: _ClassVar[int]
    packs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, packs: _Optional[_Iterable[str]] = ...) -> None: ...

class PartnerGeneration(_message.Message):
    __slots__ = ("sender", "job", "generation", "packs")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PACKS_FIELD_NUMBER: _ClassVar[int]
    sender: str
    job: str
    generation: int
    packs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sender: _Optional[str] = ..., job: _Optional[str] = ..., generation: _Optional[int] = ..., packs: _Optional[_Iterable[str]] = ...) -> None: ...

class PartnerPack(_message.Message):
    __slots__ = ("name", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class PartnerPut(_message.Message):
    __slots__ = ("generation", "pack", "data")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PACK_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    generation: PartnerGeneration
    pack: PartnerPack
    data: bytes
    def __init__(self, generation: _Optional[_Union[PartnerGeneration, _Mapping]] = ..., pack: _Optional[_Union[PartnerPack, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PartnerPutResponse(_message.Message):
    __slots__ = ("packs",)
    PACKS_FIELD_NUMBER: _ClassVar[int]
    packs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, packs: _Optional[_Iterable[str]] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "frozen", "staged", "uploaded", "restored", "failed", "member_gone", "heartbeat", "result", "tree_members", "prepared", "drained", "partnered")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    UPLOADED_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    MEMBER_GONE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    TREE_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    PREPARED_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    PARTNERED_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    frozen: Frozen
    staged: Staged
    uploaded: Uploaded
    restored: Restored
    failed: Failed
    member_gone: MemberGone
    heartbeat: Heartbeat
    result: CommandResult
    tree_members: TreeMembers
    prepared: Prepared
    drained: Drained
    partnered: Partnered
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., frozen: _Optional[_Union[Frozen, _Mapping]] = ..., staged: _Optional[_Union[Staged, _Mapping]] = ..., uploaded: _Optional[_Union[Uploaded, _Mapping]] = ..., restored: _Optional[_Union[Restored, _Mapping]] = ..., failed: _Optional[_Union[Failed, _Mapping]] = ..., member_gone: _Optional[_Union[MemberGone, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., result: _Optional[_Union[CommandResult, _Mapping]] = ..., tree_members: _Optional[_Union[TreeMembers, _Mapping]] = ..., prepared: _Optional[_Union[Prepared, _Mapping]] = ..., drained: _Optional[_Union[Drained, _Mapping]] = ..., partnered: _Optional[_Union[Partnered, _Mapping]] = ...) -> None: ...

class TrackerBackend(_message.Message):
    __slots__ = ("name", "available", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    available: bool
    reason: str
    def __init__(self, name: _Optional[str] = ..., available: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class HeldMember(_message.Message):
    __slots__ = ("job", "member", "alive", "tracker", "group")
    JOB_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    TRACKER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    job: str
    member: _types_pb2.Member
    alive: bool
    tracker: str
    group: str
    def __init__(self, job: _Optional[str] = ..., member: _Optional[_Union[_types_pb2.Member, _Mapping]] = ..., alive: _Optional[bool] = ..., tracker: _Optional[str] = ..., group: _Optional[str] = ...) -> None: ...

class TreeMembers(_message.Message):
    __slots__ = ("job", "group", "joined", "tracker")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    TRACKER_FIELD_NUMBER: _ClassVar[int]
    job: str
    group: str
    joined: _containers.RepeatedCompositeFieldContainer[_types_pb2.Member]
    tracker: str
    def __init__(self, job: _Optional[str] = ..., group: _Optional[str] = ..., joined: _Optional[_Iterable[_Union[_types_pb2.Member, _Mapping]]] = ..., tracker: _Optional[str] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("node", "version", "protocol_version", "capabilities", "trackers", "page_size", "members", "hostname", "cache_id", "partner_address")
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    TRACKERS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    PARTNER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node: str
    version: str
    protocol_version: int
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    trackers: _containers.RepeatedCompositeFieldContainer[TrackerBackend]
    page_size: int
    members: _containers.RepeatedCompositeFieldContainer[HeldMember]
    hostname: str
    cache_id: str
    partner_address: str
    def __init__(self, node: _Optional[str] = ..., version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., capabilities: _Optional[_Iterable[str]] = ..., trackers: _Optional[_Iterable[_Union[TrackerBackend, _Mapping]]] = ..., page_size: _Optional[int] = ..., members: _Optional[_Iterable[_Union[HeldMember, _Mapping]]] = ..., hostname: _Optional[str] = ..., cache_id: _Optional[str] = ..., partner_address: _Optional[str] = ...) -> None: ...

class FrozenMember(_message.Message):
    __slots__ = ("name", "process", "threads", "freeze_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    FREEZE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    process: _types_pb2.ProcessIdentity
    threads: int
    freeze_seconds: float
    def __init__(self, name: _Optional[str] = ..., process: _Optional[_Union[_types_pb2.ProcessIdentity, _Mapping]] = ..., threads: _Optional[int] = ..., freeze_seconds: _Optional[float] = ...) -> None: ...

class Frozen(_message.Message):
    __slots__ = ("job", "generation", "members")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    members: _containers.RepeatedCompositeFieldContainer[FrozenMember]
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., members: _Optional[_Iterable[_Union[FrozenMember, _Mapping]]] = ...) -> None: ...

class Staged(_message.Message):
    __slots__ = ("job", "generation", "member", "stats", "threads", "thread_start_times", "kernel")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    THREAD_START_TIMES_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    member: str
    stats: _common_pb2.MemberStats
    threads: _containers.RepeatedCompositeFieldContainer[_common_pb2.ThreadRegisters]
    thread_start_times: _containers.RepeatedScalarFieldContainer[int]
    kernel: _manifest_pb2.KernelState
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., member: _Optional[str] = ..., stats: _Optional[_Union[_common_pb2.MemberStats, _Mapping]] = ..., threads: _Optional[_Iterable[_Union[_common_pb2.ThreadRegisters, _Mapping]]] = ..., thread_start_times: _Optional[_Iterable[int]] = ..., kernel: _Optional[_Union[_manifest_pb2.KernelState, _Mapping]] = ...) -> None: ...

class Uploaded(_message.Message):
    __slots__ = ("job", "generation", "member", "stats")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    member: str
    stats: _common_pb2.MemberStats
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., member: _Optional[str] = ..., stats: _Optional[_Union[_common_pb2.MemberStats, _Mapping]] = ...) -> None: ...

class Restored(_message.Message):
    __slots__ = ("job", "generation", "member", "stats")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    member: str
    stats: _common_pb2.MemberStats
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., member: _Optional[str] = ..., stats: _Optional[_Union[_common_pb2.MemberStats, _Mapping]] = ...) -> None: ...

class Failed(_message.Message):
    __slots__ = ("job", "generation", "member", "reason", "detail", "error")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    member: str
    reason: _common_pb2.AbortReason
    detail: str
    error: _common_pb2.ErrorDetail
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., member: _Optional[str] = ..., reason: _Optional[_Union[_common_pb2.AbortReason, str]] = ..., detail: _Optional[str] = ..., error: _Optional[_Union[_common_pb2.ErrorDetail, _Mapping]] = ...) -> None: ...

class MemberGone(_message.Message):
    __slots__ = ("job", "member", "process", "exit_status", "detail")
    JOB_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    EXIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    job: str
    member: str
    process: _types_pb2.ProcessIdentity
    exit_status: int
    detail: str
    def __init__(self, job: _Optional[str] = ..., member: _Optional[str] = ..., process: _Optional[_Union[_types_pb2.ProcessIdentity, _Mapping]] = ..., exit_status: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sequence", "sent_unix_ms")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    sent_unix_ms: int
    def __init__(self, sequence: _Optional[int] = ..., sent_unix_ms: _Optional[int] = ...) -> None: ...

class CommandResult(_message.Message):
    __slots__ = ("command_id", "error", "member", "stats")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    command_id: int
    error: _common_pb2.ErrorDetail
    member: _types_pb2.Member
    stats: _common_pb2.MemberStats
    def __init__(self, command_id: _Optional[int] = ..., error: _Optional[_Union[_common_pb2.ErrorDetail, _Mapping]] = ..., member: _Optional[_Union[_types_pb2.Member, _Mapping]] = ..., stats: _Optional[_Union[_common_pb2.MemberStats, _Mapping]] = ...) -> None: ...

class CoordinatorMessage(_message.Message):
    __slots__ = ("command_id", "welcome", "freeze", "capture", "abort", "committed", "restore", "thaw", "attach_member", "detach_member", "restore_into", "heartbeat", "prepare", "drain_result", "read_cached", "partner_changed", "partner_release", "take_over_drain")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    FREEZE_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FIELD_NUMBER: _ClassVar[int]
    THAW_FIELD_NUMBER: _ClassVar[int]
    ATTACH_MEMBER_FIELD_NUMBER: _ClassVar[int]
    DETACH_MEMBER_FIELD_NUMBER: _ClassVar[int]
    RESTORE_INTO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    PREPARE_FIELD_NUMBER: _ClassVar[int]
    DRAIN_RESULT_FIELD_NUMBER: _ClassVar[int]
    READ_CACHED_FIELD_NUMBER: _ClassVar[int]
    PARTNER_CHANGED_FIELD_NUMBER: _ClassVar[int]
    PARTNER_RELEASE_FIELD_NUMBER: _ClassVar[int]
    TAKE_OVER_DRAIN_FIELD_NUMBER: _ClassVar[int]
    command_id: int
    welcome: Welcome
    freeze: Freeze
    capture: Capture
    abort: Abort
    committed: Committed
    restore: Restore
    thaw: Thaw
    attach_member: AttachMember
    detach_member: DetachMember
    restore_into: RestoreInto
    heartbeat: Heartbeat
    prepare: Prepare
    drain_result: DrainResult
    read_cached: ReadCached
    partner_changed: PartnerChanged
    partner_release: PartnerRelease
    take_over_drain: TakeOverDrain
    def __init__(self, command_id: _Optional[int] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., freeze: _Optional[_Union[Freeze, _Mapping]] = ..., capture: _Optional[_Union[Capture, _Mapping]] = ..., abort: _Optional[_Union[Abort, _Mapping]] = ..., committed: _Optional[_Union[Committed, _Mapping]] = ..., restore: _Optional[_Union[Restore, _Mapping]] = ..., thaw: _Optional[_Union[Thaw, _Mapping]] = ..., attach_member: _Optional[_Union[AttachMember, _Mapping]] = ..., detach_member: _Optional[_Union[DetachMember, _Mapping]] = ..., restore_into: _Optional[_Union[RestoreInto, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., prepare: _Optional[_Union[Prepare, _Mapping]] = ..., drain_result: _Optional[_Union[DrainResult, _Mapping]] = ..., read_cached: _Optional[_Union[ReadCached, _Mapping]] = ..., partner_changed: _Optional[_Union[PartnerChanged, _Mapping]] = ..., partner_release: _Optional[_Union[PartnerRelease, _Mapping]] = ..., take_over_drain: _Optional[_Union[TakeOverDrain, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("version", "protocol_version", "heartbeat_interval_ms", "max_message_bytes", "max_batch_entries", "store_location", "store_id", "store_dedup", "store_pack_bytes", "store_encrypted", "store_key", "drain", "partner")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    STORE_LOCATION_FIELD_NUMBER: _ClassVar[int]
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    STORE_DEDUP_FIELD_NUMBER: _ClassVar[int]
    STORE_PACK_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORE_ENCRYPTED_FIELD_NUMBER: _ClassVar[int]
    STORE_KEY_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    PARTNER_FIELD_NUMBER: _ClassVar[int]
    version: str
    protocol_version: int
    heartbeat_interval_ms: int
    max_message_bytes: int
    max_batch_entries: int
    store_location: str
    store_id: str
    store_dedup: str
    store_pack_bytes: int
    store_encrypted: bool
    store_key: bytes
    drain: _containers.RepeatedCompositeFieldContainer[DrainItem]
    partner: PartnerChanged
    def __init__(self, version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., heartbeat_interval_ms: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_batch_entries: _Optional[int] = ..., store_location: _Optional[str] = ..., store_id: _Optional[str] = ..., store_dedup: _Optional[str] = ..., store_pack_bytes: _Optional[int] = ..., store_encrypted: _Optional[bool] = ..., store_key: _Optional[bytes] = ..., drain: _Optional[_Iterable[_Union[DrainItem, _Mapping]]] = ..., partner: _Optional[_Union[PartnerChanged, _Mapping]] = ...) -> None: ...

class PartnerChanged(_message.Message):
    __slots__ = ("node", "address", "owed", "senders")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    OWED_FIELD_NUMBER: _ClassVar[int]
    SENDERS_FIELD_NUMBER: _ClassVar[int]
    node: str
    address: str
    owed: _containers.RepeatedCompositeFieldContainer[DrainItem]
    senders: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node: _Optional[str] = ..., address: _Optional[str] = ..., owed: _Optional[_Iterable[_Union[DrainItem, _Mapping]]] = ..., senders: _Optional[_Iterable[str]] = ...) -> None: ...

class TakeOverDrain(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[DrainItem]
    def __init__(self, items: _Optional[_Iterable[_Union[DrainItem, _Mapping]]] = ...) -> None: ...

class PartnerRelease(_message.Message):
    __slots__ = ("packs",)
    PACKS_FIELD_NUMBER: _ClassVar[int]
    packs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, packs: _Optional[_Iterable[str]] = ...) -> None: ...

class Partnered(_message.Message):
    __slots__ = ("sender", "job", "generation", "packs")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PACKS_FIELD_NUMBER: _ClassVar[int]
    sender: str
    job: str
    generation: int
    packs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sender: _Optional[str] = ..., job: _Optional[str] = ..., generation: _Optional[int] = ..., packs: _Optional[_Iterable[str]] = ...) -> None: ...

class DrainItem(_message.Message):
    __slots__ = ("job", "generation", "packs")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PACKS_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    packs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., packs: _Optional[_Iterable[str]] = ...) -> None: ...

class Drained(_message.Message):
    __slots__ = ("job", "generation", "packs", "missing")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PACKS_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    packs: _containers.RepeatedCompositeFieldContainer[StoredPack]
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., packs: _Optional[_Iterable[_Union[StoredPack, _Mapping]]] = ..., missing: _Optional[_Iterable[str]] = ...) -> None: ...

class ReadCached(_message.Message):
    __slots__ = ("token", "namespace", "packs", "ids", "pack_index")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PACKS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    PACK_INDEX_FIELD_NUMBER: _ClassVar[int]
    token: str
    namespace: str
    packs: _containers.RepeatedScalarFieldContainer[str]
    ids: bytes
    pack_index: bytes
    def __init__(self, token: _Optional[str] = ..., namespace: _Optional[str] = ..., packs: _Optional[_Iterable[str]] = ..., ids: _Optional[bytes] = ..., pack_index: _Optional[bytes] = ...) -> None: ...

class CachedChunks(_message.Message):
    __slots__ = ("token", "chunks")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    token: str
    chunks: _common_pb2.ChunkData
    def __init__(self, token: _Optional[str] = ..., chunks: _Optional[_Union[_common_pb2.ChunkData, _Mapping]] = ...) -> None: ...

class SendCachedResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainResult(_message.Message):
    __slots__ = ("job", "generation", "ok", "detail")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    ok: bool
    detail: str
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., ok: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class Freeze(_message.Message):
    __slots__ = ("job", "generation", "kind", "lease_ms", "members", "layouts", "precopy", "precopy_ms", "full", "force")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    LAYOUTS_FIELD_NUMBER: _ClassVar[int]
    PRECOPY_FIELD_NUMBER: _ClassVar[int]
    PRECOPY_MS_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    kind: _common_pb2.OperationKind
    lease_ms: int
    members: _containers.RepeatedScalarFieldContainer[str]
    layouts: _containers.RepeatedCompositeFieldContainer[RestoreLayout]
    precopy: bool
    precopy_ms: int
    full: bool
    force: bool
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., kind: _Optional[_Union[_common_pb2.OperationKind, str]] = ..., lease_ms: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ..., layouts: _Optional[_Iterable[_Union[RestoreLayout, _Mapping]]] = ..., precopy: _Optional[bool] = ..., precopy_ms: _Optional[int] = ..., full: _Optional[bool] = ..., force: _Optional[bool] = ...) -> None: ...

class RestoreLayout(_message.Message):
    __slots__ = ("member", "regions", "threads", "thread_start_times", "kernel", "layout")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    THREAD_START_TIMES_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    member: str
    regions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Region]
    threads: _containers.RepeatedCompositeFieldContainer[_common_pb2.ThreadRegisters]
    thread_start_times: _containers.RepeatedScalarFieldContainer[int]
    kernel: _manifest_pb2.KernelState
    layout: _containers.RepeatedCompositeFieldContainer[_manifest_pb2.RegionMapping]
    def __init__(self, member: _Optional[str] = ..., regions: _Optional[_Iterable[_Union[_types_pb2.Region, _Mapping]]] = ..., threads: _Optional[_Iterable[_Union[_common_pb2.ThreadRegisters, _Mapping]]] = ..., thread_start_times: _Optional[_Iterable[int]] = ..., kernel: _Optional[_Union[_manifest_pb2.KernelState, _Mapping]] = ..., layout: _Optional[_Iterable[_Union[_manifest_pb2.RegionMapping, _Mapping]]] = ...) -> None: ...

class Capture(_message.Message):
    __slots__ = ("job", "generation", "full", "members")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    full: bool
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., full: _Optional[bool] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class Abort(_message.Message):
    __slots__ = ("job", "generation", "reason", "detail")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    reason: _common_pb2.AbortReason
    detail: str
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., reason: _Optional[_Union[_common_pb2.AbortReason, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class Committed(_message.Message):
    __slots__ = ("job", "generation")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class Prepare(_message.Message):
    __slots__ = ("job", "generation", "kind", "members")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    kind: _common_pb2.OperationKind
    members: _containers.RepeatedCompositeFieldContainer[PrepareMember]
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., kind: _Optional[_Union[_common_pb2.OperationKind, str]] = ..., members: _Optional[_Iterable[_Union[PrepareMember, _Mapping]]] = ...) -> None: ...

class PrepareMember(_message.Message):
    __slots__ = ("member", "base_generation", "differs")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    BASE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    DIFFERS_FIELD_NUMBER: _ClassVar[int]
    member: str
    base_generation: int
    differs: _containers.RepeatedCompositeFieldContainer[_types_pb2.Region]
    def __init__(self, member: _Optional[str] = ..., base_generation: _Optional[int] = ..., differs: _Optional[_Iterable[_Union[_types_pb2.Region, _Mapping]]] = ...) -> None: ...

class Prepared(_message.Message):
    __slots__ = ("job", "generation", "members")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class Restore(_message.Message):
    __slots__ = ("job", "generation", "members")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class Thaw(_message.Message):
    __slots__ = ("job", "generation")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class AttachMember(_message.Message):
    __slots__ = ("job", "member", "process", "regions", "tracker", "group")
    JOB_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    TRACKER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    job: str
    member: str
    process: _types_pb2.ProcessIdentity
    regions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Region]
    tracker: str
    group: str
    def __init__(self, job: _Optional[str] = ..., member: _Optional[str] = ..., process: _Optional[_Union[_types_pb2.ProcessIdentity, _Mapping]] = ..., regions: _Optional[_Iterable[_Union[_types_pb2.Region, _Mapping]]] = ..., tracker: _Optional[str] = ..., group: _Optional[str] = ...) -> None: ...

class DetachMember(_message.Message):
    __slots__ = ("job", "member")
    JOB_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    job: str
    member: str
    def __init__(self, job: _Optional[str] = ..., member: _Optional[str] = ...) -> None: ...

class RestoreInto(_message.Message):
    __slots__ = ("job", "generation", "member", "target", "regions")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    member: str
    target: _types_pb2.ProcessIdentity
    regions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Region]
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., member: _Optional[str] = ..., target: _Optional[_Union[_types_pb2.ProcessIdentity, _Mapping]] = ..., regions: _Optional[_Iterable[_Union[_types_pb2.Region, _Mapping]]] = ...) -> None: ...

class MissingChunksRequest(_message.Message):
    __slots__ = ("job", "generation", "member", "ids")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    member: str
    ids: bytes
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., member: _Optional[str] = ..., ids: _Optional[bytes] = ...) -> None: ...

class MissingChunksResponse(_message.Message):
    __slots__ = ("missing",)
    MISSING_FIELD_NUMBER: _ClassVar[int]
    missing: bytes
    def __init__(self, missing: _Optional[bytes] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("header", "batch", "packs", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    PACKS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: _common_pb2.PagesHeader
    batch: _common_pb2.PageBatch
    packs: StoredPacks
    end: UploadEnd
    def __init__(self, header: _Optional[_Union[_common_pb2.PagesHeader, _Mapping]] = ..., batch: _Optional[_Union[_common_pb2.PageBatch, _Mapping]] = ..., packs: _Optional[_Union[StoredPacks, _Mapping]] = ..., end: _Optional[_Union[UploadEnd, _Mapping]] = ...) -> None: ...

class UploadEnd(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StoredPacks(_message.Message):
    __slots__ = ("packs",)
    PACKS_FIELD_NUMBER: _ClassVar[int]
    packs: _containers.RepeatedCompositeFieldContainer[StoredPack]
    def __init__(self, packs: _Optional[_Iterable[_Union[StoredPack, _Mapping]]] = ...) -> None: ...

class StoredPack(_message.Message):
    __slots__ = ("name", "size", "ids", "cached")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    ids: bytes
    cached: bool
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., ids: _Optional[bytes] = ..., cached: _Optional[bool] = ...) -> None: ...

class UploadResponse(_message.Message):
    __slots__ = ("pages", "entries", "chunks", "chunks_new", "bytes_received", "bytes_stored_new", "packs")
    PAGES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_NEW_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_STORED_NEW_FIELD_NUMBER: _ClassVar[int]
    PACKS_FIELD_NUMBER: _ClassVar[int]
    pages: int
    entries: int
    chunks: int
    chunks_new: int
    bytes_received: int
    bytes_stored_new: int
    packs: int
    def __init__(self, pages: _Optional[int] = ..., entries: _Optional[int] = ..., chunks: _Optional[int] = ..., chunks_new: _Optional[int] = ..., bytes_received: _Optional[int] = ..., bytes_stored_new: _Optional[int] = ..., packs: _Optional[int] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("job", "generation", "member", "regions", "page_filter", "chunk_locations", "read_cache")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    PAGE_FILTER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    READ_CACHE_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    member: str
    regions: _containers.RepeatedScalarFieldContainer[str]
    page_filter: _containers.RepeatedCompositeFieldContainer[_types_pb2.Region]
    chunk_locations: bool
    read_cache: bool
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., member: _Optional[str] = ..., regions: _Optional[_Iterable[str]] = ..., page_filter: _Optional[_Iterable[_Union[_types_pb2.Region, _Mapping]]] = ..., chunk_locations: _Optional[bool] = ..., read_cache: _Optional[bool] = ...) -> None: ...
