"""vblk's /metrics as the harness reads it: kick, interrupt and request totals, and the build info.

Between a running vblk (servers.py gives its metrics URL) and the runners, which divide the
counter deltas over fio's window by the requests in it. A vblk without /metrics reads as None.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.error
import urllib.request

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_KICKS = re.compile(r"^vblk_(?:virtqueue_)?kicks(?:_sent)?_total$")
_INTERRUPTS = re.compile(r"^vblk_(?:virtqueue_|msix_)?interrupts(?:_raised)?_total$")
_REQUESTS = re.compile(r"^vblk_(?:virtio_|driver_)?requests(?:_completed)?_total$")


@dataclasses.dataclass(frozen=True, slots=True)
class VirtioCounters:
    """Totals of vblk's virtio notifications, and its own count of requests if it exports one."""

    kicks: float
    interrupts: float
    requests: float | None


def parse_virtio_counters(text: str) -> VirtioCounters | None:
    """Sum vblk's kick, interrupt and request counters from a Prometheus text exposition.

    Samples labelled as suppressed (``{...suppressed...}``) are not counted: a suppressed kick or
    interrupt is one that did not happen. ``None`` when the exposition has no kick or interrupt counter.
    """
    kicks = interrupts = requests = 0.0
    seen_kicks = seen_interrupts = seen_requests = False
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        if "suppressed" in labels:
            continue
        if _KICKS.match(name):
            kicks, seen_kicks = kicks + value, True
        elif _INTERRUPTS.match(name):
            interrupts, seen_interrupts = interrupts + value, True
        elif _REQUESTS.match(name):
            requests, seen_requests = requests + value, True
    if not (seen_kicks and seen_interrupts):
        return None
    return VirtioCounters(kicks, interrupts, requests if seen_requests else None)


def parse_build_info(text: str) -> dict[str, str] | None:
    """The labels of ``vblk_build_info`` (``version``, ``compiled``), or None when it is not exported."""
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is not None and match.group(1) == "vblk_build_info":
            return dict(_LABEL.findall(match.group(2) or ""))
    return None


def per_request(
    before: VirtioCounters | None, after: VirtioCounters | None, ios: int | None
) -> tuple[float | None, float | None]:
    """Kicks and interrupts per virtio-blk request between two scrapes.

    The divisor is vblk's own request count when it exports one, else the client's I/O count.
    """
    if before is None or after is None:
        return None, None
    requests = (
        after.requests - before.requests
        if after.requests is not None and before.requests is not None
        else float(ios or 0)
    )
    if requests <= 0:
        return None, None
    return (after.kicks - before.kicks) / requests, (after.interrupts - before.interrupts) / requests


def fetch(url: str | None, timeout: float = 5.0) -> str | None:
    """The exposition at ``url``, or None (no URL, or nothing answered)."""
    if url is None:
        return None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return str(response.read().decode("utf-8", errors="replace"))
    except (OSError, urllib.error.URLError):
        return None


def vblk_counters(url: str | None) -> VirtioCounters | None:
    """Hook: kick and interrupt totals of a running vblk, or None when they cannot be read.

    Today this scrapes ``/metrics`` when ``vblk serve`` has ``--http-listen`` and the exposition carries
    ``vblk_kicks*_total`` / ``vblk_interrupts*_total`` counters (see :func:`parse_virtio_counters`).
    Another source (a control socket, a log line) goes here; the caller divides deltas by requests.
    """
    text = fetch(url)
    return None if text is None else parse_virtio_counters(text)
