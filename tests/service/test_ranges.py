"""HTTP Range / Content-Range parsing against a direct reading of RFC 9110 14.1.2."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.http.ranges import (
    BadContentRangeError,
    ByteRange,
    RangeNotSatisfiableError,
    parse_content_range,
    parse_range,
)

sizes = st.integers(min_value=1, max_value=1 << 40)
bounds = st.integers(min_value=0, max_value=(1 << 41))


@given(size=sizes, first=bounds, last=bounds)
def test_first_last(size: int, first: int, last: int) -> None:
    header = f"bytes={first}-{last}"
    if last < first or first >= size:
        with pytest.raises(RangeNotSatisfiableError):
            parse_range(header, size)
    else:
        got = parse_range(header, size)
        assert got == ByteRange(first, min(last, size - 1))
        assert got is not None and 1 <= got.length <= size


@given(size=sizes, first=bounds)
def test_open_ended(size: int, first: int) -> None:
    if first >= size:
        with pytest.raises(RangeNotSatisfiableError):
            parse_range(f"bytes={first}-", size)
    else:
        assert parse_range(f"bytes={first}-", size) == ByteRange(first, size - 1)


@given(size=sizes, suffix=bounds)
def test_suffix(size: int, suffix: int) -> None:
    if suffix == 0:
        with pytest.raises(RangeNotSatisfiableError):
            parse_range(f"bytes=-{suffix}", size)
    else:
        got = parse_range(f"bytes=-{suffix}", size)
        assert got == ByteRange(max(0, size - suffix), size - 1)
        assert got is not None and got.content_range(size).endswith(f"/{size}")


@given(text=st.text(max_size=40), size=sizes)
def test_any_header_parses_or_is_refused(text: str, size: int) -> None:
    try:
        got = parse_range(text, size)
    except RangeNotSatisfiableError:
        return
    assert got is None or 0 <= got.first <= got.last < size


def test_fixed_cases() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("items=0-5", 10) is None  # another unit: ignored
    assert parse_range(" bytes = 2-3 ".replace(" = ", "="), 10) == ByteRange(2, 3)
    for bad in ("bytes=0-1,3-4", "bytes=", "bytes=-", "bytes=a-b", "bytes=1-2-3", "bytes=" + "9" * 30 + "-"):
        with pytest.raises(RangeNotSatisfiableError):
            parse_range(bad, 10)


def test_content_range() -> None:
    assert parse_content_range("bytes 0-511/*") == (0, 511, None)
    assert parse_content_range("bytes 512-1023/4096") == (512, 1023, 4096)
    for bad in (
        "bytes 5-1/*",
        "bytes 0-1",
        "0-1/*",
        "bytes */10",
        "bytes -1-5/*",
        "bytes 0-" + "9" * 30 + "/*",
    ):
        with pytest.raises(BadContentRangeError):
            parse_content_range(bad)
