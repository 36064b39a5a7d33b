"""Storage backends: where a virtio-blk device's sectors live (raw image file, memory).

The bottom of the data path: :mod:`device.blk` executes each virtio-blk request against a
:class:`Backend`. Backends are synchronous; the device decides whether a call runs inline on
the event loop or in a worker thread. A backend whose storage is remote (Ceph RBD) may also be an
:class:`AsyncBackend`: the device then starts each request and completes it when its future does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
from collections.abc import Sequence
from typing import Protocol, runtime_checkable


class BackendError(OSError):
    """A backend operation failed; ``errno`` says why (EIO, ENOSPC, EROFS, ...)."""


def check_access(what: object, size: int, read_only: bool, offset: int, length: int, write: bool) -> None:
    """Refuse a write to a read-only backend (EROFS) or a range outside ``[0, size)`` (EINVAL).

    ``what`` names the backend in the message (its path, its image, ...).
    """
    if write and read_only:
        raise BackendError(errno.EROFS, f"{what} is read-only")
    if offset < 0 or length < 0 or offset + length > size:
        raise BackendError(errno.EINVAL, f"range [{offset}, +{length}) outside {what}")


@dataclasses.dataclass(frozen=True, slots=True)
class Extent:
    """One run of the allocation map: ``length`` bytes at ``offset``.

    ``hole`` means unallocated (reads as zeroes); ``zero`` means known to read as zeroes.
    A hole is always zero.
    """

    offset: int
    length: int
    hole: bool
    zero: bool


@runtime_checkable
class Backend(Protocol):
    """The storage under one virtio-blk device. Offsets and lengths are in bytes.

    Callers (the device) have already checked ranges against ``size``; a backend still must
    not read or write outside ``[0, size)`` and raises :class:`BackendError` if asked to.
    Methods may be called from a worker thread, at most one mutating call at a time per
    range, and must not touch the event loop.
    """

    @property
    def size(self) -> int:
        """Current size in bytes (a multiple of 512)."""
        ...

    @property
    def read_only(self) -> bool:
        """True if the backend refuses every write."""
        ...

    @property
    def slow_allocated_zeroes(self) -> bool:
        """True if ``write_zeroes`` without ``may_unmap`` costs as much as writing the zeroes
        (RBD's write-same), so a client's "only if fast" zeroing (NBD FAST_ZERO) is refused."""
        ...

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers`` in order from ``offset`` (short reads past EOF read as zeroes)."""
        ...

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Write ``buffers`` in order at ``offset``, completely."""
        ...

    def flush(self) -> None:
        """Make every completed write durable (fdatasync)."""
        ...

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range; afterwards it may read as anything (we read zeroes)."""
        ...

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Make a range read as zeroes; deallocate it if ``may_unmap`` and possible."""
        ...

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The allocation map of ``[offset, offset+length)``, contiguous and in order."""
        ...

    def resize(self, new_size: int) -> None:
        """Grow or shrink to ``new_size`` bytes (a multiple of 512)."""
        ...

    def advise_willneed(self, offset: int, length: int) -> None:
        """Hint that a range will be read soon (posix_fadvise WILLNEED)."""
        ...

    def close(self) -> None:
        """Release the backend (idempotent)."""
        ...


@runtime_checkable
class AsyncBackend(Backend, Protocol):
    """Optional: a backend that starts I/O at once and finishes it later, on the running event loop.

    The device drives such a backend with these methods instead of the blocking ones (``io_mode``
    does not apply), so it has as many requests in flight as its virtqueues hold, without a thread
    each. Each method only starts the operation and returns a future of the running loop that is
    done when the operation is, with a :class:`BackendError` on failure; the caller leaves the
    buffers alone until then. Futures rather than coroutines: the device's hot path adds a done
    callback to one, with no task per request. Called on the event loop thread only.
    """

    def aio_readv(self, offset: int, buffers: Sequence[memoryview]) -> asyncio.Future[None]:
        """Start filling ``buffers`` from ``offset``."""
        ...

    def aio_writev(self, offset: int, buffers: Sequence[memoryview]) -> asyncio.Future[None]:
        """Start writing ``buffers`` at ``offset``."""
        ...

    def aio_flush(self) -> asyncio.Future[None]:
        """Start making every completed write durable; fails if any earlier write failed."""
        ...

    def aio_discard(self, offset: int, length: int) -> asyncio.Future[None]:
        """Start deallocating a range."""
        ...

    def aio_write_zeroes(self, offset: int, length: int, may_unmap: bool) -> asyncio.Future[None]:
        """Start making a range read as zeroes."""
        ...

    def aio_drain(self) -> None:
        """Block until no started operation touches its buffers any more (device reset, close)."""
        ...
