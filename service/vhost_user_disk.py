"""Disks whose device is a vhost-user back end's (``backend=vhost-user:SOCKET``).

Service layer, used by :mod:`service.app`. The driver reaches the device through
:class:`driver.vhost_user.VhostUserTransport` (the service's guest RAM is already a memfd);
NBD and REST then export e.g. qemu-storage-daemon's virtio-blk device exactly like a local
one. What the local device model would answer on the control plane, a remote device cannot:
the allocation map reports everything as data, cache hints are dropped, and there are no
device-side counters.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from pathlib import Path

from device.backends import Backend, BackendError, Extent
from device.virtio import DeviceStatistics
from device.virtqueue import DeviceVirtqueue
from driver.blk import VirtioBlk
from driver.dma import DmaAllocator
from driver.vhost_user import DEFAULT_QUEUE_SIZE, SharedRam, VhostUserTransport

PREFIX = "vhost-user:"


def vhost_user_socket(backend: str) -> Path | None:
    """The socket of a ``vhost-user:SOCKET`` backend setting, None for local backends."""
    return Path(backend[len(PREFIX) :]) if backend.startswith(PREFIX) else None


class RemoteDevice:
    """Stands in for the device model where metrics and the ring view look for one."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend  # the control plane (see RemoteControlPlane)
        self.stats = DeviceStatistics()
        self.queues: list[DeviceVirtqueue] = []  # the device's side of the rings is not ours


class RemoteControlPlane:
    """The :class:`device.backends.Backend` control plane of a device in another process.

    Only :meth:`extents` and :meth:`advise_willneed` are ever used (data goes through the
    rings); the rest refuses.
    """

    def __init__(self, driver: VirtioBlk) -> None:
        self._driver = driver

    @property
    def size(self) -> int:
        return self._driver.size

    @property
    def read_only(self) -> bool:
        return self._driver.read_only

    @property
    def slow_allocated_zeroes(self) -> bool:
        return False  # unknown from here: the device in the other process answers for itself

    def extents(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self.size)
        return [Extent(offset, end - offset, hole=False, zero=False)] if end > offset else []

    def advise_willneed(self, offset: int, length: int) -> None:
        pass

    def _refuse(self) -> BackendError:
        return BackendError(errno.EOPNOTSUPP, "the device is remote: go through the driver")

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        raise self._refuse()

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        raise self._refuse()

    def flush(self) -> None:
        raise self._refuse()

    def discard(self, offset: int, length: int) -> None:
        raise self._refuse()

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        raise self._refuse()

    def resize(self, new_size: int) -> None:
        raise self._refuse()

    def close(self) -> None:
        pass


async def start_vhost_user_driver(
    socket_path: Path, memory: SharedRam, dma: DmaAllocator, *, num_queues: int, queue_size: int
) -> VirtioBlk:
    """Connect to the back end and bring its device up under VirtioBlk."""
    transport = VhostUserTransport(socket_path, memory, queue_size=min(queue_size, DEFAULT_QUEUE_SIZE))
    driver = VirtioBlk(transport, dma, num_queues=num_queues)
    try:
        await driver.start()
    except BaseException:
        transport.close()
        raise
    return driver
