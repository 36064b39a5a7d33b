"""A transport-independent virtio device: features, status, queues, notifications, resets.

Device layer, between a transport (:mod:`device.virtio_pci`, :mod:`device.vhost_user`) and a
device type (:mod:`device.blk`). Kicks schedule queue processing on the event loop; a ring
violation sets DEVICE_NEEDS_RESET, raises a configuration-change interrupt and stops the device.
A reset takes effect at once for the rings, but the status reads 0 only when no request still
touches guest memory (4.1.4.3.2: the driver waits for that), so nothing blocks the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import Callable
from typing import ClassVar, Protocol

import structlog
from mypy_extensions import mypyc_attr

from device.memory import GuestMemory
from device.packed_virtqueue import PackedDeviceVirtqueue
from device.platform import RunningLoop
from device.spec.virtio import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)
from device.virtqueue import DeviceVirtqueue, VirtqueueError

log = structlog.get_logger("vblk.device")


class Transport(Protocol):
    """How a device raises interrupts; implemented by a transport such as virtio-pci."""

    def queue_interrupt(self, queue: DeviceVirtqueue) -> None: ...

    def config_interrupt(self) -> None: ...


@dataclasses.dataclass(slots=True)
class DeviceStatistics:
    """Counters of the device side (a snapshot is a copy)."""

    kicks: int = 0
    kicks_ignored: int = 0
    interrupts_raised: int = 0
    interrupts_suppressed: int = 0
    config_interrupts: int = 0
    resets: int = 0
    needs_reset: int = 0
    # MSI-X vector (the queue's, VIRTIO_MSI_NO_VECTOR when none) -> [raised, suppressed]
    interrupts_by_vector: dict[int, list[int]] = dataclasses.field(default_factory=dict)


@mypyc_attr(allow_interpreted_subclasses=True)  # so that VirtioBlkDevice can allow them
class VirtioDevice:
    """State every virtio device has; subclasses implement :meth:`process_queue`.

    A *transitional* device also serves legacy drivers (VIRTIO 1.2 section 7.4): one that
    does not accept VIRTIO_F_VERSION_1 gets the legacy rules instead of a refused
    FEATURES_OK. Its rings then sit where the legacy layout puts them (the transport says
    where) and its fields are in the guest's native byte order, which on the little-endian
    hosts vblk runs on (x86: guest and host alike) is the little-endian of VERSION_1; on a
    big-endian host the device keeps refusing legacy drivers.
    """

    device_id = 0
    #: The virtqueue implementation (a transport may need a stricter one). Read from the
    #: class of the instance: a subclass defined in interpreted code may override it.
    queue_type: ClassVar[type[DeviceVirtqueue]] = DeviceVirtqueue
    #: The packed virtqueue implementation (VIRTIO_F_RING_PACKED), or None where the device
    #: does not offer packed rings.
    packed_queue_type: ClassVar[type[DeviceVirtqueue] | None] = PackedDeviceVirtqueue

    def __init__(
        self,
        memory: GuestMemory,
        *,
        num_queues: int,
        queue_max_size: int,
        device_features: int,
        transitional: bool = False,
    ) -> None:
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError("num_queues must be in 1..65535")
        if queue_max_size < 1 or queue_max_size & (queue_max_size - 1) or queue_max_size > 32768:
            raise ValueError("queue size must be a power of two in 1..32768")
        self.memory = memory
        self.device_features = device_features | (1 << VIRTIO_F_VERSION_1)
        self.transitional = transitional
        queue_type = type(self).queue_type
        self.queues = [queue_type(memory, i, queue_max_size) for i in range(num_queues)]
        self._split_queues = self.queues
        self._packed_queues: list[DeviceVirtqueue] | None = None  # made when a driver asks for them
        self.transport: Transport | None = None
        self.stats = DeviceStatistics()
        self._running = RunningLoop()
        self.config_generation = 0
        self.broken_reason: str | None = None
        #: Called with the reason each time the device sets DEVICE_NEEDS_RESET (after the
        #: status is set, before the driver is notified).
        self.error_listeners: list[Callable[[str], None]] = []
        self._scheduled: set[int] = set()
        self._resetting = False  # written 0, waiting for requests in flight to end
        self._reset_waiters: list[asyncio.Future[None]] = []
        self._reset_state()

    def _reset_state(self) -> None:
        self.driver_features = 0
        self.legacy = False
        self.status = 0
        self.broken_reason = None
        self._scheduled.clear()
        self.queues = self._split_queues  # the ring layout is the next driver's to choose
        for queue in self.queues:
            queue.reset()

    @property
    def packed(self) -> bool:
        """The driver negotiated packed virtqueues."""
        return self.queues is self._packed_queues

    def _use_packed_queues(self) -> None:
        """FEATURES_OK with VIRTIO_F_RING_PACKED: the queues become packed ones, keeping what the
        transport registers hold already (a driver may set them up before FEATURES_OK)."""
        packed_type = type(self).packed_queue_type
        assert packed_type is not None
        if self._packed_queues is None:
            self._packed_queues = [packed_type(self.memory, q.index, q.max_size) for q in self._split_queues]
        for split, queue in zip(self._split_queues, self._packed_queues, strict=True):
            queue.reset()
            queue.size = split.size
            queue.desc_addr = split.desc_addr
            queue.driver_addr = split.driver_addr
            queue.device_addr = split.device_addr
            queue.enabled = split.enabled
            queue.msix_vector = split.msix_vector
            queue.barrier = split.barrier
        self.queues = self._packed_queues

    # -- hooks for device types --------------------------------------------------------------

    def validate_features(self, features: int) -> bool:
        """Device-type rules on a feature set, beyond "a subset of what is offered"."""
        return True

    def on_driver_ok(self) -> None:
        """The driver finished initialisation."""

    def on_reset(self) -> None:
        """The driver reset the device: start nothing more, drop the answers of work in flight."""

    @property
    def busy(self) -> bool:
        """Work started before a reset still touches guest memory (device types say)."""
        return False

    def idle(self) -> None:
        """A device type tells: the last work in flight ended. A pending reset completes."""
        if self._resetting and not self.busy:
            self._finish_reset()

    def read_config(self, offset: int, size: int) -> int:
        """Read the device-specific configuration structure (little-endian)."""
        return 0

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Write the device-specific configuration structure (only driver-writable fields)."""

    def process_queue(self, queue: DeviceVirtqueue) -> None:
        """Handle available buffers of ``queue`` (deferred work after a kick)."""
        raise NotImplementedError

    # -- driver-facing state machine ------------------------------------------------------------

    def has_feature(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1)

    @property
    def driver_ok(self) -> bool:
        return (
            bool(self.status & VIRTIO_CONFIG_S_DRIVER_OK)
            and self.broken_reason is None
            and not self._resetting
        )

    @property
    def resetting(self) -> bool:
        """Written 0, and the status does not read 0 yet (requests in flight)."""
        return self._resetting

    def set_driver_features(self, select: int, value: int) -> None:
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK or not 0 <= select <= 1:
            return  # frozen after FEATURES_OK; only 64 feature bits exist
        mask = 0xFFFFFFFF << (32 * select)
        self.driver_features = (self.driver_features & ~mask) | (value << (32 * select))

    def set_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        if self._resetting:
            return  # the driver must wait for the status to read 0 first
        old = self.status
        if value & VIRTIO_CONFIG_S_FEATURES_OK and not old & VIRTIO_CONFIG_S_FEATURES_OK:
            features = self.driver_features
            legacy = not features >> VIRTIO_F_VERSION_1 & 1
            packed = bool(features >> VIRTIO_F_RING_PACKED & 1)
            if (
                features & ~self.device_features
                or (legacy and not self.legacy_allowed())
                or (packed and legacy)  # packed rings are VIRTIO 1.1's: no legacy layout
                or not self.validate_features(features)
            ):
                value &= ~VIRTIO_CONFIG_S_FEATURES_OK  # refused: the driver re-reads and sees it
            else:
                self.legacy = legacy
                if packed:
                    self._use_packed_queues()
        # NEEDS_RESET is the device's bit: keep it, never let the driver set it.
        value = (value & ~VIRTIO_CONFIG_S_NEEDS_RESET) | (old & VIRTIO_CONFIG_S_NEEDS_RESET)
        self.status = value
        if value & VIRTIO_CONFIG_S_FAILED:
            self.broken_reason = self.broken_reason or "driver set FAILED"
            return
        if value & VIRTIO_CONFIG_S_DRIVER_OK and not old & VIRTIO_CONFIG_S_DRIVER_OK:
            if not value & VIRTIO_CONFIG_S_FEATURES_OK:
                self.device_error("DRIVER_OK without FEATURES_OK")
                return
            event_idx = self.has_feature(VIRTIO_F_EVENT_IDX)
            indirect = self.has_feature(VIRTIO_F_INDIRECT_DESC)
            try:
                for queue in self.queues:
                    if queue.enabled:
                        queue.activate(event_idx=event_idx, indirect=indirect)
            except VirtqueueError as exc:
                self.device_error(str(exc))
                return
            self.on_driver_ok()
            for queue in self.queues:  # buffers made available before DRIVER_OK
                if queue.active and queue.has_available():
                    self.kick(queue.index)

    def legacy_allowed(self) -> bool:
        """Whether a driver without VIRTIO_F_VERSION_1 gets the legacy interface."""
        return self.transitional and sys.byteorder == "little"

    def reset(self) -> None:
        """Device reset: at once for the rings; the status reads 0 when the work in flight ended."""
        self.on_reset()
        self._resetting = True
        if not self.busy:
            self._finish_reset()

    def _finish_reset(self) -> None:
        self._resetting = False
        self._reset_state()
        self.stats.resets += 1
        waiters, self._reset_waiters = self._reset_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def reset_done(self) -> None:
        """Until a reset has completed (at once if none is pending)."""
        if not self._resetting:
            return
        waiter: asyncio.Future[None] = self._running.loop().create_future()
        self._reset_waiters.append(waiter)
        await waiter

    def kick(self, index: int) -> None:
        """A driver notification for queue ``index`` (spurious ones are harmless)."""
        self.stats.kicks += 1
        if not self.driver_ok or not 0 <= index < len(self.queues):
            self.stats.kicks_ignored += 1
            return
        queue = self.queues[index]
        if not queue.active:
            self.stats.kicks_ignored += 1
            return
        self.schedule(queue)

    def schedule(self, queue: DeviceVirtqueue) -> None:
        """Have :meth:`process_queue` look at ``queue`` in the loop's deferred work (once)."""
        if queue.index not in self._scheduled:
            self._scheduled.add(queue.index)
            self._running.work().defer(self._run_queue, queue)

    def _run_queue(self, queue: DeviceVirtqueue) -> None:
        self._scheduled.discard(queue.index)
        if not self.driver_ok or not queue.active:
            return
        try:
            self.process_queue(queue)
        except VirtqueueError as exc:
            self.device_error(str(exc))

    def interrupt_queue(self, queue: DeviceVirtqueue) -> None:
        """Publish the used index and raise the queue's interrupt if the driver wants one."""
        counts = self.stats.interrupts_by_vector.get(queue.msix_vector)
        if counts is None:
            counts = self.stats.interrupts_by_vector[queue.msix_vector] = [0, 0]
        if queue.publish():
            self.stats.interrupts_raised += 1
            counts[0] += 1
            if self.transport is not None:
                self.transport.queue_interrupt(queue)
        else:
            self.stats.interrupts_suppressed += 1
            counts[1] += 1

    def config_changed(self) -> None:
        """Configuration space changed (e.g. capacity): bump the generation and tell the driver."""
        self.config_generation = (self.config_generation + 1) & 0xFF
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK:
            self.stats.config_interrupts += 1
            if self.transport is not None:
                self.transport.config_interrupt()

    def device_error(self, reason: str) -> None:
        """The driver broke the rules: set DEVICE_NEEDS_RESET, notify once, stop processing."""
        if self.broken_reason is not None:
            return
        self.broken_reason = reason
        self.stats.needs_reset += 1
        log.error("virtio_device_needs_reset", device_id=self.device_id, reason=reason)
        if not self.legacy:  # legacy devices have no DEVICE_NEEDS_RESET: they just stop
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
        self.on_reset()
        for listener in self.error_listeners:
            listener(reason)
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK:
            self.stats.config_interrupts += 1
            if self.transport is not None:
                self.transport.config_interrupt()
