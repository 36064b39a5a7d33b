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


def test_only_ascii_digits() -> None:
    """``\\d`` took other scripts' digits: "bytes=\\u0663-\\u0665" was bytes 3-5."""
    for header in (
        "bytes=\u0663-\u0665",
        "bytes=-\u0665",
        "bytes=\uff11-2",
        "bytes=+1-2",
        "bytes=0x1-2",
        "bytes=1e2-",
    ):
        with pytest.raises(RangeNotSatisfiableError):
            parse_range(header, 10)
    for header in ("bytes \u0663-\u0665/*", "bytes 1-2/\u0665", "bytes +1-2/*"):
        with pytest.raises(BadContentRangeError):
            parse_content_range(header)


def test_messages_say_what_is_wrong() -> None:
    """The clamped end is never printed: a range past the end says where it starts."""
    past = "range starts at 2000000000, past the end of the disk (1073741824 bytes)"
    cases = {
        "bytes=2000000000-": past,
        "bytes=2000000000-2000000001": past,
        "bytes=9-3": "range 9-3 ends before it starts",
        "bytes=1-2,4-5": "several ranges in one request are not supported: ask for one",
        "bytes=-0": "the suffix range bytes=-0 asks for no bytes",
        "bytes=-" + "9" * 30: "the range's suffix length has more than 19 digits",
        "bytes=" + "9" * 30 + "-": "the range's first position has more than 19 digits",
        "bytes=x": "the byte range is malformed: want bytes=first-last, bytes=first- or bytes=-suffix",
        "bytes=": "the byte range is malformed: want bytes=first-last, bytes=first- or bytes=-suffix",
        "0-5": "the Range header is malformed: want bytes=first-last, bytes=first- or bytes=-suffix",
    }
    for header, message in cases.items():
        with pytest.raises(RangeNotSatisfiableError) as caught:
            parse_range(header, 1 << 30)
        assert str(caught.value) == message, header
    with pytest.raises(RangeNotSatisfiableError, match="the disk is empty"):
        parse_range("bytes=-5", 0)
    with pytest.raises(BadContentRangeError) as bad:
        parse_content_range("bytes 5-1/*")
    assert str(bad.value) == "Content-Range 5-1 ends before it starts"
    with pytest.raises(BadContentRangeError) as bad:
        parse_content_range("bytes 0-\x00/*")
    assert (
        str(bad.value) == "Content-Range is malformed: want bytes first-last/* (or /SIZE)"
    )  # input not echoed


def test_whitespace_and_empty_elements() -> None:
    assert parse_range("bytes=0-5,", 10) == ByteRange(0, 5)  # RFC 9110 5.6.1: empty elements ignored
    assert parse_range("bytes=, 2-3", 10) == ByteRange(2, 3)
    assert parse_range("\tbytes=2-3 ", 10) == ByteRange(2, 3)
    assert parse_range("BYTES=2-3", 10) == ByteRange(2, 3)
    assert parse_range("bytes=0000000000000000000000001-2", 10) == ByteRange(1, 2)  # zeros are not digits
    with pytest.raises(RangeNotSatisfiableError):
        parse_range("bytes=\u30002-3", 10)  # an ideographic space is no HTTP whitespace
