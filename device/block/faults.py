"""The fault layer: EIO/ENOSPC on reads, writes and flushes, and slow I/O, on demand.

Block layer, the first of the layers: it wraps any node (``--disk ...,fault=...`` on the command
line, or :class:`FaultPlan` from tests) so tests, and operators rehearsing failures, can make the
storage misbehave while the device, the driver and the front ends above run unchanged. A
:class:`FaultPlan` is mutable: change it while requests flow, clear it, and the next request
succeeds. It passes through everything else, asynchronous completion included.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from device.block.node import BlockError, BlockNode, Completion, Layer

_ERRNOS = {"eio": errno.EIO, "enospc": errno.ENOSPC, "erofs": errno.EROFS, "etimedout": errno.ETIMEDOUT}


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

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """A plan as the command line writes it: ``read=eio+write=enospc+delay=0.01+count=3``.

        Keys: ``read``, ``write``, ``flush`` (an errno name: eio, enospc, erofs, etimedout),
        ``delay`` (seconds), ``count`` (faults before it heals). ``+`` separates them (``,``
        separates disk options).
        """
        plan = cls()
        for item in text.split("+"):
            key, sep, value = item.strip().partition("=")
            if not sep:
                raise ValueError(f"fault {item!r}: want KEY=VALUE (read, write, flush, delay, count)")
            if key in ("read", "write", "flush"):
                code = _ERRNOS.get(value.lower())
                if code is None:
                    raise ValueError(f"fault {key}={value}: errno is one of {', '.join(_ERRNOS)}")
                setattr(plan, f"{key}_errno", code)
            elif key == "delay":
                seconds = float(value)
                if not 0 <= seconds <= 60:
                    raise ValueError(f"fault delay={value}: seconds in 0..60")
                plan.delay = seconds
            elif key == "count":
                if not value.isdigit():
                    raise ValueError(f"fault count={value}: a whole number")
                plan.remaining = int(value)
            else:
                raise ValueError(f"unknown fault {key!r} (read, write, flush, delay, count)")
        return plan

    def describe(self) -> dict[str, Any]:
        names = {code: name for name, code in _ERRNOS.items()}
        out: dict[str, Any] = {}
        for key, code in (
            ("read", self.read_errno),
            ("write", self.write_errno),
            ("flush", self.flush_errno),
        ):
            if code is not None:
                out[key] = names.get(code, os.strerror(code))
        if self.delay:
            out["delay"] = self.delay
        if self.remaining is not None:
            out["remaining"] = self.remaining
        out["injected"] = self.injected
        return out


class FaultLayer(Layer):
    """Passes everything to ``inner`` except where ``plan`` says to fail or to dawdle.

    Delays sleep the calling thread: give a disk with a slow plan ``io-mode thread``, as a slow
    device would need.
    """

    kind = "faults"

    def __init__(self, inner: BlockNode, plan: FaultPlan | None = None) -> None:
        super().__init__(inner)
        self.plan = plan or FaultPlan()
        self._lock = threading.Lock()  # the device may call from worker threads

    def describe(self) -> dict[str, Any]:
        return {"node": self.kind, **self.plan.describe()}

    def counters(self) -> dict[str, int]:
        return {"faults_injected": self.plan.injected}

    def _fault(self, code: int | None, what: str, offset: int = 0, length: int = 0) -> BlockError | None:
        plan = self.plan
        if plan.delay:
            time.sleep(plan.delay)
        if code is None:
            return None
        if plan.region is not None and length:
            start, end = plan.region
            if offset + length <= start or offset >= end:
                return None
        with self._lock:
            if plan.remaining is not None:
                if plan.remaining <= 0:
                    return None
                plan.remaining -= 1
            plan.injected += 1
        return BlockError(code, f"injected fault: {what} at {offset}: {os.strerror(code)}")

    def readv(self, offset: int, buffers: Sequence[memoryview], done: Completion) -> None:
        fault = self._fault(self.plan.read_errno, "read", offset, sum(b.nbytes for b in buffers))
        if fault is not None:
            done.complete(fault)
        else:
            self.inner.readv(offset, buffers, done)

    def writev(self, offset: int, buffers: Sequence[memoryview], done: Completion) -> None:
        fault = self._fault(self.plan.write_errno, "write", offset, sum(b.nbytes for b in buffers))
        if fault is not None:
            done.complete(fault)
        else:
            self.inner.writev(offset, buffers, done)

    def flush(self, done: Completion) -> None:
        fault = self._fault(self.plan.flush_errno, "flush")
        if fault is not None:
            done.complete(fault)
        else:
            self.inner.flush(done)

    def discard(self, offset: int, length: int, done: Completion) -> None:
        fault = self._fault(self.plan.write_errno, "discard", offset, length)
        if fault is not None:
            done.complete(fault)
        else:
            self.inner.discard(offset, length, done)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool, done: Completion) -> None:
        fault = self._fault(self.plan.write_errno, "write_zeroes", offset, length)
        if fault is not None:
            done.complete(fault)
        else:
            self.inner.write_zeroes(offset, length, may_unmap, done)
