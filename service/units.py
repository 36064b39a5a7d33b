"""Sizes as people write them: ``512``, ``64M``, ``1G``, ``2T`` (binary units), both ways.

Service layer, used by the configuration, the CLI and the messages that quote a size.
"""

from __future__ import annotations

import re

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
