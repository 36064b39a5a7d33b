"""HTTP byte ranges (RFC 9110 section 14): ``Range`` and ``Content-Range`` parsing, sans I/O.

Service layer, REST front end. Pure functions over header strings; :mod:`service.http.params`
and the handlers in :mod:`service.http.api` turn the exceptions into 416/400 responses.
"""

from __future__ import annotations

import dataclasses
import re

_RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)", re.ASCII)  # ASCII digits: not "٣", which \d takes
_CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)", re.ASCII)
_OWS = " \t"  # optional whitespace, RFC 9110 section 5.6.3
MAX_DIGITS = 19  # 2**63 has 19 digits; longer numbers are refused, not parsed
_RANGE_FORMS = "bytes=first-last, bytes=first- or bytes=-suffix"


class RangeNotSatisfiableError(ValueError):
    """The Range header cannot be served: answer 416 with ``Content-Range: bytes */size``."""


class BadContentRangeError(ValueError):
    """A request's Content-Range header is malformed: answer 400."""


@dataclasses.dataclass(frozen=True, slots=True)
class ByteRange:
    """The inclusive byte range ``first..last`` of a resource of ``size`` bytes."""

    first: int
    last: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.first}-{self.last}/{size}"


def _digits(text: str) -> str | None:
    """``text`` without leading zeros, or None when the number is too large to be a position."""
    digits = text.lstrip("0") or "0"
    return digits if len(digits) <= MAX_DIGITS else None


def _number(text: str, what: str) -> int:
    digits = _digits(text)
    if digits is None:
        raise RangeNotSatisfiableError(f"the range's {what} has more than {MAX_DIGITS} digits")
    return int(digits)


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range a ``Range`` header asks for, or None to send the whole resource.

    ``bytes=a-b``, ``bytes=a-`` and ``bytes=-n``; a range running past the end is clamped.
    Other units are ignored (RFC 9110 14.2). Several ranges, a malformed byte range, or one
    that starts at or beyond the end raise :class:`RangeNotSatisfiableError`, whose message
    says which.
    """
    if header is None:
        return None
    unit, sep, spec = header.strip(_OWS).partition("=")
    if not sep:
        raise RangeNotSatisfiableError(f"the Range header is malformed: want {_RANGE_FORMS}")
    unit = unit.strip(_OWS)
    if not unit.isascii() or unit.lower() != "bytes":
        return None
    # A recipient ignores empty list elements (RFC 9110 section 5.6.1): "bytes=0-99," is one range.
    specs = [part.strip(_OWS) for part in spec.split(",") if part.strip(_OWS)]
    if len(specs) > 1:
        raise RangeNotSatisfiableError("several ranges in one request are not supported: ask for one")
    match = _RANGE_SPEC.fullmatch(specs[0]) if specs else None
    if match is None or match.group(0) == "-":
        raise RangeNotSatisfiableError(f"the byte range is malformed: want {_RANGE_FORMS}")
    first_text, last_text = match.groups()
    if not first_text:  # suffix: the last n bytes
        suffix = _number(last_text, "suffix length")
        if suffix == 0:
            raise RangeNotSatisfiableError("the suffix range bytes=-0 asks for no bytes")
        if size == 0:
            raise RangeNotSatisfiableError("the disk is empty (0 bytes): no range can be served")
        return ByteRange(max(0, size - suffix), size - 1)
    first = _number(first_text, "first position")
    if last_text:
        last = _number(last_text, "last position")
        if last < first:
            raise RangeNotSatisfiableError(f"range {first}-{last} ends before it starts")
    if first >= size:
        raise RangeNotSatisfiableError(f"range starts at {first}, past the end of the disk ({size} bytes)")
    return ByteRange(first, min(last, size - 1) if last_text else size - 1)


def parse_content_range(header: str) -> tuple[int, int, int | None]:
    """``bytes a-b/size`` or ``bytes a-b/*`` → (first, last, size or None)."""
    match = _CONTENT_RANGE.fullmatch(header.strip(_OWS))
    if match is None:
        raise BadContentRangeError("Content-Range is malformed: want bytes first-last/* (or /SIZE)")
    first_text, last_text, size_text = (_digits(text) if text != "*" else text for text in match.groups())
    if first_text is None or last_text is None or size_text is None:
        raise BadContentRangeError(f"a Content-Range number has more than {MAX_DIGITS} digits")
    first, last = int(first_text), int(last_text)
    if last < first:
        raise BadContentRangeError(f"Content-Range {first}-{last} ends before it starts")
    return first, last, None if size_text == "*" else int(size_text)
