"""The virtio-pci modern transport: a PCI function exposing a virtio device (VIRTIO 1.2 4.1).

Device layer, between the PCI bus and a :class:`device.virtio.VirtioDevice`. BAR 1 holds the
MSI-X table and PBA; BAR 4 holds the common, ISR, device-specific and notify structures.
"""

from __future__ import annotations

from typing import Final

from device.pci import Bar, MsixBar, PciFunction
from device.spec import pci
from device.spec import virtio_pci as vp
from device.spec.virtio import VIRTIO_MSI_NO_VECTOR
from device.virtio import VirtioDevice
from device.virtqueue import DeviceVirtqueue

MSIX_BAR: Final = 1
VIRTIO_BAR: Final = 4
COMMON_OFFSET: Final = 0x0000
ISR_OFFSET: Final = 0x1000
DEVICE_OFFSET: Final = 0x2000
NOTIFY_OFFSET: Final = 0x3000
NOTIFY_OFF_MULTIPLIER: Final = 4
REGION_SIZE: Final = 0x1000
MSIX_PBA_OFFSET: Final = 0x800


class VirtioPciFunction(PciFunction):
    """A modern (non-transitional) virtio PCI function in front of ``device``."""

    def __init__(self, device: VirtioDevice) -> None:
        super().__init__(
            vendor_id=vp.PCI_VENDOR_ID_REDHAT_QUMRANET,
            device_id=vp.VIRTIO_PCI_MODERN_DEVICE_ID_BASE + device.device_id,
            class_code=pci.PCI_CLASS_STORAGE_SCSI,
            revision=1,
            subsystem_vendor_id=vp.PCI_VENDOR_ID_REDHAT_QUMRANET,
            subsystem_id=vp.VIRTIO_PCI_SUBSYSTEM_ID,
        )
        self.device = device
        device.transport = self
        self.isr = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.msix_config = VIRTIO_MSI_NO_VECTOR
        self.queue_select = 0
        num_queues = len(device.queues)
        self.add_bar(MSIX_BAR, Bar(size=0x1000, region=MsixBar(self)))
        self.add_bar(VIRTIO_BAR, Bar(size=0x4000, region=_VirtioBar(self), is_64bit=True))
        notify_length = NOTIFY_OFF_MULTIPLIER * num_queues
        self._add_virtio_cap(vp.VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, REGION_SIZE)
        self._add_virtio_cap(
            vp.VIRTIO_PCI_CAP_NOTIFY_CFG,
            NOTIFY_OFFSET,
            notify_length,
            extra=NOTIFY_OFF_MULTIPLIER.to_bytes(4, "little"),
        )
        self._add_virtio_cap(vp.VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, REGION_SIZE)
        self._add_virtio_cap(vp.VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, REGION_SIZE)
        self.add_msix(num_queues + 1, MSIX_BAR, 0, MSIX_PBA_OFFSET)

    def _add_virtio_cap(self, cfg_type: int, offset: int, length: int, extra: bytes = b"") -> None:
        cap_len = vp.VIRTIO_PCI_CAP_LEN + len(extra)
        raw = vp.VIRTIO_PCI_CAP.pack(0, 0, cap_len, cfg_type, VIRTIO_BAR, 0, offset, length)
        self.add_capability(pci.PCI_CAP_ID_VNDR, raw[2:] + extra)

    # -- interrupts (Transport protocol) --------------------------------------------------

    def queue_interrupt(self, queue: DeviceVirtqueue) -> None:
        self.isr |= vp.VIRTIO_PCI_ISR_QUEUE
        if queue.msix_vector != VIRTIO_MSI_NO_VECTOR:
            self.msix_notify(queue.msix_vector)

    def config_interrupt(self) -> None:
        self.isr |= vp.VIRTIO_PCI_ISR_CONFIG
        if self.msix_config != VIRTIO_MSI_NO_VECTOR:
            self.msix_notify(self.msix_config)

    def power_off(self) -> None:
        """The card lost power: the virtio device resets (it starts no more work and drops the
        answers of work in flight) and the transport's registers return to their reset values."""
        super().power_off()
        self.device.reset()
        self.isr = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.msix_config = VIRTIO_MSI_NO_VECTOR
        self.queue_select = 0

    # -- common configuration ---------------------------------------------------------------

    def _selected(self) -> DeviceVirtqueue | None:
        if self.queue_select < len(self.device.queues):
            return self.device.queues[self.queue_select]
        return None

    def common_read(self, offset: int, size: int) -> int:
        device = self.device
        queue = self._selected()
        if offset == vp.VIRTIO_PCI_COMMON_DFSELECT:
            return self.device_feature_select
        if offset == vp.VIRTIO_PCI_COMMON_DF:
            if self.device_feature_select > 1:
                return 0
            return (device.device_features >> (32 * self.device_feature_select)) & 0xFFFFFFFF
        if offset == vp.VIRTIO_PCI_COMMON_GFSELECT:
            return self.driver_feature_select
        if offset == vp.VIRTIO_PCI_COMMON_GF:
            if self.driver_feature_select > 1:
                return 0
            return (device.driver_features >> (32 * self.driver_feature_select)) & 0xFFFFFFFF
        if offset == vp.VIRTIO_PCI_COMMON_MSIX:
            return self.msix_config
        if offset == vp.VIRTIO_PCI_COMMON_NUMQ:
            return len(device.queues)
        if offset == vp.VIRTIO_PCI_COMMON_STATUS:
            return device.status
        if offset == vp.VIRTIO_PCI_COMMON_CFGGENERATION:
            return device.config_generation
        if offset == vp.VIRTIO_PCI_COMMON_Q_SELECT:
            return self.queue_select
        if queue is None:
            return 0  # 4.1.4.3.1: queue_size reads 0 for a queue that does not exist
        if offset == vp.VIRTIO_PCI_COMMON_Q_SIZE:
            return queue.size
        if offset == vp.VIRTIO_PCI_COMMON_Q_MSIX:
            return queue.msix_vector
        if offset == vp.VIRTIO_PCI_COMMON_Q_ENABLE:
            return int(queue.enabled)
        if offset == vp.VIRTIO_PCI_COMMON_Q_NOFF:
            return queue.index
        addresses = {
            vp.VIRTIO_PCI_COMMON_Q_DESCLO: queue.desc_addr,
            vp.VIRTIO_PCI_COMMON_Q_AVAILLO: queue.driver_addr,
            vp.VIRTIO_PCI_COMMON_Q_USEDLO: queue.device_addr,
        }
        for low, value in addresses.items():
            if offset == low:
                return value & 0xFFFFFFFF
            if offset == low + 4:
                return value >> 32
        return 0

    def common_write(self, offset: int, size: int, value: int) -> None:
        device = self.device
        if offset == vp.VIRTIO_PCI_COMMON_DFSELECT:
            self.device_feature_select = value
        elif offset == vp.VIRTIO_PCI_COMMON_GFSELECT:
            self.driver_feature_select = value
        elif offset == vp.VIRTIO_PCI_COMMON_GF:
            device.set_driver_features(self.driver_feature_select, value)
        elif offset == vp.VIRTIO_PCI_COMMON_MSIX:
            self.msix_config = self._vector(value)
        elif offset == vp.VIRTIO_PCI_COMMON_STATUS:
            if value == 0:
                self.isr = 0
                self.msix_config = VIRTIO_MSI_NO_VECTOR
                self.queue_select = 0
                self.msix_reset()
            device.set_status(value)
        elif offset == vp.VIRTIO_PCI_COMMON_Q_SELECT:
            self.queue_select = value
        else:
            self._queue_write(offset, value)

    def _queue_write(self, offset: int, value: int) -> None:
        queue = self._selected()
        if queue is None or queue.active:
            return  # nonexistent queue, or configuration frozen after DRIVER_OK
        if offset == vp.VIRTIO_PCI_COMMON_Q_SIZE:
            queue.size = value
        elif offset == vp.VIRTIO_PCI_COMMON_Q_MSIX:
            queue.msix_vector = self._vector(value)
        elif offset == vp.VIRTIO_PCI_COMMON_Q_ENABLE:
            if value == 1:
                queue.enabled = True
        else:
            for low, attr in (
                (vp.VIRTIO_PCI_COMMON_Q_DESCLO, "desc_addr"),
                (vp.VIRTIO_PCI_COMMON_Q_AVAILLO, "driver_addr"),
                (vp.VIRTIO_PCI_COMMON_Q_USEDLO, "device_addr"),
            ):
                old = int(getattr(queue, attr))
                if offset == low:
                    setattr(queue, attr, (old & ~0xFFFFFFFF) | value)
                elif offset == low + 4:
                    setattr(queue, attr, (old & 0xFFFFFFFF) | (value << 32))

    def _vector(self, value: int) -> int:
        """A vector the device accepts, or NO_VECTOR (which the driver reads back as refusal)."""
        return value if value < self.msix_entries else VIRTIO_MSI_NO_VECTOR

    # -- ISR and notify -------------------------------------------------------------------------

    def isr_read(self) -> int:
        value = self.isr
        self.isr = 0  # read to clear
        return value

    def notify_write(self, offset: int, value: int) -> None:
        index = offset // NOTIFY_OFF_MULTIPLIER
        if index == value:
            self.device.kick(value)
        else:
            self.device.stats.kicks_ignored += 1


class _VirtioBar:
    """BAR 4: decodes offsets into the four virtio structures."""

    def __init__(self, function: VirtioPciFunction) -> None:
        self._function = function

    def mmio_read(self, offset: int, size: int) -> int:
        function = self._function
        if offset < COMMON_OFFSET + REGION_SIZE:
            if offset + size > vp.VIRTIO_PCI_COMMON_CFG_SIZE:
                return 0
            return function.common_read(offset, size) & ((1 << (8 * size)) - 1)
        if offset < ISR_OFFSET + REGION_SIZE:
            return function.isr_read() if offset == ISR_OFFSET else 0
        if offset < DEVICE_OFFSET + REGION_SIZE:
            return function.device.read_config(offset - DEVICE_OFFSET, size)
        return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        function = self._function
        if offset < COMMON_OFFSET + REGION_SIZE:
            if offset + size <= vp.VIRTIO_PCI_COMMON_CFG_SIZE:
                function.common_write(offset, size, value)
        elif offset < ISR_OFFSET + REGION_SIZE:
            pass  # ISR is read-only
        elif offset < DEVICE_OFFSET + REGION_SIZE:
            function.device.write_config(offset - DEVICE_OFFSET, size, value)
        else:
            function.notify_write(offset - NOTIFY_OFFSET, value)
