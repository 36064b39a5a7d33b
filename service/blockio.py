"""The disk port: the one thing the front ends (NBD, REST, metrics, the ring view) touch.

Service layer, just above the driver: NBD and REST speak bytes at any offset, the device speaks
512-byte sectors. :class:`ByteDisk` turns one into the other through
:class:`driver.blk.VirtioBlk` only (never around it to the storage), doing the read-modify-write
of partial edge sectors under per-sector locks that all front ends share, so two unaligned writes
to one sector from NBD and REST cannot undo each other. It also offers the zero-copy fast path
(a buffer the ring points at, a request started with a completion callback), the storage's
capabilities and control plane (allocation map, cache hints, the block stack), the disk's facts,
and one classification of failures that every front end maps to its own error codes.
"""

from __future__ import annotations

import asyncio
import enum
import errno
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol, TypeVar

from mypy_extensions import mypyc_attr

from device.block.dirty import (
    DEFAULT_GRANULARITY,
    MAX_GRANULARITY,
    MIN_GRANULARITY,
    Bitmap,
    BitmapError,
    DirtyLayer,
    check_name,
    dirty_layer,
)
from device.block.node import BlockNode, Capabilities, Extent, describe_stack, stack
from device.platform import work_queue
from device.spec import virtio_blk as vb
from device.spec.virtio import VIRTIO_F_RING_PACKED
from device.spec.virtio_blk import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from driver.blk import BlkReadOnlyError, BlkResetError, BlkUnsupportedError, VirtioBlk
from driver.dma import DmaBuffer

#: A buffer in the RAM the device sees: what the fast path reads into and writes from (``view``
#: is a zero-copy window; ``free()`` gives it back).
IoBuffer = DmaBuffer
#: Told once when a fast-path request ends: None, or the exception it failed with.
IoDone = Callable[[BaseException | None], None]

__all__ = [
    "DEFAULT_GRANULARITY",
    "MAX_GRANULARITY",
    "MIN_GRANULARITY",
    "Bitmap",
    "BitmapError",
    "ByteDisk",
    "DirtyLayer",
    "ErrorKind",
    "IoBuffer",
    "IoDone",
    "check_name",
    "error_kind",
    "work_queue",
]
# The bitmaps (DirtyLayer, Bitmap, BitmapError, ...) are the port's too: a front end reaches a
# disk's bitmaps as ``ByteDisk.dirty`` and names their types from here, never from device/.
# ``work_queue(loop)``: the loop's deferred work, the queue the device answers requests on; a
# front end that defers its replies there sends them after the completions of the same pass.

FEATURE_NAMES: Final = {
    getattr(vb, name): name.removeprefix("VIRTIO_BLK_F_").lower()
    for name in dir(vb)
    if name.startswith("VIRTIO_BLK_F_")
}


class ErrorKind(enum.Enum):
    """What went wrong with a request, in the port's words (each front end has its own codes)."""

    READ_ONLY = "read_only"  # the disk refuses writes
    UNSUPPORTED = "unsupported"  # the device does not do this (no DISCARD, FAST_ZERO refused)
    NO_SPACE = "no_space"  # the storage is full
    UNAVAILABLE = "unavailable"  # the device is being reset (try again)
    IO = "io"  # the storage failed


def error_kind(exc: BaseException) -> ErrorKind:
    """Classify a failure of a :class:`ByteDisk` call."""
    # issubclass(type(...)), not isinstance: compiled, isinstance against these (non-native)
    # classes only matches them and their compiled subclasses (tests/test_mypyc_traps.py).
    kind = type(exc)
    if issubclass(kind, BlkReadOnlyError):
        return ErrorKind.READ_ONLY
    if issubclass(kind, BlkUnsupportedError):
        return ErrorKind.UNSUPPORTED
    if issubclass(kind, BlkResetError):
        return ErrorKind.UNAVAILABLE
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ErrorKind.NO_SPACE
    return ErrorKind.IO


@mypyc_attr(native_class=False)  # an OSError
class UnsupportedError(BlkUnsupportedError):
    """A request the disk refuses by its capabilities (``error_kind``: UNSUPPORTED)."""


SECTOR: Final = 512
QUIESCE_TIMEOUT: Final = 30.0  # seconds a drained section waits for the requests in flight
T = TypeVar("T")


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

    def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        """``(offset, length, depth)`` runs of the backing chain (0 nowhere, 1 the image, 2 and
        more its backing files), or None when the storage has no chain to count."""
        ...

    def describe(self) -> list[dict[str, Any]]:
        """The block stack, top first (empty when the storage is not ours to see)."""
        ...

    def internal_snapshots(self) -> tuple[list[dict[str, Any]], str | None]:
        """The storage's internal snapshots (a qcow2 image's), and the one served, if any."""
        ...

    def counters(self) -> Mapping[str, int]:
        """The stack's own counters (RBD requests in flight, faults injected...)."""
        ...

    @property
    def dirty(self) -> DirtyLayer | None:
        """The stack's dirty-tracking layer (its bitmaps), or None where bitmaps are not kept."""
        ...

    async def quiesce(self) -> None:
        """Start no request and wait for the ones running (a drained section); then :meth:`resume`."""
        ...

    def resume(self) -> None: ...


class Quiescing(Protocol):
    """The device a stack serves, as far as draining it goes (:class:`device.blk.VirtioBlkDevice`)."""

    async def quiesce(self) -> None: ...

    def resume(self) -> None: ...


class StackControl:
    """The control plane of a block stack in this process: its top node answers; the device it
    serves drains for changes that must fall between requests."""

    def __init__(self, node: BlockNode, device: Quiescing | None = None) -> None:
        self.node = node
        self.device = device
        self._dirty = dirty_layer(node)

    @property
    def dirty(self) -> DirtyLayer | None:
        return self._dirty

    async def quiesce(self) -> None:
        if self.device is not None:
            await self.device.quiesce()

    def resume(self) -> None:
        if self.device is not None:
            self.device.resume()

    @property
    def capabilities(self) -> Capabilities:
        return self.node.capabilities

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self.node.extents(offset, length)

    def advise_willneed(self, offset: int, length: int) -> None:
        self.node.advise_willneed(offset, length)

    def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        for node in stack(self.node):  # a format node with a chain (qcow2), under any layers
            count = getattr(node, "allocation_depth", None)
            if count is not None:
                runs: list[tuple[int, int, int]] = count(offset, length)
                return runs
        return None

    def describe(self) -> list[dict[str, Any]]:
        return describe_stack(self.node)

    def internal_snapshots(self) -> tuple[list[dict[str, Any]], str | None]:
        """The internal snapshots of the stack's qcow2 image (and the one it serves, if any)."""
        for node in stack(self.node):
            found = getattr(node, "snapshots", None)
            if isinstance(found, list):
                return [s.describe() for s in found], getattr(node, "snapshot", None)
        return [], None

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
        #: The disk's bitmaps (its dirty-tracking layer), or None where none can be kept.
        self.dirty: DirtyLayer | None = control.dirty
        #: The bitmap ``extents?context=dirty`` reads when none is named (a view's checkpoint).
        self.default_bitmap: str | None = None
        #: Held by changes of the disk's storage or views (a snapshot, a commit, a view's start
        #: or stop): one at a time, each checking its preconditions under it.
        self.control_lock = asyncio.Lock()
        #: Its storage has a backing chain, and :meth:`allocation_depth` counts it.
        self.has_chain = control.allocation_depth(0, 0) is not None

    @property
    def size(self) -> int:
        return self.driver.size

    @property
    def read_only(self) -> bool:
        return self.driver.read_only

    @property
    def ready(self) -> bool:
        """The device is up (not being reset)."""
        return self.driver.ready

    def info(self) -> dict[str, Any]:
        """The disk's facts, as the driver found the device, and its block stack."""
        driver = self.driver
        return {
            "size": driver.size,
            "sector_size": SECTOR,
            "block_size": driver.block_size,
            "read_only": driver.read_only,
            "features": sorted(name for bit, name in FEATURE_NAMES.items() if driver.has_feature(bit)),
            "pci": driver.name,
            "queues": len(driver.queues),
            "queue_size": driver.queues[0].size if driver.queues else 0,
            "ring": "packed" if driver.has_feature(VIRTIO_F_RING_PACKED) else "split",
            "ready": driver.ready,
            "stack": self.control.describe(),
        }

    # -- the fast path: no task, answered from the completion ----------------------------------

    def try_buffer(self, offset: int, length: int) -> IoBuffer | None:
        """A buffer for ``[offset, offset+length)`` laid out as the sectors holding it (the data
        at ``offset % 512``: :meth:`view_of`), or None if none is free without waiting."""
        start, end = aligned(offset, length)
        return self.driver.dma.try_allocate(end - start)

    @staticmethod
    def view_of(buffer: IoBuffer, offset: int, length: int) -> memoryview:
        """The bytes of ``[offset, offset+length)`` in a buffer from :meth:`try_buffer`."""
        head = offset % SECTOR
        return buffer.view[head : head + length]

    def start_read(self, offset: int, length: int, buffer: IoBuffer, done: IoDone) -> bool:
        """Start reading the sectors holding the range into ``buffer``; ``done`` is told from the
        completion. False if it would have to wait (the ring is full, a reset): nothing started."""
        start, end = aligned(offset, length)
        return self.driver.start_io(VIRTIO_BLK_T_IN, start // SECTOR, buffer, end - start, done)

    def start_write(self, offset: int, length: int, buffer: IoBuffer, done: IoDone) -> bool:
        """Start writing a sector-aligned range from ``buffer``; False if it is not aligned (the
        edges need :meth:`write_buffer`'s read-modify-write) or would have to wait."""
        if offset % SECTOR or length % SECTOR:
            return False
        return self.driver.start_io(VIRTIO_BLK_T_OUT, offset // SECTOR, buffer, length, done)

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

    async def zero_if_fast(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Zeroes that stay allocated, only if they cost no more than metadata (NBD WRITE_ZEROES
        with NO_HOLE and FAST_ZERO); else :class:`UnsupportedError` at once, touching nothing."""
        if not self.control.capabilities.fast_zero:
            raise UnsupportedError("zeroes that stay allocated are a full write here (FAST_ZERO)")
        await self.zero(offset, length, unmap=False, fua=fua)

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The allocation map of ``[offset, offset+length)`` (control plane)."""
        return self.control.extents(offset, length)

    def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """Where in the backing chain ``[offset, offset+length)`` is allocated (control plane)."""
        runs = self.control.allocation_depth(offset, length)
        if runs is None:
            raise UnsupportedError(f"disk {self.name} has no backing chain to count")
        return runs

    async def quiesced(self, action: Callable[[], T], timeout: float = QUIESCE_TIMEOUT) -> T:
        """Run ``action`` with the disk drained: every request started before has ended, none
        starts until it returns (they wait in the virtqueues). TimeoutError if the requests in
        flight do not end within ``timeout`` seconds (nothing is run then)."""
        control = self.control
        await asyncio.wait_for(control.quiesce(), timeout)
        try:
            return action()
        finally:
            control.resume()

    def cache(self, offset: int, length: int) -> None:
        """Hint that ``[offset, offset+length)`` will be read soon (control plane)."""
        self.control.advise_willneed(offset, length)

    @property
    def capabilities(self) -> Capabilities:
        return self.control.capabilities
