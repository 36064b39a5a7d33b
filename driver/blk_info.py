"""What the virtio-blk driver tells its callers: how a request failed, the disk's geometry, counters.

Driver layer, beside :mod:`driver.blk` (which raises these errors and fills these records, and
re-exports them). The errors are ``OSError`` subclasses named after the status byte the device
answered (5.2.6: ``VIRTIO_BLK_S_IOERR``, ``VIRTIO_BLK_S_UNSUPP``) or the reason none came back;
:class:`BlkGeometry` is what configuration space said (5.2.4); the statistics are immutable
snapshots, so front ends (metrics, the ring view) read them without touching the live counters.
"""

from __future__ import annotations

import dataclasses
import errno
from typing import ClassVar

from mypy_extensions import mypyc_attr

from device.spec.virtio_blk import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP


@mypyc_attr(native_class=False)
class BlkError(OSError):
    """A virtio-blk request failed; ``status`` is the device's status byte (if it answered)."""

    status: ClassVar[int | None] = None
    default_errno: ClassVar[int] = errno.EIO

    def __init__(self, message: str) -> None:
        super().__init__(self.default_errno, message)


@mypyc_attr(native_class=False)
class BlkIOError(BlkError):
    """The device answered VIRTIO_BLK_S_IOERR (out of range, misaligned, media error)."""

    status = VIRTIO_BLK_S_IOERR


@mypyc_attr(native_class=False)
class BlkUnsupportedError(BlkError):
    """The device answered VIRTIO_BLK_S_UNSUPP (type or flag not supported or negotiated)."""

    status = VIRTIO_BLK_S_UNSUPP
    default_errno = errno.EOPNOTSUPP


@mypyc_attr(native_class=False)
class BlkResetError(BlkError):
    """The device was reset while the request was in flight; its outcome is unknown."""


@mypyc_attr(native_class=False)
class BlkResubmitError(BlkResetError):
    """The device was reset under the request by a recovery (its back end went away, or it
    needed a reset): the driver submits it again once the device is back, at most
    :data:`RESUBMIT_LIMIT` times; block requests may run twice, never half."""


#: How many resets one request goes through before its caller sees the reset.
RESUBMIT_LIMIT = 8


@mypyc_attr(native_class=False)
class BlkReadOnlyError(BlkError):
    """A write to a device that offered VIRTIO_BLK_F_RO; never sent."""

    default_errno = errno.EROFS


@dataclasses.dataclass(frozen=True, slots=True)
class BlkGeometry:
    """What the device's configuration space says about the disk."""

    capacity: int  # 512-byte sectors
    size_max: int
    seg_max: int
    blk_size: int
    physical_block_exp: int
    min_io_size: int
    opt_io_size: int
    writeback: bool
    num_queues: int
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: bool


@dataclasses.dataclass(frozen=True, slots=True)
class QueueStatistics:
    index: int
    size: int
    inflight: int
    free_descriptors: int
    kicks: int
    kicks_suppressed: int
    interrupts: int
    completed: int


@dataclasses.dataclass(frozen=True, slots=True)
class VirtioBlkStatistics:
    """An immutable snapshot of the driver's counters."""

    queues: tuple[QueueStatistics, ...]
    requests_inflight: int  # requests submitted and not yet completed (ring full: waiting too)
    io_time: float  # seconds with at least one request in flight
    io_time_weighted: float  # integral of requests in flight over time, in seconds
    requests: dict[tuple[str, str], int]
    bytes_read: int
    bytes_written: int
    resets: int
    config_interrupts: int
    resubmitted: int = 0  # requests submitted again after a recovery reset them

    @property
    def kicks(self) -> int:
        return sum(q.kicks for q in self.queues)

    @property
    def kicks_suppressed(self) -> int:
        return sum(q.kicks_suppressed for q in self.queues)

    @property
    def interrupts(self) -> int:
        return sum(q.interrupts for q in self.queues)

    @property
    def inflight(self) -> int:
        return sum(q.inflight for q in self.queues)
