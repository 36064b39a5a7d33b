"""Disks whose device is a vhost-user back end's (``backend=vhost-user:SOCKET``).

Service layer, used by :mod:`service.app`. The driver reaches the device through
:class:`driver.vhost_user.VhostUserTransport` (the service's guest RAM is already a memfd);
NBD and REST then export e.g. qemu-storage-daemon's virtio-blk device exactly like a local
one. What the local block stack would answer on the control plane, a remote device cannot:
the allocation map reports everything as data, cache hints are dropped, and there are no
device-side counters (:class:`RemoteControl` says so in its capabilities).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from device.block.dirty import DirtyLayer
from device.block.node import Capabilities, Extent
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

    def __init__(self) -> None:
        self.stats = DeviceStatistics()
        self.queues: list[DeviceVirtqueue] = []  # the device's side of the rings is not ours
        self.strategy = "remote"


class RemoteControl:
    """The control plane of a device in another process: it cannot be asked, so every byte is
    data (no allocation map), cache hints go nowhere, and there is no stack to describe."""

    def __init__(self, driver: VirtioBlk) -> None:
        self._driver = driver

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(read_only=self._driver.read_only, cache=False, extents=False, blocking=False)

    def extents(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self._driver.size)
        return [Extent(offset, end - offset, hole=False, zero=False)] if end > offset else []

    def advise_willneed(self, offset: int, length: int) -> None:
        pass

    def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        return None

    def describe(self) -> list[dict[str, Any]]:
        return [{"node": "vhost-user", "socket": self._driver.name}]

    def counters(self) -> Mapping[str, int]:
        return {}

    def internal_snapshots(self) -> tuple[list[dict[str, Any]], str | None]:
        return [], None

    @property
    def dirty(self) -> DirtyLayer | None:
        return None  # the back end's stack is not ours: no bitmaps here

    async def quiesce(self) -> None:
        pass

    def resume(self) -> None:
        pass


async def start_vhost_user_driver(
    socket_path: Path,
    memory: SharedRam,
    dma: DmaAllocator,
    *,
    num_queues: int,
    queue_size: int,
    ring: str = "split",
) -> VirtioBlk:
    """Connect to the back end and bring its device up under VirtioBlk (on packed rings with
    ``ring="packed"`` when the back end offers them)."""
    transport = VhostUserTransport(socket_path, memory, queue_size=min(queue_size, DEFAULT_QUEUE_SIZE))
    driver = VirtioBlk(transport, dma, num_queues=num_queues, ring=ring)
    try:
        await driver.start()
    except BaseException:
        transport.close()
        raise
    return driver
