"""HTTP byte ranges (RFC 9110 section 14): ``Range`` and ``Content-Range`` parsing, sans I/O.

Service layer, REST front end. Pure functions over header strings; the handlers in
:mod:`service.http.api` turn the exceptions into 416/400 responses.
"""

from __future__ import annotations

import dataclasses
import re

_RANGE_SPEC = re.compile(r"(\d*)-(\d*)")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
MAX_DIGITS = 19  # 2**63 has 19 digits; longer numbers are refused, not parsed


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


def _number(text: str) -> int:
    if len(text) > MAX_DIGITS:
        raise RangeNotSatisfiableError(f"range bound {text[:24]}... is too large")
    return int(text)


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range a ``Range`` header asks for, or None to send the whole resource.

    ``bytes=a-b``, ``bytes=a-`` and ``bytes=-n``; a range running past the end is clamped.
    Other units are ignored (RFC 9110 14.2). Several ranges, a malformed byte range, or one
    that starts at or beyond the end raise :class:`RangeNotSatisfiableError`.
    """
    if header is None:
        return None
    unit, sep, spec = header.strip().partition("=")
    if not sep:
        raise RangeNotSatisfiableError(f"malformed Range header {header[:64]!r}")
    if unit.strip().lower() != "bytes":
        return None
    specs = [part.strip() for part in spec.split(",")]
    if len(specs) != 1:
        raise RangeNotSatisfiableError("multiple ranges are not supported")
    match = _RANGE_SPEC.fullmatch(specs[0])
    if match is None or match.group(0) == "-":
        raise RangeNotSatisfiableError(f"malformed byte range {specs[0][:64]!r}")
    first_text, last_text = match.groups()
    if not first_text:  # suffix: the last n bytes
        suffix = _number(last_text)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiableError("empty suffix range")
        return ByteRange(max(0, size - suffix), size - 1)
    first = _number(first_text)
    last = _number(last_text) if last_text else size - 1
    if last < first:
        raise RangeNotSatisfiableError(f"range {first}-{last} ends before it starts")
    if first >= size:
        raise RangeNotSatisfiableError(f"range starts at {first}, beyond the end ({size} bytes)")
    return ByteRange(first, min(last, size - 1))


def parse_content_range(header: str) -> tuple[int, int, int | None]:
    """``bytes a-b/size`` or ``bytes a-b/*`` → (first, last, size or None)."""
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if match is None:
        raise BadContentRangeError(f"malformed Content-Range {header[:64]!r} (want 'bytes first-last/*')")
    first_text, last_text, size_text = match.groups()
    if max(len(first_text), len(last_text), len(size_text)) > MAX_DIGITS:
        raise BadContentRangeError("Content-Range bound is too large")
    first, last = int(first_text), int(last_text)
    if last < first:
        raise BadContentRangeError(f"Content-Range {first}-{last} ends before it starts")
    return first, last, None if size_text == "*" else int(size_text)
