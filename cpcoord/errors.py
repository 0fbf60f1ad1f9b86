"""The one error hierarchy of cpcoord.

Modeled on borg: each class's docstring is its message (a str.format template filled with
the constructor's arguments), `exit_code` is what the CLI exits with, and `status` names
the gRPC status code a servicer converts it to. Conversion happens only in the CLI entry
point and in servicers (cpcoord.grpcutil), nowhere else.

Exit codes (also in docs/exit-codes.md):
  0 success, 1 unexpected error, 2 usage error (argparse),
  10-19 process and capture errors, 20-29 ranges and input, 30-39 files and images,
  40-49 trackers, 50-59 coordinator and protocol, 60-69 store.
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
# 55 and 59 are free. An unknown generation is the store's NoSuchGeneration (66).


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


class JobBusy(CpcoordError):
    """job {} is busy: generation {} is in flight"""

    exit_code = 56
    status = "FAILED_PRECONDITION"


class AgentUnavailable(CpcoordError):
    """node {!r} has no connected agent"""

    exit_code = 57
    status = "UNAVAILABLE"


class DuplicateMember(CpcoordError):
    """job {} already has a member {!r}"""

    exit_code = 58
    status = "ALREADY_EXISTS"
