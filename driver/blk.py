"""VirtioBlk: the guest's virtio-blk driver, with awaitable requests over split virtqueues.

Driver layer, top: the service's front ends call it. Each request is a chain of a
16-byte header, data buffers and a status byte; the coroutine awaits a future that the
queue's interrupt handler resolves, where the article's thread slept in ``suspend_thread()``.
:meth:`VirtioBlk.start_io` is the same without the coroutine: a callback told from the handler.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Final

import structlog

from device.platform import RunningLoop, memory_barrier
from device.spec import virtio_blk as vb
from device.spec.virtio import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)
from device.spec.virtio_blk import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    RequestType,
    Status,
)
from driver.blk_info import (
    RESUBMIT_LIMIT,
    BlkError,
    BlkGeometry,
    BlkIOError,
    BlkReadOnlyError,
    BlkResetError,
    BlkResubmitError,
    BlkUnsupportedError,
    QueueStatistics,
    VirtioBlkStatistics,
)
from driver.dma import DmaAllocator, DmaBuffer
from driver.packed_virtqueue import PackedDriverVirtqueue
from driver.transport import TransportError, VirtioTransport
from driver.virtqueue import Completion, DriverVirtqueue, QueueBrokenError

log = structlog.get_logger("vblk.driver.blk")

__all__ = [
    "BlkError",
    "BlkGeometry",
    "BlkIOError",
    "BlkReadOnlyError",
    "BlkResetError",
    "BlkUnsupportedError",
    "QueueStatistics",
    "VirtioBlk",
    "VirtioBlkStatistics",
]


SECTOR: Final = vb.VIRTIO_BLK_SECTOR_SIZE
_perf_counter: Final = time.perf_counter  # bound once: compiled, ``time.perf_counter`` is a lookup
SLOT_SIZE: Final = 32  # per-head request header (16 bytes) + status byte, padded
DEFAULT_MAX_TRANSFER: Final = 4 << 20
REINIT_RETRY_FIRST: Final = 0.05  # seconds before re-initialising a device that could not be reached
REINIT_RETRY_MAX: Final = 2.0

SUPPORTED_FEATURES: Final = (
    1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_F_INDIRECT_DESC
    | 1 << VIRTIO_F_EVENT_IDX
    | 1 << vb.VIRTIO_BLK_F_SIZE_MAX
    | 1 << vb.VIRTIO_BLK_F_SEG_MAX
    | 1 << vb.VIRTIO_BLK_F_GEOMETRY
    | 1 << vb.VIRTIO_BLK_F_RO
    | 1 << vb.VIRTIO_BLK_F_BLK_SIZE
    | 1 << vb.VIRTIO_BLK_F_FLUSH
    | 1 << vb.VIRTIO_BLK_F_TOPOLOGY
    | 1 << vb.VIRTIO_BLK_F_CONFIG_WCE
    | 1 << vb.VIRTIO_BLK_F_MQ
    | 1 << vb.VIRTIO_BLK_F_DISCARD
    | 1 << vb.VIRTIO_BLK_F_WRITE_ZEROES
)

_STATUS_NAMES: Final = {int(s): s.name.lower() for s in Status}

OPERATIONS: Final = {
    RequestType.IN: "read",
    RequestType.OUT: "write",
    RequestType.FLUSH: "flush",
    RequestType.GET_ID: "get_id",
    RequestType.DISCARD: "discard",
    RequestType.WRITE_ZEROES: "write_zeroes",
}
_OP_NAMES: Final = {int(k): v for k, v in OPERATIONS.items()}
_OUTHDR_PACK: Final = vb.VIRTIO_BLK_OUTHDR.pack_into


# (operation, status name, seconds, bytes) after every request.
RequestObserver = Callable[[str, str, float, int], None]


class _Request:
    """The token of one chain in flight: resolves the waiting coroutine from the interrupt.

    The data buffers stay pinned until the device hands the chain back, so a caller that
    is cancelled meanwhile cannot return them to the allocator under the device's feet.
    """

    __slots__ = ("future", "pinned", "status_view")

    def __init__(
        self, future: asyncio.Future[int], status_view: memoryview, pinned: tuple[DmaBuffer, ...]
    ) -> None:
        self.future = future
        self.status_view = status_view
        self.pinned = pinned
        for buffer in pinned:
            buffer.pin()

    def _release(self) -> None:
        for buffer in self.pinned:
            buffer.unpin()

    def complete(self, written: int) -> None:
        del written  # virtio-blk's answer is the status byte
        status = self.status_view[0]
        self._release()
        if not self.future.done():
            self.future.set_result(status)

    def fail(self, exc: BaseException) -> None:
        self._release()
        if not self.future.done():
            self.future.set_exception(exc)


# Told once when a request started with :meth:`VirtioBlk.start_io` ends: None, or why it failed.
IoCallback = Callable[[BaseException | None], None]


class _CallbackRequest:
    """The token of a chain started by :meth:`VirtioBlk.start_io`: no future, no task.

    The interrupt handler calls the owner's callback directly, so a front end that can answer
    from the completion (an NBD READ or WRITE reply) costs no coroutine switch at all.
    """

    __slots__ = (
        "attempts",
        "blk",
        "callback",
        "nbytes",
        "pinned",
        "rtype",
        "sector",
        "started",
        "status_view",
    )

    def __init__(
        self,
        blk: VirtioBlk,
        rtype: int,
        sector: int,
        status_view: memoryview,
        pinned: DmaBuffer,
        nbytes: int,
        started: float,
        callback: IoCallback,
    ) -> None:
        self.blk = blk
        self.rtype = rtype
        self.sector = sector
        self.status_view = status_view
        self.pinned = pinned
        self.nbytes = nbytes
        self.started = started
        self.callback = callback
        self.attempts = 0
        pinned.pin()

    def complete(self, written: int) -> None:
        del written  # virtio-blk's answer is the status byte
        self.pinned.unpin()
        blk = self.blk
        status = self.status_view[0]
        error = None if status == VIRTIO_BLK_S_OK else blk._status_error(self.rtype, status, self.sector)
        blk._retire(self.rtype, status, self.started, self.nbytes)
        self.callback(error)

    def fail(self, exc: BaseException) -> None:
        self.pinned.unpin()
        blk = self.blk
        if type(exc) is BlkResubmitError and self.attempts < RESUBMIT_LIMIT and not blk._closed:
            self.attempts += 1
            blk._resubmit_later(self)
            return
        blk._retire(self.rtype, None, self.started, self.nbytes)
        self.callback(exc)


class VirtioBlk:
    """One virtio-blk device, driven through its transport only (a PCI function on the
    platform, or a vhost-user back end); ``dma`` allocates in the RAM the device sees."""

    def __init__(
        self,
        transport: VirtioTransport,
        dma: DmaAllocator,
        *,
        features_mask: int = (1 << 64) - 1,
        queue_size: int | None = None,
        num_queues: int | None = None,
        writeback: bool | None = None,
        max_transfer: int = DEFAULT_MAX_TRANSFER,
        observer: RequestObserver | None = None,
        ring: str = "split",
    ) -> None:
        if ring not in ("split", "packed"):
            raise ValueError(f"ring must be split or packed, not {ring!r}")
        self.transport = transport
        #: The virtqueue layout asked for: "packed" is used when the device offers it.
        self.ring_wanted = ring
        self.dma = dma
        self.name = transport.name
        self.pci_address = (-1, -1, -1)  # (bus, device, function), once a guest binds it
        self._features_mask = features_mask
        self._want_queue_size = queue_size
        self._want_queues = num_queues
        self._want_writeback = writeback
        self._max_transfer_limit = max_transfer
        self.observer = observer
        self.features = 0
        self.geometry: BlkGeometry | None = None
        self.queues: list[DriverVirtqueue] = []
        self._slots: list[DmaBuffer] = []
        self._status_views: list[list[memoryview]] = []
        self._seg_limit = 1
        self._size_max = SECTOR
        self._chunk = SECTOR
        self._next_queue = itertools.count()
        self._ready = asyncio.Event()  # for waiters; _is_ready mirrors it for the hot path
        self._is_ready = False  # (both set by _set_ready; close() also wakes the waiters)
        self._recovering: asyncio.Task[None] | None = None
        self._closed = False
        self._requests: dict[str, dict[str, int]] = {}  # operation -> outcome -> count
        self._bytes_read = 0
        self._bytes_written = 0
        self._resets = 0
        self._config_interrupts = 0
        self._resubmitted = 0
        self._resubmitting: set[asyncio.Task[None]] = set()
        # Disk time accounting with /proc/diskstats semantics (io_ticks, time_in_queue).
        self._active = 0
        self._io_stamp = 0.0
        self._io_time = 0.0
        self._io_weighted = 0.0
        self._retired = {"kicks": 0, "kicks_suppressed": 0, "interrupts": 0, "completed": 0}
        self.capacity_listeners: list[Callable[[int], None]] = []
        self._running = RunningLoop()

    # -- properties ------------------------------------------------------------------------

    def _geometry(self) -> BlkGeometry:
        if self.geometry is None:
            raise RuntimeError("VirtioBlk is not started")
        return self.geometry

    @property
    def capacity(self) -> int:
        """Capacity in 512-byte sectors."""
        return self._geometry().capacity

    @property
    def size(self) -> int:
        """Capacity in bytes."""
        return self._geometry().capacity * SECTOR

    @property
    def block_size(self) -> int:
        return self._geometry().blk_size

    @property
    def read_only(self) -> bool:
        return self.has_feature(vb.VIRTIO_BLK_F_RO)

    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    @property
    def ready(self) -> bool:
        return self._is_ready

    # -- initialisation (VIRTIO 1.2 3.1.1) -------------------------------------------------------

    async def start(self) -> None:
        await self.transport.open()
        await self._initialize()

    async def _initialize(self) -> None:
        t = self.transport
        await t.reset()
        await t.reconnect()
        t.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
        t.add_status(VIRTIO_CONFIG_S_DRIVER)
        offered = t.device_features()
        if not offered >> VIRTIO_F_VERSION_1 & 1:
            t.add_status(VIRTIO_CONFIG_S_FAILED)
            raise TransportError(f"{self.name}: device does not offer VIRTIO_F_VERSION_1")
        supported = SUPPORTED_FEATURES | (1 << VIRTIO_F_RING_PACKED if self.ring_wanted == "packed" else 0)
        features = offered & supported & self._features_mask | 1 << VIRTIO_F_VERSION_1
        t.set_driver_features(features)
        if not t.features_ok():
            t.add_status(VIRTIO_CONFIG_S_FAILED)
            raise TransportError(f"{self.name}: device refused features {features:#x}")
        self.features = features
        self.geometry = self._read_geometry()
        if self.has_feature(vb.VIRTIO_BLK_F_CONFIG_WCE) and self._want_writeback is not None:
            t.write_device_config(vb.VIRTIO_BLK_CFG_WRITEBACK, 1, int(self._want_writeback))
            self.geometry = self._read_geometry()
        t.enable_config_interrupt(self._config_interrupt)
        barrier = memory_barrier if t.shared_with_other_cpus else None
        num_queues = self.geometry.num_queues
        if self._want_queues is not None:
            num_queues = max(1, min(num_queues, self._want_queues))
        event_idx = self.has_feature(VIRTIO_F_EVENT_IDX)
        packed = self.has_feature(VIRTIO_F_RING_PACKED)
        if self.ring_wanted == "packed" and not packed:
            log.info("virtio_blk_ring_split", device=self.name, reason="the device offers no packed rings")
        indirect_max = self.geometry.seg_max + 2 if self.has_feature(VIRTIO_F_INDIRECT_DESC) else 0
        self.queues = []
        self._slots = []
        self._status_views = []
        for index in range(num_queues):
            max_size = t.queue_max_size(index)
            if max_size == 0:
                break
            size = max_size if self._want_queue_size is None else min(max_size, self._want_queue_size)
            size = 1 << (size.bit_length() - 1)
            slots = self.dma.allocate(size * SLOT_SIZE)
            if slots is None:
                raise MemoryError("no DMA memory for request slots")
            ring_type = PackedDriverVirtqueue if packed else DriverVirtqueue
            queue = ring_type(
                index=index,
                size=size,
                allocator=self.dma,
                notify=lambda: None,
                event_idx=event_idx,
                indirect_max=min(indirect_max, size),
                on_broken=self._queue_broken,
                barrier=barrier,
            )
            self.queues.append(queue)  # before the transport can fail: _teardown frees it
            self._slots.append(slots)
            self._status_views.append(
                [slots.view[h * SLOT_SIZE + 16 : h * SLOT_SIZE + 17] for h in range(size)]
            )
            queue._notify = t.setup_queue(
                index, size, queue.desc_addr, queue.avail_addr, queue.used_addr, queue.interrupt
            )
        if not self.queues:
            raise TransportError(f"{self.name}: device has no request queue")
        # A chain is header + data segments + status and may not outgrow the ring.
        self._seg_limit = max(1, min(self.geometry.seg_max, min(q.size for q in self.queues) - 2))
        self._size_max = self.geometry.size_max
        limit = min(self._max_transfer_limit, self._size_max * self._seg_limit)
        self._chunk = max(SECTOR, limit - limit % SECTOR)
        t.add_status(VIRTIO_CONFIG_S_DRIVER_OK)
        self._set_ready(True)
        log.info(
            "virtio_blk_ready",
            device=self.name,
            capacity=self.geometry.capacity,
            blk_size=self.geometry.blk_size,
            queues=len(self.queues),
            queue_size=self.queues[0].size,
            features=f"{features:#x}",
            read_only=self.read_only,
        )

    def _read_geometry(self) -> BlkGeometry:
        raw = self.transport.read_device_config(vb.VIRTIO_BLK_CONFIG.size)
        (
            capacity,
            size_max,
            seg_max,
            _cylinders,
            _heads,
            _sectors,
            blk_size,
            physical_block_exp,
            _alignment_offset,
            min_io_size,
            opt_io_size,
            writeback,
            num_queues,
            max_discard_sectors,
            max_discard_seg,
            discard_sector_alignment,
            max_write_zeroes_sectors,
            max_write_zeroes_seg,
            write_zeroes_may_unmap,
        ) = vb.VIRTIO_BLK_CONFIG.unpack(raw)
        has = self.has_feature
        return BlkGeometry(
            capacity=capacity,
            size_max=size_max if has(vb.VIRTIO_BLK_F_SIZE_MAX) and size_max else 1 << 20,
            seg_max=max(1, seg_max) if has(vb.VIRTIO_BLK_F_SEG_MAX) else 1,
            blk_size=blk_size if has(vb.VIRTIO_BLK_F_BLK_SIZE) and blk_size else SECTOR,
            physical_block_exp=physical_block_exp if has(vb.VIRTIO_BLK_F_TOPOLOGY) else 0,
            min_io_size=min_io_size if has(vb.VIRTIO_BLK_F_TOPOLOGY) else 1,
            opt_io_size=opt_io_size if has(vb.VIRTIO_BLK_F_TOPOLOGY) else 0,
            writeback=bool(writeback) if has(vb.VIRTIO_BLK_F_CONFIG_WCE) else has(vb.VIRTIO_BLK_F_FLUSH),
            num_queues=max(1, num_queues) if has(vb.VIRTIO_BLK_F_MQ) else 1,
            max_discard_sectors=max_discard_sectors,
            max_discard_seg=max(1, max_discard_seg),
            discard_sector_alignment=max(1, discard_sector_alignment),
            max_write_zeroes_sectors=max_write_zeroes_sectors,
            max_write_zeroes_seg=max(1, max_write_zeroes_seg),
            write_zeroes_may_unmap=bool(write_zeroes_may_unmap),
        )

    # -- interrupts and recovery ----------------------------------------------------------------

    def _config_interrupt(self) -> None:
        self._config_interrupts += 1
        t = self.transport
        if self._closed:
            return
        status = t.status
        if status & VIRTIO_CONFIG_S_NEEDS_RESET:
            self._start_recovery("device set DEVICE_NEEDS_RESET")
            return
        if not status & VIRTIO_CONFIG_S_DRIVER_OK:
            return
        old = self.geometry
        self.geometry = self._read_geometry()
        if old is not None and old.capacity != self.geometry.capacity:
            log.info("virtio_blk_capacity_changed", device=self.name, capacity=self.geometry.capacity)
            for listener in self.capacity_listeners:
                listener(self.geometry.capacity)

    def _queue_broken(self, reason: str) -> None:
        self._start_recovery(reason)

    def _start_recovery(self, reason: str) -> None:
        if self._recovering is not None or self._closed:
            return
        self._set_ready(False)
        self._recovering = asyncio.get_running_loop().create_task(self._recover(reason))

    async def _recover(self, reason: str) -> None:
        log.warning("virtio_blk_reset", device=self.name, reason=reason)
        self._resets += 1
        error = BlkResubmitError(f"{self.name}: device reset ({reason})")
        delay = REINIT_RETRY_FIRST
        try:
            await self._teardown(error)
            while not self._closed:
                try:
                    await self._initialize()
                    return
                except TransportError as unreachable:
                    # Unreachable for now (a vhost-user back end restarting): requests wait.
                    log.warning(
                        "virtio_blk_reinit_retry", device=self.name, error=str(unreachable), delay=delay
                    )
                    await self._teardown(error)  # whatever the failed attempt had set up
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, REINIT_RETRY_MAX)
        except Exception as exc:
            log.error("virtio_blk_reinit_failed", device=self.name, error=str(exc))
            raise
        finally:
            self._recovering = None

    async def _teardown(self, exc: BaseException) -> None:
        """Reset the device (it stops touching memory), then fail and free everything.

        The reset may take as long as the device's requests in flight: the loop serves the other
        disks meanwhile, and this one's requests wait (none is failed before its buffers are free).
        """
        t = self.transport
        await t.reset()
        t.release_interrupts()
        for queue in self.queues:
            self._retired["kicks"] += queue.kicks
            self._retired["kicks_suppressed"] += queue.kicks_suppressed
            self._retired["interrupts"] += queue.interrupts
            self._retired["completed"] += queue.completed
            queue.fail_all(exc)
            queue.free()
        for views in self._status_views:
            for view in views:
                view.release()
        for slots in self._slots:
            slots.free()
        self.queues = []
        self._slots = []
        self._status_views = []

    async def close(self, reason: str = "driver closed") -> None:
        """Reset the device and release every resource; in-flight requests fail with a
        BlkResetError that gives ``reason``."""
        if self._closed:
            return
        self._closed = True
        if self._recovering is not None:
            await asyncio.gather(self._recovering, return_exceptions=True)
        self._set_ready(False)
        try:
            await self._teardown(BlkResetError(f"{self.name}: {reason}"))
        finally:
            self.transport.close()
            self._ready.set()  # submitters waiting for a reset to end wake up and see _closed
        if self._resubmitting:  # chains waiting to go again: they fail now, with the reason
            await asyncio.gather(*self._resubmitting, return_exceptions=True)

    # -- request submission ------------------------------------------------------------------

    async def _submit(
        self,
        rtype: int,
        sector: int,
        data: list[tuple[int, int]],
        *,
        data_in: bool,
        nbytes: int = 0,
        pinned: tuple[DmaBuffer, ...] = (),
    ) -> None:
        """Send one request and wait for its status; raises the matching BlkError.

        Waits for the device while it is being reset, and for free descriptors while the
        ring is full: a request is never dropped for lack of space.
        """
        started = _perf_counter()
        self._account_io(started, 1)
        attempts = 0
        try:
            while True:
                if self._closed:
                    raise BlkResetError(f"{self.name}: driver closed")
                if not self._is_ready:
                    await self._ready.wait()
                    continue
                queue = self._pick_queue()
                try:
                    await queue.reserve(queue.descriptors_for(len(data) + 2))
                except QueueBrokenError:
                    continue
                # No await from here to add(): the reserved descriptors stay ours.
                future: asyncio.Future[int] = self._running.loop().create_future()
                slot_gpa, status_view = self._header(queue, rtype, sector)
                self._add(queue, slot_gpa, data, data_in, _Request(future, status_view, pinned))
                try:
                    status = await future
                except BlkResubmitError:
                    if attempts >= RESUBMIT_LIMIT or self._closed:
                        raise
                    attempts += 1
                    self._resubmitted += 1
                    continue  # the device is being recovered: the request goes again
                break
        except asyncio.CancelledError:
            self._retire(rtype, -1, started, nbytes)
            raise
        except BaseException:
            self._retire(rtype, None, started, nbytes)  # reset, or the driver closed
            raise
        self._retire(rtype, status, started, nbytes)
        if status != VIRTIO_BLK_S_OK:
            raise self._status_error(rtype, status, sector)

    def start_io(self, rtype: int, sector: int, buffer: DmaBuffer, length: int, callback: IoCallback) -> bool:
        """Start a one-segment read (IN) or write (OUT) now, if nothing would make it wait.

        Returns False, having done nothing, when the request would have to wait (device being
        reset, no free descriptors or others already waiting for them) or needs splitting
        (longer than ``size_max``); the caller then takes the awaitable path. Otherwise the
        chain is on the ring and ``callback`` is told its outcome once, from the interrupt.
        """
        if self._closed or not self._is_ready or length > self._size_max or length <= 0:
            return False
        if rtype == VIRTIO_BLK_T_OUT and self.features >> vb.VIRTIO_BLK_F_RO & 1:
            return False  # the awaitable path raises BlkReadOnlyError
        queue = self._pick_queue()
        if not queue.can_add(queue.descriptors_for(3)):
            return False
        started = _perf_counter()
        self._account_io(started, 1)
        slot_gpa, status_view = self._header(queue, rtype, sector)
        token = _CallbackRequest(self, rtype, sector, status_view, buffer, length, started, callback)
        self._add(queue, slot_gpa, [(buffer.gpa, length)], rtype == VIRTIO_BLK_T_IN, token)
        return True

    def _resubmit_later(self, token: _CallbackRequest) -> None:
        """A :meth:`start_io` chain the device was reset under: submit it again once it is back."""
        self._resubmitted += 1
        task = self._running.loop().create_task(self._resubmit(token))
        self._resubmitting.add(task)
        task.add_done_callback(self._resubmitting.discard)

    async def _resubmit(self, token: _CallbackRequest) -> None:
        data_in = token.rtype == VIRTIO_BLK_T_IN
        while True:
            if self._closed:
                token.pinned.pin()  # fail() unpins it
                token.fail(BlkResetError(f"{self.name}: driver closed"))
                return
            if not self._is_ready:
                await self._ready.wait()
                continue
            queue = self._pick_queue()
            try:
                await queue.reserve(queue.descriptors_for(3))
            except QueueBrokenError:
                continue
            slot_gpa, status_view = self._header(queue, token.rtype, token.sector)
            token.status_view = status_view
            token.pinned.pin()
            self._add(queue, slot_gpa, [(token.pinned.gpa, token.nbytes)], data_in, token)
            return

    def _set_ready(self, ready: bool) -> None:
        if ready:
            self._ready.set()
        else:
            self._ready.clear()
        self._is_ready = ready

    def _pick_queue(self) -> DriverVirtqueue:
        queues = self.queues
        return queues[next(self._next_queue) % len(queues)] if len(queues) > 1 else queues[0]

    def _header(self, queue: DriverVirtqueue, rtype: int, sector: int) -> tuple[int, memoryview]:
        """Write the request header into the next head's slot; its address and status byte."""
        head = queue.next_head
        slots = self._slots[queue.index]
        _OUTHDR_PACK(slots.view, head * SLOT_SIZE, rtype, 0, sector)
        status_view = self._status_views[queue.index][head]
        status_view[0] = 0xFF
        return slots.gpa + head * SLOT_SIZE, status_view

    def _add(
        self,
        queue: DriverVirtqueue,
        slot_gpa: int,
        data: list[tuple[int, int]],
        data_in: bool,
        token: Completion,
    ) -> None:
        """Publish the chain: the header :meth:`_header` wrote at ``slot_gpa``, ``data``, the status.

        The descriptors must be free; ``token`` is made from the status byte :meth:`_header` gave.
        """
        header = (slot_gpa, vb.VIRTIO_BLK_OUTHDR_SIZE)
        status_buf = (slot_gpa + vb.VIRTIO_BLK_OUTHDR_SIZE, 1)
        if data_in:
            queue.add([header], [*data, status_buf], token)
        else:
            queue.add([header, *data], [status_buf], token)

    def _status_error(self, rtype: int, status: int, sector: int) -> BlkError:
        op = _OP_NAMES[rtype]
        if status == VIRTIO_BLK_S_UNSUPP:
            return BlkUnsupportedError(f"{self.name}: {op} not supported by the device")
        return BlkIOError(f"{self.name}: {op} of sector {sector} failed (status {status})")

    def _retire(self, rtype: int, status: int | None, started: float, nbytes: int) -> None:
        """Count a finished request: ``status`` is the device's byte, None for a reset, -1 cancelled."""
        if status == VIRTIO_BLK_S_OK:
            name = "ok"
            if rtype == VIRTIO_BLK_T_IN:
                self._bytes_read += nbytes
            elif rtype == VIRTIO_BLK_T_OUT:
                self._bytes_written += nbytes
        elif status is None:
            name = "reset"
        elif status == -1:
            name = "cancelled"
        else:
            name = _STATUS_NAMES.get(status, "bad_status")
        op = _OP_NAMES[rtype]
        outcomes = self._requests.get(op)
        if outcomes is None:
            outcomes = self._requests[op] = {}
        outcomes[name] = outcomes.get(name, 0) + 1
        now = _perf_counter()
        self._account_io(now, -1)
        if self.observer is not None:
            self.observer(op, name, now - started, nbytes)

    def _account_io(self, now: float, delta: int) -> None:
        """Advance busy time and in-flight-weighted time to ``now``, then change the count."""
        active = self._active
        if active:
            elapsed = now - self._io_stamp
            self._io_time += elapsed
            self._io_weighted += elapsed * active
        self._io_stamp = now
        self._active = active + delta

    # -- the block API ---------------------------------------------------------------------

    async def read_into(self, sector: int, buffer: DmaBuffer, length: int | None = None) -> None:
        """Read ``length`` bytes (default: the buffer's size) at ``sector`` into a DMA buffer."""
        length = buffer.size if length is None else length
        if length <= 0 or length > buffer.size:
            raise ValueError("length must be in 1..buffer.size")
        await self._io(VIRTIO_BLK_T_IN, sector, buffer, length)

    async def write_from(
        self, sector: int, buffer: DmaBuffer, length: int | None = None, *, fua: bool = False
    ) -> None:
        """Write ``length`` bytes of a DMA buffer at ``sector``; ``fua``: durable on return."""
        if self.read_only:
            raise BlkReadOnlyError(f"{self.name} is read-only")
        length = buffer.size if length is None else length
        if length <= 0 or length > buffer.size:
            raise ValueError("length must be in 1..buffer.size")
        await self._io(VIRTIO_BLK_T_OUT, sector, buffer, length)
        if fua:
            await self.flush()

    async def _io(self, rtype: int, sector: int, buffer: DmaBuffer, length: int) -> None:
        """One request per ``max_transfer`` bytes, each split into ``size_max`` segments."""
        size_max = self._size_max
        chunk = self._chunk
        data_in = rtype == VIRTIO_BLK_T_IN
        if length <= size_max:  # the common case: one request, one data segment
            await self._submit(
                rtype, sector, [(buffer.gpa, length)], data_in=data_in, nbytes=length, pinned=(buffer,)
            )
            return
        parts = []
        for offset in range(0, length, chunk):
            piece = min(chunk, length - offset)
            segments = [
                (buffer.gpa + offset + o, min(size_max, piece - o)) for o in range(0, piece, size_max)
            ]
            parts.append(
                self._submit(
                    rtype,
                    sector + offset // SECTOR,
                    segments,
                    data_in=data_in,
                    nbytes=piece,
                    pinned=(buffer,),
                )
            )
        if len(parts) == 1:
            await parts[0]
            return
        results = await asyncio.gather(*parts, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def read(self, sector: int, length: int) -> bytes:
        """Read ``length`` bytes (a multiple of 512) starting at ``sector``."""
        buffer = await self.dma.allocate_wait(length)
        try:
            await self.read_into(sector, buffer, length)
            return bytes(buffer.view[:length])
        finally:
            buffer.free()

    async def write(self, sector: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        """Write ``data`` (a multiple of 512 bytes) starting at ``sector``."""
        length = len(data) if not isinstance(data, memoryview) else data.nbytes
        if self.read_only:
            raise BlkReadOnlyError(f"{self.name} is read-only")
        buffer = await self.dma.allocate_wait(length)
        try:
            buffer.view[:length] = data
            await self.write_from(sector, buffer, length, fua=fua)
        finally:
            buffer.free()

    async def flush(self) -> None:
        """Make every completed write durable (a no-op without a write cache)."""
        if not self.has_feature(vb.VIRTIO_BLK_F_FLUSH):
            return  # the device is write-through (5.2.6.2)
        await self._submit(VIRTIO_BLK_T_FLUSH, 0, [], data_in=False)

    async def get_id(self) -> str:
        """The device's serial (VIRTIO_BLK_T_GET_ID, at most 20 bytes)."""
        buffer = await self.dma.allocate_wait(vb.VIRTIO_BLK_ID_BYTES)
        try:
            buffer.view[:] = bytes(vb.VIRTIO_BLK_ID_BYTES)
            await self._submit(
                VIRTIO_BLK_T_GET_ID,
                0,
                [(buffer.gpa, vb.VIRTIO_BLK_ID_BYTES)],
                data_in=True,
                pinned=(buffer,),
            )
            return bytes(buffer.view).split(b"\0", 1)[0].decode(errors="replace")
        finally:
            buffer.free()

    async def discard(self, sector: int, sectors: int) -> None:
        """Deallocate ``sectors`` sectors at ``sector`` (VIRTIO_BLK_T_DISCARD)."""
        geometry = self._geometry()
        await self._segmented(
            VIRTIO_BLK_T_DISCARD,
            vb.VIRTIO_BLK_F_DISCARD,
            sector,
            sectors,
            0,
            geometry.max_discard_sectors,
            geometry.max_discard_seg,
        )

    async def write_zeroes(self, sector: int, sectors: int, *, unmap: bool = False) -> None:
        """Make ``sectors`` sectors at ``sector`` read as zeroes (VIRTIO_BLK_T_WRITE_ZEROES)."""
        geometry = self._geometry()
        flags = vb.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
        await self._segmented(
            VIRTIO_BLK_T_WRITE_ZEROES,
            vb.VIRTIO_BLK_F_WRITE_ZEROES,
            sector,
            sectors,
            flags,
            geometry.max_write_zeroes_sectors,
            geometry.max_write_zeroes_seg,
        )

    async def _segmented(
        self,
        rtype: int,
        feature: int,
        sector: int,
        sectors: int,
        flags: int,
        max_sectors: int,
        max_seg: int,
    ) -> None:
        if self.read_only:
            raise BlkReadOnlyError(f"{self.name} is read-only")
        if not self.has_feature(feature):
            raise BlkUnsupportedError(f"{self.name}: {OPERATIONS[RequestType(rtype)]} not negotiated")
        if sectors <= 0:
            raise ValueError("sectors must be positive")
        max_sectors = max(1, max_sectors)
        alignment = self._geometry().blk_size // SECTOR
        max_sectors -= max_sectors % alignment or 0
        ranges = [
            (s, min(max_sectors, sector + sectors - s)) for s in range(sector, sector + sectors, max_sectors)
        ]
        requests = []
        seg_size = vb.VIRTIO_BLK_DISCARD_WRITE_ZEROES_SIZE
        for start in range(0, len(ranges), max_seg):
            batch = ranges[start : start + max_seg]
            requests.append(self._send_segments(rtype, batch, flags, seg_size))
        results = await asyncio.gather(*requests, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _send_segments(
        self, rtype: int, batch: list[tuple[int, int]], flags: int, seg_size: int
    ) -> None:
        buffer = await self.dma.allocate_wait(len(batch) * seg_size)
        try:
            for i, (start, count) in enumerate(batch):
                vb.VIRTIO_BLK_DISCARD_WRITE_ZEROES.pack_into(buffer.view, i * seg_size, start, count, flags)
            await self._submit(
                rtype, 0, [(buffer.gpa, len(batch) * seg_size)], data_in=False, pinned=(buffer,)
            )
        finally:
            buffer.free()

    # -- observability ---------------------------------------------------------------------

    def statistics(self) -> VirtioBlkStatistics:
        queues = tuple(
            QueueStatistics(
                index=q.index,
                size=q.size,
                inflight=q.inflight,
                free_descriptors=q.num_free,
                kicks=q.kicks,
                kicks_suppressed=q.kicks_suppressed,
                interrupts=q.interrupts,
                completed=q.completed,
            )
            for q in self.queues
        )
        self._account_io(_perf_counter(), 0)
        return VirtioBlkStatistics(
            queues=queues,
            requests_inflight=self._active,
            io_time=self._io_time,
            io_time_weighted=self._io_weighted,
            requests={
                (op, name): n for op, outcomes in self._requests.items() for name, n in outcomes.items()
            },
            bytes_read=self._bytes_read,
            bytes_written=self._bytes_written,
            resets=self._resets,
            config_interrupts=self._config_interrupts,
            resubmitted=self._resubmitted,
        )
