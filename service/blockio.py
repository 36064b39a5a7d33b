"""Byte-addressed I/O on a virtio-blk disk, shared by every front end.

Service layer, just above the driver: NBD and REST speak bytes at any offset, the
device speaks 512-byte sectors. This module turns one into the other through
:class:`driver.blk.VirtioBlk` only (never around it to the backend), doing the
read-modify-write of partial edge sectors under per-sector locks that all front
ends share, so two unaligned writes to one sector from NBD and REST cannot undo
each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Final, Protocol

from device.block.node import BlockNode, Capabilities, Extent, describe_stack, stack
from driver.blk import VirtioBlk
from driver.dma import DmaBuffer

SECTOR: Final = 512


class EdgeLocks:
    """Serialises read-modify-write cycles on the edge sectors of unaligned writes."""

    def __init__(self) -> None:
        self._locks: dict[int, asyncio.Lock] = {}

    def hold(self, start: int, end: int) -> EdgeHold:
        """Hold the sectors containing byte ``start`` and byte ``end - 1`` (``async with``)."""
        return EdgeHold(self._locks, sorted({start // SECTOR, (end - 1) // SECTOR}))


class EdgeHold:
    """The held edge sectors of one write: an async context manager from :meth:`EdgeLocks.hold`.

    A class rather than an ``asynccontextmanager`` generator so that it compiles (see setup.py).
    """

    def __init__(self, locks: dict[int, asyncio.Lock], keys: list[int]) -> None:
        self._all = locks
        self._keys = keys
        self._locks = [locks.setdefault(key, asyncio.Lock()) for key in keys]
        self._acquired: list[asyncio.Lock] = []

    async def __aenter__(self) -> None:
        try:
            for lock in self._locks:
                await lock.acquire()
                self._acquired.append(lock)
        except BaseException:
            self._release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        for key, lock in zip(self._keys, self._locks, strict=True):
            if lock in self._acquired:
                lock.release()
            if not lock.locked() and not getattr(lock, "_waiters", None):
                self._all.pop(key, None)
        self._acquired.clear()


def aligned(offset: int, length: int) -> tuple[int, int]:
    """The sector-aligned byte range ``[start, end)`` covering ``[offset, offset+length)``."""
    start = offset - offset % SECTOR
    end = -(-(offset + length) // SECTOR) * SECTOR
    return start, end


class DiskControl(Protocol):
    """What a disk's storage answers besides data (the control plane): the allocation map,
    cache hints, what the storage can do, and what it is. Data never goes this way."""

    @property
    def capabilities(self) -> Capabilities: ...

    def extents(self, offset: int, length: int) -> list[Extent]: ...

    def advise_willneed(self, offset: int, length: int) -> None: ...

    def describe(self) -> list[dict[str, Any]]:
        """The block stack, top first (empty when the storage is not ours to see)."""
        ...

    def counters(self) -> Mapping[str, int]:
        """The stack's own counters (RBD requests in flight, faults injected...)."""
        ...


class StackControl:
    """The control plane of a block stack in this process: its top node answers."""

    def __init__(self, node: BlockNode) -> None:
        self.node = node

    @property
    def capabilities(self) -> Capabilities:
        return self.node.capabilities

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self.node.extents(offset, length)

    def advise_willneed(self, offset: int, length: int) -> None:
        self.node.advise_willneed(offset, length)

    def describe(self) -> list[dict[str, Any]]:
        return describe_stack(self.node)

    def counters(self) -> Mapping[str, int]:
        out: dict[str, int] = {}
        for node in stack(self.node):
            out.update(node.counters())
        return out


class ByteDisk:
    """One disk as the front ends use it: bytes in, bytes out, through the virtqueues."""

    def __init__(self, name: str, driver: VirtioBlk, control: DiskControl) -> None:
        self.name = name
        self.driver = driver
        self.control = control  # the control plane: the allocation map, cache hints
        self.edge_locks = EdgeLocks()

    @property
    def size(self) -> int:
        return self.driver.size

    @property
    def read_only(self) -> bool:
        return self.driver.read_only

    async def read_buffer(self, offset: int, length: int) -> tuple[DmaBuffer, memoryview]:
        """Read into a fresh DMA buffer; returns it (the caller frees it) and the exact bytes.

        The view is a slice of the buffer: release it before freeing the buffer.
        """
        start, end = aligned(offset, length)
        buffer = await self.driver.dma.allocate_wait(end - start)
        try:
            await self.driver.read_into(start // SECTOR, buffer, end - start)
        except BaseException:
            buffer.free()
            raise
        head = offset - start
        return buffer, buffer.view[head : head + length]

    async def read(self, offset: int, length: int) -> bytes:
        buffer, view = await self.read_buffer(offset, length)
        try:
            return bytes(view)
        finally:
            view.release()
            buffer.free()

    async def write_buffer(self, offset: int, length: int, buffer: DmaBuffer, *, fua: bool = False) -> None:
        """Write ``length`` bytes held in ``buffer`` at ``offset % 512`` (its sector-aligned image).

        The edges of an unaligned range are filled in from the disk first (read-modify-write).
        """
        start, end = aligned(offset, length)
        head = offset - start
        tail = end - (offset + length)
        driver = self.driver
        if not head and not tail:
            await driver.write_from(start // SECTOR, buffer, end - start, fua=fua)
            return
        async with self.edge_locks.hold(start, end):
            if head:
                edge = await driver.read(start // SECTOR, SECTOR)
                buffer.view[:head] = edge[:head]
            if tail:
                edge = await driver.read((end - SECTOR) // SECTOR, SECTOR)
                buffer.view[end - start - tail : end - start] = edge[SECTOR - tail :]
            await driver.write_from(start // SECTOR, buffer, end - start, fua=fua)

    async def allocate_for(self, offset: int, length: int) -> DmaBuffer:
        """A DMA buffer laid out for :meth:`write_buffer` (data goes at ``offset % 512``)."""
        start, end = aligned(offset, length)
        return await self.driver.dma.allocate_wait(end - start)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        length = memoryview(data).nbytes
        buffer = await self.allocate_for(offset, length)
        try:
            head = offset % SECTOR
            buffer.view[head : head + length] = data
            await self.write_buffer(offset, length, buffer, fua=fua)
        finally:
            buffer.free()

    async def zero(self, offset: int, length: int, *, unmap: bool = True, fua: bool = False) -> None:
        """Make ``[offset, offset+length)`` read as zeroes; whole sectors by WRITE_ZEROES."""
        driver = self.driver
        end = offset + length
        first = -(-offset // SECTOR) * SECTOR
        last = end // SECTOR * SECTOR
        if last > first:
            await driver.write_zeroes(first // SECTOR, (last - first) // SECTOR, unmap=unmap)
        for lo, hi in ((offset, min(first, end)), (max(last, offset), end)):
            if hi > lo and not (lo >= first and hi <= last):
                sector = lo // SECTOR
                async with self.edge_locks.hold(sector * SECTOR, sector * SECTOR + SECTOR):
                    data = bytearray(await driver.read(sector, SECTOR))
                    data[lo - sector * SECTOR : hi - sector * SECTOR] = bytes(hi - lo)
                    await driver.write(sector, data)
        if fua:
            await driver.flush()

    async def discard(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Advisory: only whole sectors inside the range are discarded."""
        first = -(-offset // SECTOR)
        last = (offset + length) // SECTOR
        if last > first:
            await self.driver.discard(first, last - first)
        if fua:
            await self.driver.flush()

    async def flush(self) -> None:
        await self.driver.flush()

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The allocation map of ``[offset, offset+length)`` (control plane)."""
        return self.control.extents(offset, length)

    def cache(self, offset: int, length: int) -> None:
        """Hint that ``[offset, offset+length)`` will be read soon (control plane)."""
        self.control.advise_willneed(offset, length)

    @property
    def capabilities(self) -> Capabilities:
        return self.control.capabilities
