"""A fault-injecting backend wrapper: EIO/ENOSPC on reads, writes and flushes, slow I/O.

Device layer, bottom: wraps any :class:`device.backends.Backend` so tests (and operators
rehearsing failures) can make the storage misbehave while the device, the driver and the
front ends above run unchanged. A :class:`FaultPlan` is mutable: change it while requests
flow, clear it, and the next request succeeds.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Sequence

from device.backends import Backend, BackendError, Extent


@dataclasses.dataclass(slots=True)
class FaultPlan:
    """Which operations fail, with which errno, where, how often, and how slow I/O is."""

    read_errno: int | None = None
    write_errno: int | None = None  # writev, discard and write_zeroes
    flush_errno: int | None = None
    delay: float = 0.0  # seconds added to every data operation (slow I/O)
    region: tuple[int, int] | None = None  # only byte range [start, end) fails; None: all
    remaining: int | None = None  # faults left before the plan heals itself; None: until cleared
    injected: int = 0  # faults injected so far

    def clear(self) -> None:
        self.read_errno = self.write_errno = self.flush_errno = None
        self.delay = 0.0
        self.region = None
        self.remaining = None


class FaultyBackend:
    """Delegates to ``inner`` except where ``plan`` says to fail or to dawdle."""

    def __init__(self, inner: Backend, plan: FaultPlan | None = None) -> None:
        self.inner = inner
        self.plan = plan or FaultPlan()
        self._lock = threading.Lock()  # the device may call from worker threads

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    @property
    def slow_allocated_zeroes(self) -> bool:
        return self.inner.slow_allocated_zeroes

    def _fault(self, code: int | None, what: str, offset: int = 0, length: int = 0) -> None:
        plan = self.plan
        if plan.delay:
            time.sleep(plan.delay)
        if code is None:
            return
        if plan.region is not None and length:
            start, end = plan.region
            if offset + length <= start or offset >= end:
                return
        with self._lock:
            if plan.remaining is not None:
                if plan.remaining <= 0:
                    return
                plan.remaining -= 1
            plan.injected += 1
        raise BackendError(code, f"injected fault: {what} at {offset}: {os.strerror(code)}")

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._fault(self.plan.read_errno, "read", offset, sum(b.nbytes for b in buffers))
        self.inner.readv(offset, buffers)

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._fault(self.plan.write_errno, "write", offset, sum(b.nbytes for b in buffers))
        self.inner.writev(offset, buffers)

    def flush(self) -> None:
        self._fault(self.plan.flush_errno, "flush")
        self.inner.flush()

    def discard(self, offset: int, length: int) -> None:
        self._fault(self.plan.write_errno, "discard", offset, length)
        self.inner.discard(offset, length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._fault(self.plan.write_errno, "write_zeroes", offset, length)
        self.inner.write_zeroes(offset, length, may_unmap)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self.inner.extents(offset, length)

    def resize(self, new_size: int) -> None:
        self.inner.resize(new_size)

    def advise_willneed(self, offset: int, length: int) -> None:
        self.inner.advise_willneed(offset, length)

    def close(self) -> None:
        self.inner.close()
