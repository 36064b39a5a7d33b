"""Strict parsers of what a REST request carries: path and query values, headers, JSON bodies.

Service layer, REST front end, sans I/O: strings and bytes in, typed values out, or an
:class:`~service.http.errors.ApiError` (400, 404, 411, 416) with a stable code and a sentence.
One parser per kind of value (decimal integer, boolean, choice, JSON object and its fields),
and one per request shape on top of them, so the handlers in :mod:`service.http.api` do I/O
and no checks of their own. A value the client sent is echoed in a message only when it is
plainly safe (a number we parsed, a name of letters and digits).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Collection, Mapping
from typing import Final, Literal, TypeVar

from multidict import MultiMapping

from service.blockio import SECTOR
from service.http.errors import ApiError, ErrorCode, unsatisfiable
from service.http.ranges import (
    BadContentRangeError,
    ByteRange,
    RangeNotSatisfiableError,
    parse_content_range,
    parse_range,
)
from service.values import DISK_NAME, boolean

MAX_INT: Final = (1 << 63) - 1  # offsets, sizes and sectors all fit a signed 64-bit integer
MAX_SECTORS: Final = 65536  # 32 MiB per /sectors request, as NBD's maximum request
MAX_JSON: Final = 64 * 1024  # bytes of a PATCH body
_MAX_DIGITS: Final = len(str(MAX_INT))

# Digits 0-9 only: no sign, space, "_", "0x10", "1e3" or other scripts' digits (U+0663), each
# of which int() or str.isdigit() takes.
_DECIMAL = re.compile(r"[0-9]+", re.ASCII)
_TOKEN = re.compile(r"[\x21-\x7e]+", re.ASCII)  # visible ASCII: what a vblk token may be

PatchOp = Literal["zero", "discard", "flush"]
ExtentsContext = Literal["zero", "dirty"]


def shown(text: str) -> str | None:
    """``text`` in double quotes if it is a plain name (letters, digits, ``._-``), else None."""
    return f'"{text}"' if DISK_NAME.fullmatch(text) else None


def no_such_disk(name: str) -> ApiError:
    """The refusal of a path naming a disk that is not there (the name quoted when it is plain)."""
    quoted = shown(name)
    return ApiError(
        ErrorCode.NO_SUCH_DISK,
        f"no disk is named {quoted}: GET /v1/disks lists them"
        if quoted
        else "no disk has that name: GET /v1/disks lists them",
    )


def _bounds(minimum: int, maximum: int) -> str:
    return f"in {minimum}..{maximum}"


# -- values --------------------------------------------------------------------------------------


def parse_uint(
    text: str,
    name: str,
    *,
    minimum: int = 0,
    maximum: int = MAX_INT,
) -> int:
    """A decimal integer of ASCII digits in ``minimum..maximum`` (at most 2**63 - 1)."""
    if _DECIMAL.fullmatch(text) is None:
        raise ApiError(
            ErrorCode.BAD_PARAMETER,
            f"{name} must be a decimal integer {_bounds(minimum, maximum)} "
            "(digits 0-9 only: no sign, spaces, exponent or hex)",
        )
    digits = text.lstrip("0") or "0"
    if len(digits) > _MAX_DIGITS:
        raise ApiError(
            ErrorCode.BAD_PARAMETER,
            f"{name} must be {_bounds(minimum, maximum)}; this number has {len(digits)} digits",
        )
    value = int(digits)
    if not minimum <= value <= maximum:
        raise ApiError(ErrorCode.BAD_PARAMETER, f"{name} must be {_bounds(minimum, maximum)}, not {value}")
    return value


def parse_bool(text: str, name: str) -> bool:
    """``y``/``n`` (or yes/no, true/false, 1/0, on/off; any case)."""
    value = boolean(text) if text == text.strip() else None
    if value is not None:
        return value
    raise ApiError(ErrorCode.BAD_PARAMETER, f"{name} must be y or n (or yes/no, true/false, 1/0, on/off)")


def parse_choice(text: str, name: str, choices: Collection[str]) -> str:
    if text not in choices:
        raise ApiError(ErrorCode.BAD_PARAMETER, f"{name} must be one of {', '.join(choices)}")
    return text


# -- query strings -------------------------------------------------------------------------------

_QUERY: Final = "vblk_query"
_Handler = TypeVar("_Handler", bound=Callable[..., object])


def takes_query(*names: str) -> Callable[[_Handler], _Handler]:
    """Declare the query parameters a handler takes; the middleware refuses any other.

    Handlers without the declaration (health, metrics, the UI page) are not checked, so a
    scraper's or a browser's extra parameters do no harm there.
    """

    def declare(handler: _Handler) -> _Handler:
        setattr(handler, _QUERY, frozenset(names))
        return handler

    return declare


def declared_query(handler: object) -> frozenset[str] | None:
    """The parameters :func:`takes_query` declared for ``handler``, or None if it did not."""
    names = getattr(handler, _QUERY, None)
    return names if isinstance(names, frozenset) else None


def check_query(query: MultiMapping[str], allowed: Collection[str]) -> None:
    """Every parameter is one the route takes, and none is given twice.

    A typo must not pass silently: ``PUT ...?ofset=4096`` would otherwise write at offset 0.
    """
    seen: set[str] = set()
    for key, _ in query.items():  # items(), not keys(): those are listed once
        if key not in allowed:
            name = shown(key)
            takes = f"it takes {', '.join(sorted(allowed))}" if allowed else "it takes none"
            raise ApiError(
                ErrorCode.BAD_PARAMETER,
                f"unknown query parameter {name}; {takes}" if name else f"unknown query parameter; {takes}",
            )
        if key in seen:
            raise ApiError(ErrorCode.BAD_PARAMETER, f"query parameter {key} is given more than once")
        seen.add(key)


def query_uint(
    query: Mapping[str, str], name: str, default: int, *, minimum: int = 0, maximum: int = MAX_INT
) -> int:
    text = query.get(name)
    return default if text is None else parse_uint(text, name, minimum=minimum, maximum=maximum)


def query_bool(query: Mapping[str, str], name: str, default: bool) -> bool:
    text = query.get(name)
    return default if text is None else parse_bool(text, name)


# -- headers -------------------------------------------------------------------------------------


def parse_bearer(header: str | None) -> str | None:
    """The token of ``Authorization: Bearer TOKEN`` (RFC 6750 section 2.1), or None.

    Anything else (another scheme, no token, spaces or non-ASCII in it) is no token at all,
    answered 401 like a wrong one.
    """
    if header is None:
        return None
    scheme, _, token = header.strip(" \t").partition(" ")
    token = token.strip(" \t")
    if not scheme.isascii() or scheme.lower() != "bearer" or _TOKEN.fullmatch(token) is None:
        return None
    return token


# -- JSON bodies ---------------------------------------------------------------------------------


class _TooLarge:
    """A JSON integer with more digits than any 64-bit value: refused by the field's parser."""


_TOO_LARGE: Final = _TooLarge()


class _JsonRefusedError(ValueError):
    """Valid to Python's parser, refused by ours (a duplicate key, NaN)."""


def _integer(text: str) -> int | _TooLarge:
    return _TOO_LARGE if len(text.lstrip("-")) > _MAX_DIGITS else int(text)


def _constant(text: str) -> object:
    raise _JsonRefusedError(f"{text} is not JSON (RFC 8259 has no NaN or Infinity)")


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    body: dict[str, object] = {}
    for key, value in pairs:
        if key in body:
            name = shown(key)
            raise _JsonRefusedError(f"key {name} appears twice" if name else "a key appears twice")
        body[key] = value
    return body


def parse_json_object(raw: bytes) -> dict[str, object]:
    """One JSON object (RFC 8259) in UTF-8, at most :data:`MAX_JSON` bytes, no duplicate keys."""
    if len(raw) > MAX_JSON:
        raise ApiError(ErrorCode.PAYLOAD_TOO_LARGE, f"a JSON body may have at most {MAX_JSON} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(ErrorCode.BAD_JSON, "the body is not UTF-8 text") from None
    try:
        body = json.loads(text, object_pairs_hook=_object, parse_constant=_constant, parse_int=_integer)
    except _JsonRefusedError as exc:
        raise ApiError(ErrorCode.BAD_JSON, f"the body is refused: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ApiError(
            ErrorCode.BAD_JSON,
            f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
        ) from None
    except RecursionError:
        raise ApiError(ErrorCode.BAD_JSON, "the body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(ErrorCode.BAD_JSON, "the body must be a JSON object")
    return body


class JsonFields:
    """The fields of one JSON object, each read by a strict parser; unknown keys are refused."""

    def __init__(self, body: Mapping[str, object], allowed: Collection[str], what: str) -> None:
        for key in body:
            if key not in allowed:
                name = shown(key)
                takes = f"{what} takes {', '.join(allowed)}"
                raise ApiError(
                    ErrorCode.BAD_FIELD,
                    f"unknown field {name}; {takes}" if name else f"unknown field; {takes}",
                )
        self.body = body

    def uint(self, name: str, *, minimum: int = 0, maximum: int = MAX_INT) -> int:
        """A required JSON integer in ``minimum..maximum`` (not a float, string or boolean)."""
        if name not in self.body:
            raise ApiError(ErrorCode.BAD_FIELD, f"{name} is required: an integer {_bounds(minimum, maximum)}")
        value = self.body[name]
        if isinstance(value, _TooLarge):
            raise ApiError(
                ErrorCode.BAD_FIELD, f"{name} must be {_bounds(minimum, maximum)}: it is far larger"
            )
        if not isinstance(value, int) or isinstance(value, bool):
            raise ApiError(
                ErrorCode.BAD_FIELD,
                f"{name} must be a JSON integer {_bounds(minimum, maximum)}, not {json_type(value)}",
            )
        if not minimum <= value <= maximum:
            raise ApiError(ErrorCode.BAD_FIELD, f"{name} must be {_bounds(minimum, maximum)}, not {value}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.body.get(name, default)
        if not isinstance(value, bool):
            raise ApiError(ErrorCode.BAD_FIELD, f"{name} must be true or false, not {json_type(value)}")
        return value

    def string(self, name: str) -> str:
        """A required JSON string."""
        value = self.body.get(name)
        if not isinstance(value, str):
            raise ApiError(ErrorCode.BAD_FIELD, f"{name} is required: a string, not {json_type(value)}")
        return value

    def strings(self, name: str) -> list[str]:
        """A required JSON array of strings (one at least)."""
        value = self.body.get(name)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ApiError(
                ErrorCode.BAD_FIELD,
                f"{name} is required: an array of strings (one or more), not {json_type(value)}",
            )
        return [str(v) for v in value]


def json_type(value: object) -> str:
    """What a parsed JSON value is, for a refusal's sentence ("a string", "null", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | _TooLarge):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction or exponent"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# -- requests ------------------------------------------------------------------------------------


def _past_end(size: int, what: str) -> str:
    return f"{what} past the end of the disk ({size} bytes)"


def check_span(size: int, offset: int, length: int, what: str) -> None:
    """416 unless ``[offset, offset + length)`` lies inside a disk of ``size`` bytes."""
    if offset >= size and length:
        raise unsatisfiable(size, _past_end(size, f"{what} starts at {offset},"))
    if offset + length > size:
        raise unsatisfiable(size, _past_end(size, f"{what} of {length} bytes at {offset} runs"))


def parse_get_range(header: str | None, size: int) -> ByteRange | None:
    """``GET|HEAD /v1/disks/{name}``: the one byte range asked for, or None for the whole disk."""
    try:
        return parse_range(header, size)
    except RangeNotSatisfiableError as exc:
        raise unsatisfiable(size, str(exc)) from None


@dataclasses.dataclass(frozen=True, slots=True)
class SectorSpan:
    lba: int
    count: int


def _sector_span(size: int, lba: int, count: int) -> SectorSpan:
    capacity = size // SECTOR
    if lba >= capacity:
        raise unsatisfiable(size, f"sector {lba} is past the end of the disk ({capacity} sectors)")
    if lba + count > capacity:
        raise unsatisfiable(
            size,
            f"{count} sectors at {lba} run past the end of the disk ({capacity} sectors, "
            f"the last is {capacity - 1})",
        )
    return SectorSpan(lba, count)


def parse_sector_read(lba: str, query: Mapping[str, str], size: int) -> SectorSpan:
    """``GET .../sectors/{lba}?count=N``: N in 1..65536, all of them on the disk."""
    first = parse_uint(lba, "lba")
    count = query_uint(query, "count", 1, minimum=1, maximum=MAX_SECTORS)
    return _sector_span(size, first, count)


def parse_sector_write(
    lba: str, query: Mapping[str, str], content_length: int | None, size: int
) -> SectorSpan:
    """``PUT .../sectors/{lba}``: the body is whole sectors; ``?count=`` if given must agree."""
    first = parse_uint(lba, "lba")
    count = query.get("count")
    expected = None if count is None else parse_uint(count, "count", minimum=1, maximum=MAX_SECTORS)
    if content_length is None:
        raise ApiError(ErrorCode.LENGTH_REQUIRED, "send Content-Length: a multiple of 512 bytes")
    if content_length == 0 or content_length % SECTOR or content_length > MAX_SECTORS * SECTOR:
        raise ApiError(
            ErrorCode.BAD_LENGTH,
            f"the body must be 1..{MAX_SECTORS} whole sectors of {SECTOR} bytes, not {content_length} bytes",
        )
    sectors = content_length // SECTOR
    if expected is not None and expected != sectors:
        raise ApiError(ErrorCode.LENGTH_MISMATCH, f"count is {expected} but the body holds {sectors} sectors")
    return _sector_span(size, first, sectors)


@dataclasses.dataclass(frozen=True, slots=True)
class WriteTarget:
    offset: int
    length: int
    flush: bool


def parse_write_target(
    headers: Mapping[str, str], content_length: int | None, query: Mapping[str, str], size: int
) -> WriteTarget:
    """``PUT /v1/disks/{name}``: where the body goes (``Content-Range`` or ``?offset=``), and
    ``?flush=``. The body must fit on the disk."""
    flush = query_bool(query, "flush", True)
    content_range = headers.get("Content-Range")
    if content_range is not None:
        if "offset" in query:
            raise ApiError(ErrorCode.BAD_PARAMETER, "give Content-Range or ?offset=, not both")
        try:
            first, last, total = parse_content_range(content_range)
        except BadContentRangeError as exc:
            raise ApiError(ErrorCode.BAD_CONTENT_RANGE, str(exc)) from None
        if total is not None and total != size:
            raise ApiError(
                ErrorCode.BAD_CONTENT_RANGE,
                f"Content-Range says the disk has {total} bytes; it has {size} (or send /*)",
            )
        length = last - first + 1
        if content_length is not None and content_length != length:
            raise ApiError(
                ErrorCode.LENGTH_MISMATCH,
                f"Content-Length is {content_length} but Content-Range {first}-{last} is {length} bytes",
            )
        check_span(size, first, length, "the write")
        return WriteTarget(first, length, flush)
    offset = query_uint(query, "offset", 0)
    if content_length is None:
        raise ApiError(ErrorCode.LENGTH_REQUIRED, "send Content-Length, or Content-Range: bytes first-last/*")
    check_span(size, offset, content_length, "the write")
    return WriteTarget(offset, content_length, flush)


@dataclasses.dataclass(frozen=True, slots=True)
class Patch:
    op: PatchOp
    offset: int = 0
    size: int = 0
    flush: bool = False


def parse_patch(raw: bytes, size: int) -> Patch:
    """``PATCH /v1/disks/{name}``: ``{"op": "flush"}``, or ``{"op": "zero"|"discard", "offset":
    o, "size": n, "flush": false}`` with n >= 1 and the range on the disk."""
    body = parse_json_object(raw)
    op = body.get("op")
    if op == "flush":
        JsonFields(body, ("op",), "op flush")
        return Patch("flush")
    if op != "zero" and op != "discard":
        raise ApiError(ErrorCode.BAD_OP, "op must be one of zero, discard, flush, resize, throttle")
    kind: PatchOp = "zero" if op == "zero" else "discard"
    fields = JsonFields(body, ("op", "offset", "size", "flush"), f"op {kind}")
    offset = fields.uint("offset")
    length = fields.uint("size", minimum=1)
    flush = fields.boolean("flush", False)
    check_span(size, offset, length, f"the {kind}")
    return Patch(kind, offset, length, flush)


@dataclasses.dataclass(frozen=True, slots=True)
class ExtentsQuery:
    offset: int
    length: int
    context: ExtentsContext
    bitmap: str | None = None


def parse_extents(query: Mapping[str, str], size: int) -> ExtentsQuery:
    """``GET .../extents?context=zero|dirty&bitmap=&offset=&length=`` (the whole disk by default).

    ``bitmap`` names the bitmap of ``context=dirty`` (it may be left out when the disk has one).
    """
    context = parse_choice(query.get("context", "zero"), "context", ("zero", "dirty"))
    bitmap = query.get("bitmap")
    if bitmap is not None and context != "dirty":
        raise ApiError(ErrorCode.BAD_PARAMETER, "bitmap= goes with context=dirty")
    offset = query_uint(query, "offset", 0)
    if offset >= size:
        raise unsatisfiable(size, _past_end(size, f"offset {offset} is"))
    length = query_uint(query, "length", size - offset, minimum=1)
    check_span(size, offset, length, "the extents")
    return ExtentsQuery(offset, length, "dirty" if context == "dirty" else "zero", bitmap)
