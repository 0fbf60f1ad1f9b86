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


# -- trackers (40-49) -----------------------------------------------------------------


class TrackerUnavailable(CpcoordError):
    """tracker {} is not available: {}"""

    exit_code = 40
    status = "FAILED_PRECONDITION"


class TrackerFailed(CpcoordError):
    """tracker {} failed on pid {}: {}"""

    exit_code = 41
    status = "INTERNAL"
