"""Values as people write them: sizes (``512``, ``64M``, ``1G``, both ways), yes and no, disk names.

Service layer, one spelling for the configuration, the command line, the REST API's parameters
and the messages that quote a value.
"""

from __future__ import annotations

import re
from typing import Final

#: A disk's name: its NBD export name, its REST path segment, its virtio-blk serial's start.
DISK_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
#: Yes and no, any case.
TRUE_WORDS: Final = frozenset({"y", "yes", "true", "1", "on"})
FALSE_WORDS: Final = frozenset({"n", "no", "false", "0", "off"})

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """``512``, ``64M``, ``1G``, ``2T`` (binary units, optional ``iB``/``B``)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def format_size(size: int) -> str:
    """``1G``, ``64M``, ``1536K``, ``513``: the largest binary unit that divides the size exactly."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def boolean(text: str) -> bool | None:
    """``text`` as yes (True) or no (False), or None if it is neither."""
    value = text.strip().lower() if text.isascii() else ""
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    return None
