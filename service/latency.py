"""Latency histograms cheap enough to feed on every request, and the hooks that feed them.

Service layer, on the request path (compiled, see setup.py): the driver calls a
:class:`VirtioObserver` and the NBD server a :class:`FrontendObserver` once per request;
:mod:`service.metrics` reads the histograms at scrape time.
"""

from __future__ import annotations

import math
from typing import Final

# From 50 µs (an in-memory read) to 10 s (a stuck backend).
# A variable-length tuple type on purpose: compiled, a fixed-length tuple of floats would be a C
# struct, and indexing it with a variable boxes every member each time.
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    500e-3,
    1.0,
    2.5,
    5.0,
    10.0,
)


class LatencyHistogram:
    """A histogram over :data:`LATENCY_BUCKETS` that costs a few compares per observation.

    prometheus-client's Histogram takes a lock and walks the buckets on every observation;
    vblk observes twice per request on one event loop thread, so a plain list of counts,
    read by the collector at scrape time, does the same job for a fraction of the cost.
    """

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        # bisect_left by hand: most requests land in the first few buckets.
        bounds = LATENCY_BUCKETS
        i = 0
        n = len(bounds)
        while i < n and bounds[i] < seconds:
            i += 1
        self.counts[i] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations up to it)`` per bucket, the last bound ``inf``."""
        buckets: list[tuple[float, int]] = []
        running = 0
        for upper, count in zip((*LATENCY_BUCKETS, math.inf), self.counts, strict=True):
            running += count
            buckets.append((upper, running))
        return buckets


class VirtioObserver:
    """A disk's :attr:`driver.blk.VirtioBlk.observer`: one histogram per (disk, operation)."""

    def __init__(self, disk: str, histograms: dict[tuple[str, str], LatencyHistogram]) -> None:
        self._disk = disk
        self._histograms = histograms
        self._children: dict[str, LatencyHistogram] = {}  # by operation: no tuple per request

    def __call__(self, op: str, status: str, seconds: float, nbytes: int) -> None:
        child = self._children.get(op)
        if child is None:
            child = self._children[op] = self._histograms.setdefault((self._disk, op), LatencyHistogram())
        child.observe(seconds)


class FrontendObserver:
    """A front end's per-request hook: one histogram per (disk, operation, front end)."""

    def __init__(self, frontend: str, histograms: dict[tuple[str, str, str], LatencyHistogram]) -> None:
        self._frontend = frontend
        self._histograms = histograms
        self._children: dict[str, dict[str, LatencyHistogram]] = {}  # disk, op: no tuple per request

    def observe(self, disk: str, op: str, seconds: float) -> None:
        """Count one request of ``op`` on ``disk`` that took ``seconds`` (a native call, unboxed)."""
        by_op = self._children.get(disk)
        if by_op is None:
            by_op = self._children[disk] = {}
        child = by_op.get(op)
        if child is None:
            child = by_op[op] = self._histograms.setdefault((disk, op, self._frontend), LatencyHistogram())
        child.observe(seconds)
