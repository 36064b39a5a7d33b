"""The REST API's strict parsers: every value int(), bool() or json.loads() would take loosely."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import MultiDict

from service.http.errors import ApiError, ErrorCode
from service.http.params import (
    MAX_INT,
    MAX_JSON,
    check_query,
    parse_bearer,
    parse_bool,
    parse_extents,
    parse_json_object,
    parse_patch,
    parse_sector_read,
    parse_sector_write,
    parse_uint,
    parse_write_target,
)

SIZE = 1 << 20  # a 1 MiB disk: 2048 sectors
INT64 = "0..9223372036854775807"
NOT_INTEGER = f"offset must be a JSON integer in {INT64}, not "
FRACTION = "with a fraction or exponent"
NO_NAN = "(RFC 8259 has no NaN or Infinity)"


def refused(code: ErrorCode) -> pytest.RaisesExc[ApiError]:
    return pytest.raises(ApiError, check=lambda e: e.code is code)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "-5",
        "-0",
        "+5",
        " 5",
        "5 ",
        "1e3",
        "0x10",
        "1_000",
        "1.0",
        "\u0663",
        "\u00b2",
        "\uff15",
        "NaN",
        "inf",
        "5\n",
    ],
)
def test_integers_are_ascii_digits_only(text: str) -> None:
    with refused(ErrorCode.BAD_PARAMETER) as caught:
        parse_uint(text, "offset")
    assert caught.value.status == 400
    assert caught.value.message.startswith("offset must be a decimal integer in 0..")


def test_integer_bounds() -> None:
    assert parse_uint("0", "x") == 0
    assert parse_uint("00012", "x") == 12  # leading zeros are still base 10
    assert parse_uint(str(MAX_INT), "x") == MAX_INT
    assert parse_uint("0" * 50 + "7", "x") == 7
    for text in (str(MAX_INT + 1), str(1 << 64), "9" * 5000):
        with refused(ErrorCode.BAD_PARAMETER) as caught:
            parse_uint(text, "offset")
        assert "0..9223372036854775807" in caught.value.message
        assert len(caught.value.message) < 200  # never the number itself, whatever its size
    with refused(ErrorCode.BAD_PARAMETER) as caught:
        parse_uint("0", "count", minimum=1, maximum=65536)
    assert caught.value.message == "count must be in 1..65536, not 0"


@given(st.integers(min_value=0, max_value=MAX_INT))
def test_every_int64_round_trips(value: int) -> None:
    assert parse_uint(str(value), "x") == value


@given(st.text(max_size=30))
def test_any_text_is_a_number_or_refused(text: str) -> None:
    try:
        value = parse_uint(text, "x")
    except ApiError as exc:
        assert exc.code is ErrorCode.BAD_PARAMETER
    else:
        assert text.isascii() and text.isdigit() and 0 <= value <= MAX_INT


def test_booleans() -> None:
    for text in ("y", "yes", "true", "1", "on", "Y", "TRUE"):
        assert parse_bool(text, "flush") is True
    for text in ("n", "no", "false", "0", "off", "N"):
        assert parse_bool(text, "flush") is False
    for text in ("", "maybe", " y", "y ", "2", "\uff59", "yes!"):
        with refused(ErrorCode.BAD_PARAMETER):
            parse_bool(text, "flush")


def test_query_keys_are_known_and_given_once() -> None:
    check_query(MultiDict([("offset", "1"), ("flush", "n")]), {"offset", "flush"})
    with refused(ErrorCode.BAD_PARAMETER) as caught:
        check_query(MultiDict([("ofset", "4096")]), {"offset", "flush"})
    assert caught.value.message == 'unknown query parameter "ofset"; it takes flush, offset'
    with refused(ErrorCode.BAD_PARAMETER) as caught:
        check_query(MultiDict([("<script>", "")]), {"count"})
    assert caught.value.message == "unknown query parameter; it takes count"  # not echoed
    with refused(ErrorCode.BAD_PARAMETER) as caught:
        check_query(MultiDict([("flush", "y"), ("flush", "n")]), {"flush"})
    assert caught.value.message == "query parameter flush is given more than once"
    with refused(ErrorCode.BAD_PARAMETER):
        check_query(MultiDict([("count", "1")]), set())


def test_sectors() -> None:
    span = parse_sector_read("10", {"count": "4"}, SIZE)
    assert (span.lba, span.count) == (10, 4)
    with refused(ErrorCode.BAD_PARAMETER):
        parse_sector_read("-5", {}, SIZE)
    with refused(ErrorCode.BAD_PARAMETER):
        parse_sector_read("5", {"count": "65537"}, SIZE)
    with refused(ErrorCode.RANGE_NOT_SATISFIABLE) as caught:
        parse_sector_read("2048", {}, SIZE)
    assert caught.value.message == "sector 2048 is past the end of the disk (2048 sectors)"
    assert caught.value.headers == {"Content-Range": f"bytes */{SIZE}"}
    with refused(ErrorCode.RANGE_NOT_SATISFIABLE) as caught:
        parse_sector_read("2047", {"count": "2"}, SIZE)
    assert (
        caught.value.message
        == "2 sectors at 2047 run past the end of the disk (2048 sectors, the last is 2047)"
    )
    with refused(ErrorCode.RANGE_NOT_SATISFIABLE):
        parse_sector_read(str(MAX_INT), {}, SIZE)
    assert parse_sector_write("3", {"count": "2"}, 1024, SIZE).count == 2
    with refused(ErrorCode.LENGTH_MISMATCH):
        parse_sector_write("3", {"count": "1"}, 1024, SIZE)
    with refused(ErrorCode.LENGTH_REQUIRED):
        parse_sector_write("3", {}, None, SIZE)
    for length in (0, 100, 513, 65537 * 512):
        with refused(ErrorCode.BAD_LENGTH):
            parse_sector_write("3", {}, length, SIZE)


def test_write_target() -> None:
    target = parse_write_target({"Content-Range": "bytes 10-19/*"}, 10, {"flush": "n"}, SIZE)
    assert (target.offset, target.length, target.flush) == (10, 10, False)
    target = parse_write_target({}, 512, {"offset": "512"}, SIZE)
    assert (target.offset, target.length, target.flush) == (512, 512, True)
    with refused(ErrorCode.BAD_PARAMETER):
        parse_write_target({"Content-Range": "bytes 0-9/*"}, 10, {"offset": "0"}, SIZE)
    with refused(ErrorCode.BAD_CONTENT_RANGE) as caught:
        parse_write_target({"Content-Range": "bytes ٣-٩/*"}, 7, {}, SIZE)
    assert caught.value.message == "Content-Range is malformed: want bytes first-last/* (or /SIZE)"
    with refused(ErrorCode.RANGE_NOT_SATISFIABLE) as caught:
        parse_write_target({"Content-Range": f"bytes {SIZE}-{SIZE + 9}/*"}, 10, {}, SIZE)
    assert caught.value.message == f"the write starts at {SIZE}, past the end of the disk ({SIZE} bytes)"
    with refused(ErrorCode.RANGE_NOT_SATISFIABLE) as caught:
        parse_write_target({}, 20, {"offset": str(SIZE - 10)}, SIZE)
    assert (
        caught.value.message
        == f"the write of 20 bytes at {SIZE - 10} runs past the end of the disk ({SIZE} bytes)"
    )
    with refused(ErrorCode.LENGTH_REQUIRED):
        parse_write_target({}, None, {}, SIZE)


def test_json_objects_are_strict() -> None:
    assert parse_json_object(b'{"op": "flush"}') == {"op": "flush"}
    cases = {
        b"": "the body is not valid JSON: Expecting value at line 1 column 1",
        b'{"op": "zero", "op": "flush"}': 'the body is refused: key "op" appears twice',
        b'{"offset": NaN}': f"the body is refused: NaN is not JSON {NO_NAN}",
        b'{"offset": -Infinity}': f"the body is refused: -Infinity is not JSON {NO_NAN}",
        b"[" * 60000: "the body is nested too deeply",
        b'\xff{"op": "flush"}': "the body is not UTF-8 text",
        b"[1]": "the body must be a JSON object",
        b'"op"': "the body must be a JSON object",
    }
    for raw, message in cases.items():
        with refused(ErrorCode.BAD_JSON) as caught:
            parse_json_object(raw)
        assert caught.value.message == message
    with refused(ErrorCode.PAYLOAD_TOO_LARGE):
        parse_json_object(b" " * (MAX_JSON + 1))


def test_patch_fields() -> None:
    assert parse_patch(b'{"op": "flush"}', SIZE).op == "flush"
    patch = parse_patch(b'{"op": "zero", "offset": 512, "size": 1024, "flush": true}', SIZE)
    assert (patch.op, patch.offset, patch.size, patch.flush) == ("zero", 512, 1024, True)
    bad = {
        '{"op": "melt"}': (ErrorCode.BAD_OP, "op must be one of zero, discard, flush, resize, throttle"),
        '{"offset": 0}': (ErrorCode.BAD_OP, "op must be one of zero, discard, flush, resize, throttle"),
        '{"op": "flush", "offset": 0}': (ErrorCode.BAD_FIELD, 'unknown field "offset"; op flush takes op'),
        '{"op": "zero", "size": 1}': (ErrorCode.BAD_FIELD, f"offset is required: an integer in {INT64}"),
        '{"op": "zero", "offset": -1, "size": 1}': (
            ErrorCode.BAD_FIELD,
            f"offset must be in {INT64}, not -1",
        ),
        '{"op": "zero", "offset": 1e3, "size": 1}': (
            ErrorCode.BAD_FIELD,
            f"{NOT_INTEGER}a number {FRACTION}",
        ),
        '{"op": "zero", "offset": 1.0, "size": 1}': (
            ErrorCode.BAD_FIELD,
            f"{NOT_INTEGER}a number {FRACTION}",
        ),
        '{"op": "zero", "offset": "5", "size": 1}': (ErrorCode.BAD_FIELD, f"{NOT_INTEGER}a string"),
        '{"op": "zero", "offset": true, "size": 1}': (ErrorCode.BAD_FIELD, f"{NOT_INTEGER}a boolean"),
        '{"op": "zero", "offset": null, "size": 1}': (ErrorCode.BAD_FIELD, f"{NOT_INTEGER}null"),
        '{"op": "zero", "offset": 0, "size": 0}': (
            ErrorCode.BAD_FIELD,
            "size must be in 1..9223372036854775807, not 0",
        ),
        f'{{"op": "zero", "offset": {1 << 63}, "size": 1}}': (
            ErrorCode.BAD_FIELD,
            f"offset must be in {INT64}, not {1 << 63}",
        ),
        '{"op": "zero", "offset": 1' + "0" * 5000 + ', "size": 1}': (
            ErrorCode.BAD_FIELD,
            f"offset must be in {INT64}: it is far larger",
        ),
        '{"op": "zero", "offset": 0, "size": 1, "flush": "yes"}': (
            ErrorCode.BAD_FIELD,
            "flush must be true or false, not a string",
        ),
        '{"op": "discard", "offset": 0, "length": 1}': (
            ErrorCode.BAD_FIELD,
            'unknown field "length"; op discard takes op, offset, size, flush',
        ),
        f'{{"op": "zero", "offset": {SIZE}, "size": 1}}': (
            ErrorCode.RANGE_NOT_SATISFIABLE,
            f"the zero starts at {SIZE}, past the end of the disk ({SIZE} bytes)",
        ),
        f'{{"op": "discard", "offset": 0, "size": {SIZE + 1}}}': (
            ErrorCode.RANGE_NOT_SATISFIABLE,
            f"the discard of {SIZE + 1} bytes at 0 runs past the end of the disk ({SIZE} bytes)",
        ),
    }
    for raw, (code, message) in bad.items():
        with refused(code) as caught:
            parse_patch(raw.encode(), SIZE)
        assert caught.value.message == message, raw


@given(
    st.dictionaries(st.sampled_from(["op", "offset", "size", "flush", "x"]), st.from_type(object), max_size=5)
)
def test_any_patch_parses_or_is_refused(body: dict[str, object]) -> None:
    try:
        raw = json.dumps(body).encode()
    except (TypeError, ValueError):
        return
    try:
        patch = parse_patch(raw, SIZE)
    except ApiError as exc:
        assert 400 <= exc.status < 500
    else:
        assert patch.offset + patch.size <= SIZE


def test_extents_query() -> None:
    query = parse_extents({}, SIZE)
    assert (query.offset, query.length, query.context) == (0, SIZE, "zero")
    query = parse_extents({"context": "zero", "offset": "512", "length": "512"}, SIZE)
    assert (query.offset, query.length) == (512, 512)
    query = parse_extents({"context": "dirty", "bitmap": "b0", "length": "4096"}, SIZE)
    assert (query.offset, query.length, query.context, query.bitmap) == (0, 4096, "dirty", "b0")
    assert parse_extents({"context": "dirty"}, SIZE).bitmap is None
    with refused(ErrorCode.BAD_PARAMETER):
        parse_extents({"bitmap": "b0"}, SIZE)  # a bitmap without context=dirty
    with refused(ErrorCode.BAD_PARAMETER):
        parse_extents({"context": "ZERO"}, SIZE)
    with refused(ErrorCode.RANGE_NOT_SATISFIABLE) as caught:
        parse_extents({"offset": str(SIZE)}, SIZE)
    assert caught.value.message == f"offset {SIZE} is past the end of the disk ({SIZE} bytes)"
    with refused(ErrorCode.BAD_PARAMETER):
        parse_extents({"length": "0"}, SIZE)


def test_bearer() -> None:
    assert parse_bearer("Bearer abc.DEF-123") == "abc.DEF-123"
    assert parse_bearer("bearer   abc ") == "abc"
    for header in (
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic abc",
        "Bearer a b",
        "Bearer \udcff\udcfe",
        "Bearer é",
    ):
        assert parse_bearer(header) is None
