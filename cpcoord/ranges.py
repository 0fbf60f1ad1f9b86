"""Address ranges and page arithmetic as values, with parse/format pairs.

Ranges are half-open `[start, end)` like /proc/PID/maps (the seed's inclusive end is
`end + 1`). Addresses parse from hex (`0x7f...`) or decimal and format as hex.
"""

from __future__ import annotations

import mmap
import re
from dataclasses import dataclass
from functools import cache

from cpcoord.errors import (
    InvalidName,
    RangeBeyondAddressSpace,
    RangeEmpty,
    RangeInverted,
    RangeSyntax,
)

PAGE_SIZE = mmap.PAGESIZE
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1


@cache
def user_space_end() -> int:
    """First address above the user address space (x86-64: 47 bits, 56 with LA57)."""
    try:
        with open("/proc/cpuinfo") as f:
            la57 = any(" la57" in line for line in f if line.startswith("flags"))
    except OSError:
        la57 = False
    return ((1 << 56) if la57 else (1 << 47)) - PAGE_SIZE


def parse_address(text: str) -> int:
    """Parse `0x...` hex or decimal; raise ValueError on anything else."""
    t = text.strip().lower()
    if re.fullmatch(r"0x[0-9a-f]+", t):
        return int(t, 16)
    if re.fullmatch(r"[0-9]+", t):
        return int(t, 10)
    raise ValueError(text)


def format_address(addr: int) -> str:
    return f"0x{addr:x}"


@dataclass(frozen=True, order=True)
class AddressRange:
    """A half-open byte range `[start, end)` of a process's address space."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> AddressRange:
        """Parse `START-END`; validates syntax, order and the address-space limit."""
        parts = text.split("-")
        if len(parts) != 2:
            raise RangeSyntax(text)
        try:
            start, end = parse_address(parts[0]), parse_address(parts[1])
        except ValueError:
            raise RangeSyntax(text) from None
        rng = cls(start, end)
        rng.validate()
        return rng

    def format(self) -> str:
        return f"{format_address(self.start)}-{format_address(self.end)}"

    def __str__(self) -> str:
        return self.format()

    def validate(self) -> None:
        """Raise a range error unless this range can hold at least one whole user page."""
        if self.end < self.start:
            raise RangeInverted(self.format())
        if self.end > user_space_end():
            raise RangeBeyondAddressSpace(self.format(), format_address(user_space_end()))
        if self.page_end <= self.page_start:
            raise RangeEmpty(self.format())

    @property
    def page_start(self) -> int:
        """First page-aligned address whose page lies fully inside the range."""
        return (self.start + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)

    @property
    def page_end(self) -> int:
        """End of the last page that lies fully inside the range."""
        return self.end & ~(PAGE_SIZE - 1)

    @property
    def size(self) -> int:
        return self.end - self.start

    def intersect(self, other: AddressRange) -> AddressRange | None:
        s, e = max(self.start, other.start), min(self.end, other.end)
        return AddressRange(s, e) if s < e else None


_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


def check_name(name: str) -> str:
    """Validate a job, member or region name: safe as a single path component."""
    if not _NAME_RE.fullmatch(name):
        raise InvalidName(name)
    return name
