"""The guest kernel in miniature: one DMA allocator, a PCI scan, a driver per virtio-blk function.

Driver layer, entry point: the service hands it a platform and gets started VirtioBlk disks.
"""

from __future__ import annotations

from typing import Any

from device.platform import Platform
from device.spec.virtio_pci import (
    PCI_VENDOR_ID_REDHAT_QUMRANET,
    VIRTIO_ID_BLOCK,
    VIRTIO_PCI_MODERN_DEVICE_ID_BASE,
)
from driver import pci
from driver.blk import VirtioBlk
from driver.dma import DmaAllocator
from driver.virtio_pci import PciTransport


class Guest:
    """Owns the DMA allocator of ``platform``'s RAM and the drivers bound to its devices."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.dma = DmaAllocator(platform.memory)
        self.disks: list[VirtioBlk] = []
        self._bound: set[tuple[int, int]] = set()

    def find_blk_functions(self) -> list[pci.PciDeviceInfo]:
        return [
            info
            for info in pci.enumerate_bus(self.platform)
            if info.vendor_id == PCI_VENDOR_ID_REDHAT_QUMRANET
            and info.device_id == VIRTIO_PCI_MODERN_DEVICE_ID_BASE + VIRTIO_ID_BLOCK
        ]

    async def probe(self, **options: Any) -> list[VirtioBlk]:
        """Bind and start a VirtioBlk on every virtio-blk function not yet bound."""
        started = []
        for info in self.find_blk_functions():
            if (info.device, info.function) in self._bound:
                continue
            disk = VirtioBlk(PciTransport(self.platform, info, VIRTIO_ID_BLOCK), self.dma, **options)
            await disk.start()
            disk.pci_address = (info.device, info.function)
            self._bound.add(disk.pci_address)
            self.disks.append(disk)
            started.append(disk)
        return started

    async def unbind(self, disk: VirtioBlk) -> None:
        """Let go of one disk (its device is about to be unplugged): reset and forget it."""
        if disk not in self.disks:
            return
        self.disks.remove(disk)
        self._bound.discard(disk.pci_address)
        await disk.close()

    async def close(self) -> None:
        for disk in self.disks:
            await disk.close()
        self.disks.clear()
        self._bound.clear()
        self.dma.close()
