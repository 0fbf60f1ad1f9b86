from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ManifestHeader(_message.Message):
    __slots__ = ("format", "job", "generation", "parent", "time_ns", "page_size", "namespace", "member_count")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_COUNT_FIELD_NUMBER: _ClassVar[int]
    format: int
    job: str
    generation: int
    parent: int
    time_ns: int
    page_size: int
    namespace: str
    member_count: int
    def __init__(self, format: _Optional[int] = ..., job: _Optional[str] = ..., generation: _Optional[int] = ..., parent: _Optional[int] = ..., time_ns: _Optional[int] = ..., page_size: _Optional[int] = ..., namespace: _Optional[str] = ..., member_count: _Optional[int] = ...) -> None: ...

class ManifestMember(_message.Message):
    __slots__ = ("name", "region_count", "thread_count", "kernel", "layout")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REGION_COUNT_FIELD_NUMBER: _ClassVar[int]
    THREAD_COUNT_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    region_count: int
    thread_count: int
    kernel: KernelState
    layout: _containers.RepeatedCompositeFieldContainer[RegionMapping]
    def __init__(self, name: _Optional[str] = ..., region_count: _Optional[int] = ..., thread_count: _Optional[int] = ..., kernel: _Optional[_Union[KernelState, _Mapping]] = ..., layout: _Optional[_Iterable[_Union[RegionMapping, _Mapping]]] = ...) -> None: ...

class KernelState(_message.Message):
    __slots__ = ("fds", "partial")
    FDS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    fds: _containers.RepeatedCompositeFieldContainer[KernelFd]
    partial: str
    def __init__(self, fds: _Optional[_Iterable[_Union[KernelFd, _Mapping]]] = ..., partial: _Optional[str] = ...) -> None: ...

class KernelFd(_message.Message):
    __slots__ = ("fd", "target", "kind", "pos", "flags", "ino", "mnt_id", "unread", "unsent")
    FD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    POS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    INO_FIELD_NUMBER: _ClassVar[int]
    MNT_ID_FIELD_NUMBER: _ClassVar[int]
    UNREAD_FIELD_NUMBER: _ClassVar[int]
    UNSENT_FIELD_NUMBER: _ClassVar[int]
    fd: int
    target: str
    kind: str
    pos: int
    flags: int
    ino: int
    mnt_id: int
    unread: int
    unsent: int
    def __init__(self, fd: _Optional[int] = ..., target: _Optional[str] = ..., kind: _Optional[str] = ..., pos: _Optional[int] = ..., flags: _Optional[int] = ..., ino: _Optional[int] = ..., mnt_id: _Optional[int] = ..., unread: _Optional[int] = ..., unsent: _Optional[int] = ...) -> None: ...

class ManifestRegion(_message.Message):
    __slots__ = ("name", "start", "end", "entry_count", "mappings")
    NAME_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ENTRY_COUNT_FIELD_NUMBER: _ClassVar[int]
    MAPPINGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    start: int
    end: int
    entry_count: int
    mappings: _containers.RepeatedCompositeFieldContainer[RegionMapping]
    def __init__(self, name: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., entry_count: _Optional[int] = ..., mappings: _Optional[_Iterable[_Union[RegionMapping, _Mapping]]] = ...) -> None: ...

class RegionMapping(_message.Message):
    __slots__ = ("start", "end", "perms", "dev", "inode", "offset", "path", "owner", "file_size", "file_mtime_ns")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PERMS_FIELD_NUMBER: _ClassVar[int]
    DEV_FIELD_NUMBER: _ClassVar[int]
    INODE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    FILE_MTIME_NS_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    perms: str
    dev: str
    inode: int
    offset: int
    path: str
    owner: str
    file_size: int
    file_mtime_ns: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., perms: _Optional[str] = ..., dev: _Optional[str] = ..., inode: _Optional[int] = ..., offset: _Optional[int] = ..., path: _Optional[str] = ..., owner: _Optional[str] = ..., file_size: _Optional[int] = ..., file_mtime_ns: _Optional[int] = ...) -> None: ...

class PageEntries(_message.Message):
    __slots__ = ("page_offsets", "page_counts", "chunk_skips", "chunk_ids")
    PAGE_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    PAGE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SKIPS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    page_offsets: bytes
    page_counts: bytes
    chunk_skips: bytes
    chunk_ids: bytes
    def __init__(self, page_offsets: _Optional[bytes] = ..., page_counts: _Optional[bytes] = ..., chunk_skips: _Optional[bytes] = ..., chunk_ids: _Optional[bytes] = ...) -> None: ...

class ManifestThread(_message.Message):
    __slots__ = ("tid", "arch", "regs", "fpregs", "start_time")
    TID_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    REGS_FIELD_NUMBER: _ClassVar[int]
    FPREGS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    tid: int
    arch: str
    regs: bytes
    fpregs: bytes
    start_time: int
    def __init__(self, tid: _Optional[int] = ..., arch: _Optional[str] = ..., regs: _Optional[bytes] = ..., fpregs: _Optional[bytes] = ..., start_time: _Optional[int] = ...) -> None: ...

class ManifestTrailer(_message.Message):
    __slots__ = ("frame_count", "entry_count", "page_count")
    FRAME_COUNT_FIELD_NUMBER: _ClassVar[int]
    ENTRY_COUNT_FIELD_NUMBER: _ClassVar[int]
    PAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    frame_count: int
    entry_count: int
    page_count: int
    def __init__(self, frame_count: _Optional[int] = ..., entry_count: _Optional[int] = ..., page_count: _Optional[int] = ...) -> None: ...

class ManifestFrame(_message.Message):
    __slots__ = ("header", "member", "region", "entries", "trailer", "thread")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    THREAD_FIELD_NUMBER: _ClassVar[int]
    header: ManifestHeader
    member: ManifestMember
    region: ManifestRegion
    entries: PageEntries
    trailer: ManifestTrailer
    thread: ManifestThread
    def __init__(self, header: _Optional[_Union[ManifestHeader, _Mapping]] = ..., member: _Optional[_Union[ManifestMember, _Mapping]] = ..., region: _Optional[_Union[ManifestRegion, _Mapping]] = ..., entries: _Optional[_Union[PageEntries, _Mapping]] = ..., trailer: _Optional[_Union[ManifestTrailer, _Mapping]] = ..., thread: _Optional[_Union[ManifestThread, _Mapping]] = ...) -> None: ...
