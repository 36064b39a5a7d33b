"""The guest kernel in miniature: one DMA allocator, a PCI scan, a driver per virtio-blk function,
and PCI Express native hot-plug for the root ports' slots.

Driver layer, entry point: the service hands it a platform and gets started VirtioBlk disks:
those on bus 0 from :meth:`Guest.probe`, hot-plugged ones from :attr:`Guest.hotplug`.
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
from driver.pciehp import HotplugTiming, Pciehp
from driver.virtio_pci import PciTransport


class Guest:
    """Owns the DMA allocator of ``platform``'s RAM and the drivers bound to its devices.

    ``disks`` are those bound on bus 0 by :meth:`probe`; ``hotplug`` drives the hot-plug slots
    (started by the first :meth:`probe`): ``await guest.hotplug.arrived(slot)`` is the disk
    bound after a card went into ``slot``, ``await guest.hotplug.removed(slot)`` returns once
    it is unbound and the slot powered off.
    """

    def __init__(self, platform: Platform, *, hotplug_timing: HotplugTiming | None = None) -> None:
        self.platform = platform
        self.dma = DmaAllocator(platform.memory)
        self.disks: list[VirtioBlk] = []
        self._bound: set[tuple[int, int, int]] = set()
        self.hotplug = Pciehp(platform, self.dma, timing=hotplug_timing)

    def find_blk_functions(self) -> list[pci.PciDeviceInfo]:
        return [
            info
            for info in pci.enumerate_bus(self.platform)
            if info.vendor_id == PCI_VENDOR_ID_REDHAT_QUMRANET
            and info.device_id == VIRTIO_PCI_MODERN_DEVICE_ID_BASE + VIRTIO_ID_BLOCK
        ]

    async def probe(self, **options: Any) -> list[VirtioBlk]:
        """Bind and start a VirtioBlk on every virtio-blk function of bus 0 not yet bound.

        The first call also starts hot-plug on the root ports' slots; the disks bound there get
        the same ``options`` unless ``hotplug.driver_options`` was set before.
        """
        started = []
        for info in self.find_blk_functions():
            if info.address in self._bound:
                continue
            disk = VirtioBlk(PciTransport(self.platform, info, VIRTIO_ID_BLOCK), self.dma, **options)
            await disk.start()
            disk.pci_address = info.address
            self._bound.add(disk.pci_address)
            self.disks.append(disk)
            started.append(disk)
        if not self.hotplug.started:
            if not self.hotplug.driver_options:
                self.hotplug.driver_options = dict(options)
            await self.hotplug.start()
        return started

    async def unbind(self, disk: VirtioBlk) -> None:
        """Let go of one disk (its device is about to be unplugged): reset and forget it."""
        if disk not in self.disks:
            return
        self.disks.remove(disk)
        self._bound.discard(disk.pci_address)
        await disk.close()

    async def close(self) -> None:
        await self.hotplug.close()
        for disk in self.disks:
            await disk.close()
        self.disks.clear()
        self._bound.clear()
        self.dma.close()
