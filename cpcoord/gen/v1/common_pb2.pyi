from cpcoord.gen.v1 import manifest_pb2 as _manifest_pb2
from cpcoord.gen.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AbortReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ABORT_REASON_UNSPECIFIED: _ClassVar[AbortReason]
    ABORT_REASON_AGENT_LOST: _ClassVar[AbortReason]
    ABORT_REASON_MEMBER_DIED: _ClassVar[AbortReason]
    ABORT_REASON_FREEZE_FAILED: _ClassVar[AbortReason]
    ABORT_REASON_FREEZE_TIMEOUT: _ClassVar[AbortReason]
    ABORT_REASON_LEASE_EXPIRED: _ClassVar[AbortReason]
    ABORT_REASON_COMMIT_TIMEOUT: _ClassVar[AbortReason]
    ABORT_REASON_CAPTURE_FAILED: _ClassVar[AbortReason]
    ABORT_REASON_UPLOAD_FAILED: _ClassVar[AbortReason]
    ABORT_REASON_BAD_DATA: _ClassVar[AbortReason]
    ABORT_REASON_STORE_ERROR: _ClassVar[AbortReason]
    ABORT_REASON_CANCELLED: _ClassVar[AbortReason]
    ABORT_REASON_MISMATCH: _ClassVar[AbortReason]
    ABORT_REASON_RESTORE_FAILED: _ClassVar[AbortReason]
    ABORT_REASON_PREPARE_TIMEOUT: _ClassVar[AbortReason]
    ABORT_REASON_KERNEL_STATE: _ClassVar[AbortReason]

class GenerationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GENERATION_STATE_UNSPECIFIED: _ClassVar[GenerationState]
    GENERATION_STATE_NEW: _ClassVar[GenerationState]
    GENERATION_STATE_PRIMING: _ClassVar[GenerationState]
    GENERATION_STATE_PREPARING: _ClassVar[GenerationState]
    GENERATION_STATE_FROZEN: _ClassVar[GenerationState]
    GENERATION_STATE_CAPTURED: _ClassVar[GenerationState]
    GENERATION_STATE_COMMITTED: _ClassVar[GenerationState]
    GENERATION_STATE_ABORTED: _ClassVar[GenerationState]

class OperationKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATION_KIND_UNSPECIFIED: _ClassVar[OperationKind]
    OPERATION_KIND_CHECKPOINT: _ClassVar[OperationKind]
    OPERATION_KIND_RESTORE: _ClassVar[OperationKind]

class ProgressKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROGRESS_KIND_UNSPECIFIED: _ClassVar[ProgressKind]
    PROGRESS_KIND_FREEZE_SENT: _ClassVar[ProgressKind]
    PROGRESS_KIND_BARRIER: _ClassVar[ProgressKind]
    PROGRESS_KIND_MEMBER_STAGED: _ClassVar[ProgressKind]
    PROGRESS_KIND_MEMBER_UPLOADED: _ClassVar[ProgressKind]
    PROGRESS_KIND_MEMBER_RESTORED: _ClassVar[ProgressKind]
    PROGRESS_KIND_CAPTURED: _ClassVar[ProgressKind]
    PROGRESS_KIND_COMMITTED: _ClassVar[ProgressKind]
    PROGRESS_KIND_ABORTED: _ClassVar[ProgressKind]
    PROGRESS_KIND_COMMITTED_LOCAL: _ClassVar[ProgressKind]

class DurabilityLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DURABILITY_LEVEL_UNSPECIFIED: _ClassVar[DurabilityLevel]
    DURABILITY_LEVEL_LOCAL: _ClassVar[DurabilityLevel]
    DURABILITY_LEVEL_PARTNER: _ClassVar[DurabilityLevel]
    DURABILITY_LEVEL_STORE: _ClassVar[DurabilityLevel]
ABORT_REASON_UNSPECIFIED: AbortReason
ABORT_REASON_AGENT_LOST: AbortReason
ABORT_REASON_MEMBER_DIED: AbortReason
ABORT_REASON_FREEZE_FAILED: AbortReason
ABORT_REASON_FREEZE_TIMEOUT: AbortReason
ABORT_REASON_LEASE_EXPIRED: AbortReason
ABORT_REASON_COMMIT_TIMEOUT: AbortReason
ABORT_REASON_CAPTURE_FAILED: AbortReason
ABORT_REASON_UPLOAD_FAILED: AbortReason
ABORT_REASON_BAD_DATA: AbortReason
ABORT_REASON_STORE_ERROR: AbortReason
ABORT_REASON_CANCELLED: AbortReason
ABORT_REASON_MISMATCH: AbortReason
ABORT_REASON_RESTORE_FAILED: AbortReason
ABORT_REASON_PREPARE_TIMEOUT: AbortReason
ABORT_REASON_KERNEL_STATE: AbortReason
GENERATION_STATE_UNSPECIFIED: GenerationState
GENERATION_STATE_NEW: GenerationState
GENERATION_STATE_PRIMING: GenerationState
GENERATION_STATE_PREPARING: GenerationState
GENERATION_STATE_FROZEN: GenerationState
GENERATION_STATE_CAPTURED: GenerationState
GENERATION_STATE_COMMITTED: GenerationState
GENERATION_STATE_ABORTED: GenerationState
OPERATION_KIND_UNSPECIFIED: OperationKind
OPERATION_KIND_CHECKPOINT: OperationKind
OPERATION_KIND_RESTORE: OperationKind
PROGRESS_KIND_UNSPECIFIED: ProgressKind
PROGRESS_KIND_FREEZE_SENT: ProgressKind
PROGRESS_KIND_BARRIER: ProgressKind
PROGRESS_KIND_MEMBER_STAGED: ProgressKind
PROGRESS_KIND_MEMBER_UPLOADED: ProgressKind
PROGRESS_KIND_MEMBER_RESTORED: ProgressKind
PROGRESS_KIND_CAPTURED: ProgressKind
PROGRESS_KIND_COMMITTED: ProgressKind
PROGRESS_KIND_ABORTED: ProgressKind
PROGRESS_KIND_COMMITTED_LOCAL: ProgressKind
DURABILITY_LEVEL_UNSPECIFIED: DurabilityLevel
DURABILITY_LEVEL_LOCAL: DurabilityLevel
DURABILITY_LEVEL_PARTNER: DurabilityLevel
DURABILITY_LEVEL_STORE: DurabilityLevel

class MemberStats(_message.Message):
    __slots__ = ("pages", "zero_pages", "bytes_logical", "bytes_stored_new", "frozen_seconds", "tracker", "full", "precopy_rounds", "precopy_bytes", "precopy_frozen_pages", "pages_written", "bytes_prefetched", "tracker_kept", "read_direct", "kernel_warnings")
    PAGES_FIELD_NUMBER: _ClassVar[int]
    ZERO_PAGES_FIELD_NUMBER: _ClassVar[int]
    BYTES_LOGICAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_STORED_NEW_FIELD_NUMBER: _ClassVar[int]
    FROZEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRACKER_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    PRECOPY_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PRECOPY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRECOPY_FROZEN_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    BYTES_PREFETCHED_FIELD_NUMBER: _ClassVar[int]
    TRACKER_KEPT_FIELD_NUMBER: _ClassVar[int]
    READ_DIRECT_FIELD_NUMBER: _ClassVar[int]
    KERNEL_WARNINGS_FIELD_NUMBER: _ClassVar[int]
    pages: int
    zero_pages: int
    bytes_logical: int
    bytes_stored_new: int
    frozen_seconds: float
    tracker: str
    full: bool
    precopy_rounds: int
    precopy_bytes: _containers.RepeatedScalarFieldContainer[int]
    precopy_frozen_pages: int
    pages_written: int
    bytes_prefetched: int
    tracker_kept: bool
    read_direct: bool
    kernel_warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pages: _Optional[int] = ..., zero_pages: _Optional[int] = ..., bytes_logical: _Optional[int] = ..., bytes_stored_new: _Optional[int] = ..., frozen_seconds: _Optional[float] = ..., tracker: _Optional[str] = ..., full: _Optional[bool] = ..., precopy_rounds: _Optional[int] = ..., precopy_bytes: _Optional[_Iterable[int]] = ..., precopy_frozen_pages: _Optional[int] = ..., pages_written: _Optional[int] = ..., bytes_prefetched: _Optional[int] = ..., tracker_kept: _Optional[bool] = ..., read_direct: _Optional[bool] = ..., kernel_warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class ErrorDetail(_message.Message):
    __slots__ = ("status", "exit_code", "error", "message")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    status: str
    exit_code: int
    error: str
    message: str
    def __init__(self, status: _Optional[str] = ..., exit_code: _Optional[int] = ..., error: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ThreadRegisters(_message.Message):
    __slots__ = ("tid", "arch", "regs", "fpregs")
    TID_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    REGS_FIELD_NUMBER: _ClassVar[int]
    FPREGS_FIELD_NUMBER: _ClassVar[int]
    tid: int
    arch: str
    regs: bytes
    fpregs: bytes
    def __init__(self, tid: _Optional[int] = ..., arch: _Optional[str] = ..., regs: _Optional[bytes] = ..., fpregs: _Optional[bytes] = ...) -> None: ...

class PagesHeader(_message.Message):
    __slots__ = ("job", "generation", "member", "node", "page_size", "regions", "threads", "tracker", "full", "base_generation", "cut_unix_ns", "layout")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    TRACKER_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    BASE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    CUT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    member: str
    node: str
    page_size: int
    regions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Region]
    threads: _containers.RepeatedCompositeFieldContainer[ThreadRegisters]
    tracker: str
    full: bool
    base_generation: int
    cut_unix_ns: int
    layout: _containers.RepeatedCompositeFieldContainer[_manifest_pb2.RegionMapping]
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., member: _Optional[str] = ..., node: _Optional[str] = ..., page_size: _Optional[int] = ..., regions: _Optional[_Iterable[_Union[_types_pb2.Region, _Mapping]]] = ..., threads: _Optional[_Iterable[_Union[ThreadRegisters, _Mapping]]] = ..., tracker: _Optional[str] = ..., full: _Optional[bool] = ..., base_generation: _Optional[int] = ..., cut_unix_ns: _Optional[int] = ..., layout: _Optional[_Iterable[_Union[_manifest_pb2.RegionMapping, _Mapping]]] = ...) -> None: ...

class ChunkData(_message.Message):
    __slots__ = ("ids", "methods", "raw_sizes", "stored_sizes", "data")
    IDS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZES_FIELD_NUMBER: _ClassVar[int]
    STORED_SIZES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ids: bytes
    methods: bytes
    raw_sizes: bytes
    stored_sizes: bytes
    data: bytes
    def __init__(self, ids: _Optional[bytes] = ..., methods: _Optional[bytes] = ..., raw_sizes: _Optional[bytes] = ..., stored_sizes: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class PageBatch(_message.Message):
    __slots__ = ("region", "entries", "chunks", "locations")
    REGION_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    region: int
    entries: _manifest_pb2.PageEntries
    chunks: ChunkData
    locations: ChunkLocations
    def __init__(self, region: _Optional[int] = ..., entries: _Optional[_Union[_manifest_pb2.PageEntries, _Mapping]] = ..., chunks: _Optional[_Union[ChunkData, _Mapping]] = ..., locations: _Optional[_Union[ChunkLocations, _Mapping]] = ...) -> None: ...

class ChunkLocations(_message.Message):
    __slots__ = ("namespace", "packs", "ids", "pack_index", "offsets", "stored_sizes", "raw_sizes", "methods", "cached")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PACKS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    PACK_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    STORED_SIZES_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZES_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    packs: _containers.RepeatedScalarFieldContainer[str]
    ids: bytes
    pack_index: bytes
    offsets: bytes
    stored_sizes: bytes
    raw_sizes: bytes
    methods: bytes
    cached: bytes
    def __init__(self, namespace: _Optional[str] = ..., packs: _Optional[_Iterable[str]] = ..., ids: _Optional[bytes] = ..., pack_index: _Optional[bytes] = ..., offsets: _Optional[bytes] = ..., stored_sizes: _Optional[bytes] = ..., raw_sizes: _Optional[bytes] = ..., methods: _Optional[bytes] = ..., cached: _Optional[bytes] = ...) -> None: ...

class PageData(_message.Message):
    __slots__ = ("header", "batch")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    header: PagesHeader
    batch: PageBatch
    def __init__(self, header: _Optional[_Union[PagesHeader, _Mapping]] = ..., batch: _Optional[_Union[PageBatch, _Mapping]] = ...) -> None: ...
