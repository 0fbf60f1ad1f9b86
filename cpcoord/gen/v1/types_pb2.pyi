from cpcoord.gen.v1 import manifest_pb2 as _manifest_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PageRun(_message.Message):
    __slots__ = ("offset", "count")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    offset: int
    count: int
    def __init__(self, offset: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("name", "start", "end", "pages", "all_pages", "mappings")
    NAME_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    ALL_PAGES_FIELD_NUMBER: _ClassVar[int]
    MAPPINGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    start: int
    end: int
    pages: _containers.RepeatedCompositeFieldContainer[PageRun]
    all_pages: _containers.RepeatedCompositeFieldContainer[PageRun]
    mappings: _containers.RepeatedCompositeFieldContainer[_manifest_pb2.RegionMapping]
    def __init__(self, name: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., pages: _Optional[_Iterable[_Union[PageRun, _Mapping]]] = ..., all_pages: _Optional[_Iterable[_Union[PageRun, _Mapping]]] = ..., mappings: _Optional[_Iterable[_Union[_manifest_pb2.RegionMapping, _Mapping]]] = ...) -> None: ...

class ProcessIdentity(_message.Message):
    __slots__ = ("pid", "start_time")
    PID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    pid: int
    start_time: int
    def __init__(self, pid: _Optional[int] = ..., start_time: _Optional[int] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("name", "process", "regions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    process: ProcessIdentity
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    def __init__(self, name: _Optional[str] = ..., process: _Optional[_Union[ProcessIdentity, _Mapping]] = ..., regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ...) -> None: ...

class ImageMetadata(_message.Message):
    __slots__ = ("format", "job", "generation", "members", "parent", "tracker")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    TRACKER_FIELD_NUMBER: _ClassVar[int]
    format: str
    job: str
    generation: int
    members: _containers.RepeatedCompositeFieldContainer[Member]
    parent: str
    tracker: str
    def __init__(self, format: _Optional[str] = ..., job: _Optional[str] = ..., generation: _Optional[int] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., parent: _Optional[str] = ..., tracker: _Optional[str] = ...) -> None: ...
