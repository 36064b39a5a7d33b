"""The virtio-blk device: its configuration space, its queues, and the answers it publishes.

Device layer, on top of :mod:`device.virtio` and :mod:`device.virtqueue`. A kicked queue's chains
are parsed by :mod:`device.blk_request` (purely) and run by :mod:`device.blk_executor` through the
disk's block stack (:mod:`device.block`); every finished request comes back to
:meth:`VirtioBlkDevice.executed`, which writes its status byte and publishes it on the used ring.
A reset abandons requests in flight; the status reads 0 once none of them touches guest memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Final

import structlog
from mypy_extensions import mypyc_attr

from device.blk_executor import Execution, Executor, IoMode, log_io_error
from device.blk_request import BlkRequest, Limits, RequestError, parse_request
from device.block.node import BlockNode
from device.block.throttle import ThrottleMember
from device.machine import Machine
from device.memory import GuestMemory
from device.spec import virtio_blk as vb
from device.spec.virtio import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_PACKED
from device.spec.virtio_blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
)
from device.spec.virtio_pci import VIRTIO_ID_BLOCK
from device.virtio import VirtioDevice
from device.virtio_pci import VirtioPciFunction
from device.virtqueue import DeviceVirtqueue

__all__ = ["BlkConfig", "BlkRequest", "IoMode", "VirtioBlkDevice", "plug_blk"]

log = structlog.get_logger("vblk.device.blk")


SECTOR: Final = vb.VIRTIO_BLK_SECTOR_SIZE


@dataclasses.dataclass(frozen=True, slots=True)
class BlkConfig:
    """How a virtio-blk device presents itself (the 96-byte config space and its features)."""

    serial: str = "vblk"
    num_queues: int = 1
    queue_size: int = 256
    size_max: int = 1 << 20  # bytes per segment
    seg_max: int | None = None  # default: queue_size - 2
    blk_size: int = 512
    physical_block_exp: int = 3  # 4 KiB physical blocks
    min_io_size: int = 8  # logical blocks
    opt_io_size: int = 0
    max_discard_sectors: int = 1 << 22
    max_discard_seg: int = 32
    max_write_zeroes_sectors: int = 1 << 22
    max_write_zeroes_seg: int = 32
    write_zeroes_may_unmap: bool = True
    writeback: bool = True
    read_only: bool = False
    io_mode: IoMode = "inline"
    io_threads: int = 4
    features_mask: int = (1 << 64) - 1  # clear bits to withhold features
    transitional: bool = False  # also serve legacy drivers (no VIRTIO_F_VERSION_1)

    def __post_init__(self) -> None:
        if self.blk_size < SECTOR or self.blk_size & (self.blk_size - 1):
            raise ValueError("blk_size must be a power of two >= 512")
        if self.queue_size < 4 or self.queue_size & (self.queue_size - 1):
            raise ValueError("queue_size must be a power of two >= 4")
        if self.size_max < self.blk_size:
            raise ValueError("size_max must be at least blk_size")
        if self.seg_max is not None and not 1 <= self.seg_max <= self.queue_size - 2:
            raise ValueError("seg_max must be in 1..queue_size-2")
        if len(self.serial.encode()) > vb.VIRTIO_BLK_ID_BYTES:
            raise ValueError("serial is at most 20 bytes")
        if self.io_mode not in ("inline", "thread"):
            raise ValueError("io_mode is inline or thread")

    @property
    def effective_seg_max(self) -> int:
        return self.seg_max if self.seg_max is not None else self.queue_size - 2


def _geometry(capacity: int) -> tuple[int, int, int]:
    """A CHS geometry for old tools: 16 heads, 63 sectors per track, cylinders clamped."""
    heads, sectors = 16, 63
    return min(capacity // (heads * sectors), 0xFFFF), heads, sectors


@mypyc_attr(allow_interpreted_subclasses=True)  # device.vhost_user subclasses it
class VirtioBlkDevice(VirtioDevice):
    """A virtio-blk device (device id 2) serving one block stack (its top node)."""

    device_id = VIRTIO_ID_BLOCK

    def __init__(self, memory: GuestMemory, node: BlockNode, config: BlkConfig) -> None:
        self.node = node
        self.blk_config = config
        capabilities = node.capabilities
        self.read_only = config.read_only or capabilities.read_only
        features = (
            1 << VIRTIO_F_INDIRECT_DESC
            | 1 << VIRTIO_F_EVENT_IDX
            | 1 << vb.VIRTIO_BLK_F_SIZE_MAX
            | 1 << vb.VIRTIO_BLK_F_SEG_MAX
            | 1 << vb.VIRTIO_BLK_F_GEOMETRY
            | 1 << vb.VIRTIO_BLK_F_BLK_SIZE
            | 1 << vb.VIRTIO_BLK_F_TOPOLOGY
            | 1 << vb.VIRTIO_BLK_F_FLUSH
            | 1 << vb.VIRTIO_BLK_F_CONFIG_WCE
            | 1 << vb.VIRTIO_BLK_F_MQ
            | 1 << vb.VIRTIO_BLK_F_DISCARD
            | 1 << vb.VIRTIO_BLK_F_WRITE_ZEROES
        )
        if self.read_only:
            features |= 1 << vb.VIRTIO_BLK_F_RO
        if type(self).packed_queue_type is not None:
            features |= 1 << VIRTIO_F_RING_PACKED
        super().__init__(
            memory,
            num_queues=config.num_queues,
            queue_max_size=config.queue_size,
            device_features=features & config.features_mask,
            transitional=config.transitional,
        )
        self.writeback = int(config.writeback)
        self._requests: dict[int, dict[int, int]] = {}  # type -> status -> count
        self._executor = Executor(self, node, memory, config.io_mode, config.io_threads, self._running.loop)
        self._executing = 0  # requests started and not yet back (reset waits for none)
        self._completions: list[tuple[DeviceVirtqueue, int, int]] = []
        self._completion_scheduled = False
        self._processing: DeviceVirtqueue | None = None  # the queue process_queue works on now
        self._pushed = False
        self._epoch = 0
        self.pci_slot = -1  # the PCI device number it is plugged in at (plug_blk)
        self._holds = 0  # quiesce() calls not yet resumed: no request is started meanwhile
        self._held: dict[int, DeviceVirtqueue] = {}  # queues kicked while held
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._serial = config.serial.encode()
        self._limits = self._make_limits()
        self._configure_executor()

    @property
    def strategy(self) -> str:
        """How requests run: ``inline``, ``thread`` or ``async`` (from the stack and ``io_mode``)."""
        return self._executor.strategy

    # -- configuration space ------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Capacity in 512-byte sectors."""
        return self.node.size // SECTOR

    def config_bytes(self) -> bytes:
        cfg = self.blk_config
        cylinders, heads, sectors = _geometry(self.capacity)
        raw = bytearray(vb.VIRTIO_BLK_CONFIG_SIZE)
        vb.VIRTIO_BLK_CONFIG.pack_into(
            raw,
            0,
            self.capacity,
            cfg.size_max,
            cfg.effective_seg_max,
            cylinders,
            heads,
            sectors,
            cfg.blk_size,
            cfg.physical_block_exp,
            0,
            cfg.min_io_size,
            cfg.opt_io_size,
            self.writeback,
            len(self.queues),
            cfg.max_discard_sectors,
            cfg.max_discard_seg,
            cfg.blk_size // SECTOR,
            cfg.max_write_zeroes_sectors,
            cfg.max_write_zeroes_seg,
            int(cfg.write_zeroes_may_unmap),
        )
        return bytes(raw)

    def read_config(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > vb.VIRTIO_BLK_CONFIG_SIZE:
            return 0
        return int.from_bytes(self.config_bytes()[offset : offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        if offset == vb.VIRTIO_BLK_CFG_WRITEBACK and size == 1:
            if self.has_feature(vb.VIRTIO_BLK_F_CONFIG_WCE):
                self.writeback = 1 if value else 0
                self._configure_executor()

    def _make_limits(self) -> Limits:
        cfg = self.blk_config
        return Limits(
            capacity=self.capacity,
            read_only=self.read_only,
            flush=self.has_feature(vb.VIRTIO_BLK_F_FLUSH),
            discard=self.has_feature(vb.VIRTIO_BLK_F_DISCARD),
            write_zeroes=self.has_feature(vb.VIRTIO_BLK_F_WRITE_ZEROES),
            max_discard_sectors=cfg.max_discard_sectors,
            max_discard_seg=cfg.max_discard_seg,
            max_write_zeroes_sectors=cfg.max_write_zeroes_sectors,
            max_write_zeroes_seg=cfg.max_write_zeroes_seg,
            sector_alignment=cfg.blk_size // SECTOR,
        )

    def _configure_executor(self) -> None:
        executor = self._executor
        # Without FLUSH negotiated the device must be write-through (5.2.6.2).
        executor.writethrough = not (self.has_feature(vb.VIRTIO_BLK_F_FLUSH) and self.writeback)
        executor.may_unmap = self.blk_config.write_zeroes_may_unmap

    # -- control plane ------------------------------------------------------------------------

    def resize(self, new_size: int) -> None:
        """Resize the stack and tell the driver through a configuration change interrupt."""
        if new_size <= 0 or new_size % self.blk_config.blk_size:
            raise ValueError(f"size {new_size} is not a positive multiple of the block size")
        self.node.resize(new_size)
        self._limits = self._make_limits()
        self.config_changed()

    @property
    def throttle(self) -> ThrottleMember | None:
        """The disk's gate into its throttle group (None: no limits)."""
        return self._executor.gate

    @throttle.setter
    def throttle(self, member: ThrottleMember | None) -> None:
        old = self._executor.gate
        self._executor.gate = member
        if old is not None and old is not member:
            old.release()

    async def quiesce(self) -> None:
        """Start no more requests and wait until every one started has ended (QEMU's drained
        section): between this and :meth:`resume` the stack sees no I/O, so a change made there
        (a checkpoint of the dirty bitmaps) falls between two requests, never inside one.
        Requests the driver queues meanwhile wait in their virtqueues. Calls nest."""
        self._holds += 1
        gate = self._executor.gate
        if gate is not None:
            gate.release()  # a drained section does not wait for the limits
        while self._executing:
            waiter: asyncio.Future[None] = self._running.loop().create_future()
            self._idle_waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                self.resume()
                raise

    def resume(self) -> None:
        """End a :meth:`quiesce`: the last one takes up the queues kicked meanwhile."""
        self._holds -= 1
        if self._holds or not self._held:
            return
        held, self._held = self._held, {}
        for queue in held.values():
            self.schedule(queue)

    # -- lifecycle hooks ------------------------------------------------------------------------

    def on_driver_ok(self) -> None:
        if not self.has_feature(vb.VIRTIO_BLK_F_CONFIG_WCE):
            self.writeback = int(self.blk_config.writeback)
        self._limits = self._make_limits()
        self._configure_executor()
        self._executor.start()

    def on_reset(self) -> None:
        # Requests in flight go on (their buffers are still the device's until they end), but
        # their answers are dropped and their later steps not started.
        self._epoch += 1
        self._executor.epoch = self._epoch
        gate = self._executor.gate
        if gate is not None:
            gate.refuse()  # requests held by the limits are not started for a reset device
        self._completions.clear()
        self.writeback = int(self.blk_config.writeback)

    @property
    def busy(self) -> bool:
        return self._executing > 0

    def close(self) -> None:
        self.on_reset()
        self._executor.close()

    # -- the data path ------------------------------------------------------------------------

    def process_queue(self, queue: DeviceVirtqueue) -> None:
        if self._holds:
            self._held[queue.index] = queue
            return
        memory = self.memory
        limits = self._limits
        executor = self._executor
        self._processing = queue
        self._pushed = False
        try:
            while True:
                chain = queue.pop()
                if chain is None:
                    if queue.enable_notification():
                        continue
                    break
                try:
                    request = parse_request(chain, memory, limits)
                except RequestError as exc:
                    self.device_error(f"queue {queue.index}: head {chain.head}: {exc}")
                    return
                status = request.status
                if status is None and request.type == VIRTIO_BLK_T_GET_ID:
                    written = self._get_id(request)
                    self._answer(queue, chain.head, request, VIRTIO_BLK_S_OK, written)
                elif status is not None:
                    self._answer(queue, chain.head, request, status, 0)
                else:
                    self._executing += 1
                    executor.submit(Execution(executor, request, queue, chain.head, self._epoch))
        finally:
            self._processing = None
        if self._pushed:
            self._pushed = False
            self.interrupt_queue(queue)

    def _get_id(self, request: BlkRequest) -> int:
        ident = self._serial.ljust(vb.VIRTIO_BLK_ID_BYTES, b"\0")
        written = 0
        for addr, length in request.data:
            take = min(length, len(ident) - written)
            self.memory.write(addr, ident[written : written + take])
            written += take
        return written

    def executed(self, execution: Execution, error: BaseException | None) -> None:
        """Every request's end, whichever way it ran (on the loop thread): answer it."""
        self._executing -= 1
        if not self._executing and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        if execution.epoch != self._epoch or not self.driver_ok:
            # The device was reset meanwhile (the driver already failed this request).
            if not self._executing:
                self.idle()
            return
        request = execution.request
        if error is None:
            status = VIRTIO_BLK_S_OK
            written = request.data_len if request.type == VIRTIO_BLK_T_IN else 0
        else:
            log_io_error(request, error)
            status = VIRTIO_BLK_S_IOERR
            written = 0
        self._answer(execution.queue, execution.head, request, status, written)

    def _answer(
        self, queue: DeviceVirtqueue, head: int, request: BlkRequest, status: int, written: int
    ) -> None:
        """Write the status byte, count, and publish: at once while the queue is being processed
        (one interrupt for the batch), else with the other answers of this pass of the loop."""
        memory = self.memory
        memory.buffer[request.status_addr - memory.base] = status
        self._count(request.type, status)
        if queue is self._processing:
            queue.push(head, written + 1)
            self._pushed = True
            return
        self._completions.append((queue, head, written + 1))
        if not self._completion_scheduled:
            self._completion_scheduled = True
            self._running.loop().call_soon(self._flush_completions)

    @property
    def requests(self) -> dict[tuple[int, int], int]:
        """Requests answered, by (type, status)."""
        return {(t, s): n for t, statuses in self._requests.items() for s, n in statuses.items()}

    def _count(self, rtype: int, status: int) -> None:
        statuses = self._requests.get(rtype)
        if statuses is None:
            statuses = self._requests[rtype] = {}
        statuses[status] = statuses.get(status, 0) + 1

    def _flush_completions(self) -> None:
        self._completion_scheduled = False
        completions, self._completions = self._completions, []
        touched: dict[int, DeviceVirtqueue] = {}
        for queue, head, written in completions:
            queue.push(head, written)
            touched[queue.index] = queue
        for queue in touched.values():
            self.interrupt_queue(queue)

    @property
    def inflight(self) -> int:
        return sum(len(q.inflight) for q in self.queues)


def plug_blk(machine: Machine, node: BlockNode, config: BlkConfig | None = None) -> VirtioBlkDevice:
    """Create a virtio-blk device for the stack ``node`` tops and plug it into ``machine``."""
    device = VirtioBlkDevice(machine.memory, node, config or BlkConfig())
    device.pci_slot = machine.plug(VirtioPciFunction(device))
    return device
