"""Hand-built split rings for device tests: descriptors and avail entries written into guest RAM.

Test helper, playing a (possibly hostile) driver below any validation: nothing written here
is checked, so tests can hand the device exactly the ring they mean.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

import device.virtqueue as virtqueue_module
from device.blk import BlkConfig, VirtioBlkDevice
from device.block.memory import MemoryNode
from device.block.node import BlockNode
from device.memory import GuestMemory
from device.spec.virtio import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_RING_PACKED,
    VIRTQ_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_ELEM,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from device.spec.virtio_blk import VIRTIO_BLK_OUTHDR, RequestType
from device.virtqueue import DeviceVirtqueue

NEXT = VIRTQ_DESC_F_NEXT
WRITE = VIRTQ_DESC_F_WRITE
INDIRECT = VIRTQ_DESC_F_INDIRECT
SECTOR = 512


@dataclasses.dataclass(frozen=True, slots=True)
class Desc:
    """One ``virtq_desc`` as written into a table."""

    addr: int
    length: int
    flags: int = 0
    next: int = 0


def link(buffers: Sequence[tuple[int, int, int]], start: int = 0) -> list[Desc]:
    """``(addr, length, flags)`` buffers chained with NEXT through indices start, start+1, ..."""
    out = []
    for k, (addr, length, flags) in enumerate(buffers):
        last = k == len(buffers) - 1
        out.append(Desc(addr, length, flags | (0 if last else NEXT), 0 if last else start + k + 1))
    return out


def write_table(memory: GuestMemory, gpa: int, descs: Sequence[Desc]) -> None:
    """Write ``descs`` as a descriptor table at ``gpa`` (entry k at gpa + 16k)."""
    for k, d in enumerate(descs):
        memory.write(gpa + 16 * k, VIRTQ_DESC.pack(d.addr, d.length, d.flags, d.next))


def in_request(memory: GuestMemory, alloc: Callable[[int], int], sector: int, sectors: int = 1) -> list[Desc]:
    """A virtio-blk IN in fresh buffers from ``alloc``: header, data (0xEE), status (0xFF)."""
    header, data, status = alloc(16), alloc(SECTOR * sectors), alloc(1)
    memory.write(header, VIRTIO_BLK_OUTHDR.pack(RequestType.IN, 0, sector))
    memory.fill(data, SECTOR * sectors, 0xEE)
    memory.write(status, b"\xff")
    return link([(header, 16, 0), (data, SECTOR * sectors, WRITE), (status, 1, WRITE)])


class DescriptorReads:
    """While active, counts the descriptors DeviceVirtqueue reads; past ``budget`` the read
    fails, so that a walk that would never end fails the test instead of hanging it."""

    def __init__(self, budget: int | None = None) -> None:
        self.count = 0
        self.budget = budget
        self._real = virtqueue_module._desc_unpack
        self._patch = mock.patch.object(virtqueue_module, "_desc_unpack", self._unpack)

    def _unpack(self, buffer: memoryview, offset: int) -> tuple[Any, ...]:
        self.count += 1
        if self.budget is not None and self.count > self.budget:
            raise AssertionError(f"pop read {self.count} descriptors, the rules allow {self.budget}")
        return self._real(buffer, offset)

    def __enter__(self) -> DescriptorReads:
        self._patch.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._patch.stop()


class RingWriter:
    """The driver's half of a split ring at given addresses, written by hand."""

    def __init__(
        self, memory: GuestMemory, size: int, desc_addr: int, avail_addr: int, used_addr: int
    ) -> None:
        self.memory = memory
        self.size = size
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr

    @classmethod
    def of(cls, queue: DeviceVirtqueue) -> RingWriter:
        """The rings a device queue was configured with."""
        return cls(queue.memory, queue.size, queue.desc_addr, queue.driver_addr, queue.device_addr)

    @classmethod
    def layout(cls, memory: GuestMemory, size: int, gpa: int) -> RingWriter:
        """Fresh, zeroed rings of ``size`` entries laid out from ``gpa`` (16-aligned)."""
        avail = gpa + desc_table_size(size)
        used = (avail + avail_ring_size(size) + 3) & ~3
        memory.fill(gpa, used + used_ring_size(size) - gpa)
        return cls(memory, size, gpa, avail, used)

    @property
    def end(self) -> int:
        """First byte after the used ring."""
        return self.used_addr + used_ring_size(self.size)

    def configure(self, queue: DeviceVirtqueue) -> None:
        """Program ``queue`` (as a driver would through the transport) to use these rings."""
        queue.size = self.size
        queue.desc_addr = self.desc_addr
        queue.driver_addr = self.avail_addr
        queue.device_addr = self.used_addr
        queue.enabled = True

    def write_descs(self, descs: Sequence[Desc], start: int = 0) -> None:
        assert start + len(descs) <= self.size, "more descriptors than the table holds"
        write_table(self.memory, self.desc_addr + 16 * start, descs)

    def write_chain(self, descs: Sequence[Desc], start: int) -> None:
        """Write a chain built by :func:`link` from index 0 at index ``start`` instead."""
        self.write_descs(
            [dataclasses.replace(d, next=d.next + start if d.flags & NEXT else 0) for d in descs], start
        )

    @property
    def avail_idx(self) -> int:
        return self.memory.read_u16(self.avail_addr + 2)

    @avail_idx.setter
    def avail_idx(self, value: int) -> None:
        self.memory.write_u16(self.avail_addr + 2, value & 0xFFFF)

    def set_slot(self, slot: int, head: int) -> None:
        """Write ``head`` into avail ring entry ``slot`` (mod size), without publishing it."""
        self.memory.write_u16(self.avail_addr + 4 + 2 * (slot % self.size), head)

    def publish(self, *heads: int) -> None:
        """Make ``heads`` available after the current avail idx, then move the idx past them."""
        idx = self.avail_idx
        for k, head in enumerate(heads):
            self.set_slot(idx + k, head)
        self.avail_idx = idx + len(heads)

    @property
    def used_idx(self) -> int:
        return self.memory.read_u16(self.used_addr + 2)

    def used(self, k: int) -> tuple[int, int]:
        """Used ring entry ``k`` (mod size): ``(id, len)``."""
        off = self.used_addr + 4 + VIRTQ_USED_ELEM.size * (k % self.size)
        ident, length = VIRTQ_USED_ELEM.unpack(self.memory.read(off, VIRTQ_USED_ELEM.size))
        return int(ident), int(length)


class Heap:
    """A bump allocator for test buffers in ``[start, end)`` of guest RAM."""

    def __init__(self, start: int, end: int) -> None:
        self.next = start
        self.end = end

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = (self.next + align - 1) & ~(align - 1)
        if gpa + size > self.end:
            raise MemoryError("test heap exhausted")
        self.next = gpa + size
        return gpa


async def settle(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Run the event loop until ``condition`` holds (AssertionError after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    spins = 0
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        spins += 1
        await asyncio.sleep(0 if spins < 100 else 0.001)


class BlkBench:
    """A virtio-blk device and one hand-written queue, with no PCI and no guest driver.

    The test plays the driver through the device's own interface: it negotiates features,
    lays out the rings, writes chains and kicks.
    """

    def __init__(
        self,
        *,
        queue_size: int = 16,
        disk_size: int = 1 << 20,
        memory_size: int = 1 << 20,
        backend: BlockNode | None = None,
        config: BlkConfig | None = None,
    ) -> None:
        self.memory = GuestMemory(memory_size)
        self.backend = backend if backend is not None else MemoryNode(disk_size)
        config = config or BlkConfig(queue_size=max(4, queue_size))
        self.device = VirtioBlkDevice(self.memory, self.backend, config)
        self.queue_size = queue_size
        self.ring = RingWriter.layout(self.memory, queue_size, self.memory.base)
        self.heap = Heap((self.ring.end + 4095) & ~4095, self.memory.end)

    def negotiate(self, features: int | None = None) -> bool:
        """ACKNOWLEDGE, DRIVER, write ``features`` (default: all offered; never packed rings: this
        bench writes split ones), FEATURES_OK; re-read it."""
        device = self.device
        features = (device.device_features if features is None else features) & ~(1 << VIRTIO_F_RING_PACKED)
        device.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
        device.set_driver_features(0, features & 0xFFFFFFFF)
        device.set_driver_features(1, features >> 32)
        device.set_status(device.status | VIRTIO_CONFIG_S_FEATURES_OK)
        return bool(device.status & VIRTIO_CONFIG_S_FEATURES_OK)

    def driver_ok(self) -> None:
        self.device.set_status(self.device.status | VIRTIO_CONFIG_S_DRIVER_OK)

    def start(self, features: int | None = None) -> None:
        """Initialise the device with fresh rings on queue 0 (after a reset, too)."""
        self.ring = RingWriter.layout(self.memory, self.queue_size, self.memory.base)
        assert self.negotiate(features)
        self.ring.configure(self.device.queues[0])
        self.driver_ok()
        assert self.device.driver_ok

    def buffer(self, size: int, fill: int = 0) -> int:
        gpa = self.heap.alloc(max(size, 1))
        self.memory.fill(gpa, max(size, 1), fill)
        return gpa

    def header(self, rtype: int, sector: int = 0) -> int:
        gpa = self.buffer(16)
        self.memory.write(gpa, VIRTIO_BLK_OUTHDR.pack(rtype, 0, sector))
        return gpa

    def in_chain(self, sector: int, sectors: int) -> list[Desc]:
        """An IN request: header, one data buffer, status byte."""
        return in_request(self.memory, self.heap.alloc, sector, sectors)

    def out_chain(self, sector: int, data: bytes) -> list[Desc]:
        """An OUT request: header, one data buffer, status byte."""
        gpa = self.buffer(len(data))
        self.memory.write(gpa, data)
        return link(
            [
                (self.header(RequestType.OUT, sector), 16, 0),
                (gpa, len(data), 0),
                (self.buffer(1, 0xFF), 1, WRITE),
            ]
        )

    async def run(self, descs: Sequence[Desc], head: int = 0) -> tuple[int, int]:
        """Write the chain ``descs`` (linked from 0) at ``head``, make it available and kick.

        Returns the status byte (the last writable byte of the chain) and the used length.
        """
        ring = self.ring
        ring.write_chain(descs, head)
        old = ring.used_idx
        ring.publish(head)
        self.device.kick(0)
        await settle(lambda: ring.used_idx != old or self.device.broken_reason is not None)
        if self.device.broken_reason is not None:
            raise DeviceBrokenError(self.device.broken_reason)
        ident, length = ring.used(old)
        assert ident == head
        last = [d for d in descs if d.flags & WRITE and d.length][-1]
        return self.memory.read(last.addr + last.length - 1, 1)[0], length


class DeviceBrokenError(Exception):
    """The device set DEVICE_NEEDS_RESET instead of completing the request."""
