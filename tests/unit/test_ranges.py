from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpcoord import errors
from cpcoord.ranges import PAGE_SIZE, AddressRange, check_name, user_space_end


def test_parse_hex_and_decimal() -> None:
    r = AddressRange.parse("0x1000-8192")
    assert (r.start, r.end) == (0x1000, 0x2000)
    assert r.format() == "0x1000-0x2000"


@pytest.mark.parametrize(
    ("text", "err"),
    [
        ("", errors.RangeSyntax),
        ("0x1000", errors.RangeSyntax),
        ("0xzz-0x2000", errors.RangeSyntax),
        ("1-2-3", errors.RangeSyntax),
        ("0x3000-0x1000", errors.RangeInverted),
        ("0x1000-0x1000", errors.RangeEmpty),
        ("0x1001-0x2fff", errors.RangeEmpty),
        (f"0x1000-{hex(user_space_end() + PAGE_SIZE)}", errors.RangeBeyondAddressSpace),
    ],
)
def test_parse_errors(text: str, err: type[Exception]) -> None:
    with pytest.raises(err):
        AddressRange.parse(text)


@given(st.integers(0, 1 << 46), st.integers(PAGE_SIZE, 1 << 30))
def test_format_parse_roundtrip_and_page_rule(start: int, length: int) -> None:
    r = AddressRange(start, start + length)
    if r.page_end <= r.page_start:
        return
    assert AddressRange.parse(r.format()) == r
    assert r.page_start >= r.start and r.page_end <= r.end
    assert r.page_start % PAGE_SIZE == 0 and r.page_end % PAGE_SIZE == 0
    assert r.page_start - r.start < PAGE_SIZE and r.end - r.page_end < PAGE_SIZE


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "x" * 65, "a b"])
def test_bad_names(bad: str) -> None:
    with pytest.raises(errors.InvalidName):
        check_name(bad)


def test_good_names() -> None:
    assert check_name("rank-0") == "rank-0"
