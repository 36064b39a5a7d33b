"""``PATCH /v1/disks/{name}`` with ``{"op": "resize", ...}``: the request's strict parser.

Service layer, REST front end, sans I/O, beside :mod:`service.http.params` (whose JSON reader it
uses). The body is ``{"op": "resize", "size": N, "shrink": false}``; the size is a JSON integer
or a string as the command line writes sizes (``"64M"``, ``"1G"``), a positive multiple of the
disk's block size, and smaller than the disk only with ``"shrink": true`` (what lies past the new
end is lost). Every refusal is an :class:`~service.http.errors.ApiError` with a sentence.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Final

from service.http.errors import ApiError, ErrorCode
from service.http.params import MAX_INT, JsonFields

# "64M", "1G", "4096", "2GiB": ASCII digits (no sign, space or other scripts' digits) and a unit.
_SIZE: Final = re.compile(r"([0-9]{1,19})([KMGT]?)(?:I?B)?", re.ASCII | re.IGNORECASE)
_SHIFT: Final = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


@dataclasses.dataclass(frozen=True, slots=True)
class Resize:
    size: int  # bytes
    shrink: bool


def parse_resize(body: Mapping[str, object], size: int, block_size: int) -> Resize:
    """The resize a PATCH body (already parsed, ``op`` is ``resize``) asks of a disk of ``size``
    bytes and ``block_size``-byte blocks."""
    fields = JsonFields(body, ("op", "size", "shrink"), "op resize")
    value = body.get("size")
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match is None:
            raise ApiError(
                ErrorCode.BAD_FIELD, 'size must be an integer of bytes or a size such as "64M" or "1G"'
            )
        new_size = int(match.group(1)) << _SHIFT[match.group(2).upper()]
    else:
        new_size = fields.uint("size", minimum=1)
    shrink = fields.boolean("shrink", False)
    if not block_size <= new_size <= MAX_INT or new_size % block_size:
        raise ApiError(
            ErrorCode.BAD_FIELD,
            f"size must be a positive multiple of the disk's block size ({block_size} bytes)"
            + (f", not {new_size}" if new_size <= MAX_INT else ""),
        )
    if new_size < size and not shrink:
        raise ApiError(
            ErrorCode.RESIZE_REFUSED,
            f"{new_size} bytes is smaller than the disk ({size} bytes): a shrink loses what lies past "
            'the new end, so it needs "shrink": true',
        )
    return Resize(new_size, shrink)
