"""The virtio-pci modern transport, driver side (VIRTIO 1.2 4.1): capabilities, status, queues.

Driver layer, between PCI enumeration (:mod:`driver.pci`) and the device drivers. Finds the
COMMON/NOTIFY/ISR/DEVICE structures through vendor capabilities and programs MSI-X vectors.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Final

import structlog

from device.platform import InterruptHandler, Platform
from device.spec import pci
from device.spec import virtio_pci as vp
from device.spec.virtio import VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_MSI_NO_VECTOR
from driver import pci as pci_bus
from driver.pci import PciConfig, PciDeviceInfo
from driver.transport import TransportError

# A reset completes when the device's requests in flight have ended: at once for a file, up to
# the storage's own timeout for a remote one (RBD's is 30 s by default).
RESET_TIMEOUT: Final = 120.0
RESET_POLL_FIRST: Final = 0.0005
RESET_POLL_MAX: Final = 0.05

__all__ = ["NO_VECTOR", "PciTransport", "TransportError", "VirtioPciTransport"]

log = structlog.get_logger("vblk.driver.virtio_pci")


@dataclasses.dataclass(slots=True)
class _Window:
    address: int
    length: int


class VirtioPciTransport:
    """Register access to one modern virtio-pci function."""

    def __init__(self, platform: Platform, info: PciDeviceInfo) -> None:
        self.platform = platform
        self.info = info
        self.cfg = PciConfig(platform, info.device, info.function, info.bus)
        windows: dict[int, _Window] = {}
        self.notify_off_multiplier = 0
        self._msix_cap = 0
        for offset, cap_id in info.capabilities:
            if cap_id == pci.PCI_CAP_ID_MSIX:
                self._msix_cap = offset
            if cap_id != pci.PCI_CAP_ID_VNDR:
                continue
            cfg_type = self.cfg.read(offset + vp.VIRTIO_PCI_CAP_CFG_TYPE, 1)
            if cfg_type in windows or cfg_type == vp.VIRTIO_PCI_CAP_PCI_CFG:
                continue  # the first capability of each type is the preferred one
            bar = self.cfg.read(offset + vp.VIRTIO_PCI_CAP_BAR, 1)
            if bar not in info.bars:
                continue
            cap_offset = self.cfg.read(offset + vp.VIRTIO_PCI_CAP_OFFSET, 4)
            length = self.cfg.read(offset + vp.VIRTIO_PCI_CAP_LENGTH, 4)
            bar_address, bar_size = info.bars[bar]
            if cap_offset + length > bar_size:
                continue
            windows[cfg_type] = _Window(bar_address + cap_offset, length)
            if cfg_type == vp.VIRTIO_PCI_CAP_NOTIFY_CFG:
                self.notify_off_multiplier = self.cfg.read(offset + vp.VIRTIO_PCI_NOTIFY_CAP_MULT, 4)
        for needed in (
            vp.VIRTIO_PCI_CAP_COMMON_CFG,
            vp.VIRTIO_PCI_CAP_NOTIFY_CFG,
            vp.VIRTIO_PCI_CAP_ISR_CFG,
        ):
            if needed not in windows:
                raise TransportError(f"{info.name}: no virtio capability of type {needed}")
        if not self._msix_cap:
            raise TransportError(f"{info.name}: no MSI-X capability")
        self.common = windows[vp.VIRTIO_PCI_CAP_COMMON_CFG].address
        self.notify_window = windows[vp.VIRTIO_PCI_CAP_NOTIFY_CFG]
        self.isr_address = windows[vp.VIRTIO_PCI_CAP_ISR_CFG].address
        device_window = windows.get(vp.VIRTIO_PCI_CAP_DEVICE_CFG)
        self.device_cfg = device_window.address if device_window else 0
        self.device_cfg_length = device_window.length if device_window else 0
        control = self.cfg.read(self._msix_cap + pci.PCI_MSIX_FLAGS, 2)
        self.msix_table_size = (control & pci.PCI_MSIX_FLAGS_QSIZE) + 1
        table = self.cfg.read(self._msix_cap + pci.PCI_MSIX_TABLE, 4)
        table_bar = table & pci.PCI_MSIX_BIR_MASK
        if table_bar not in info.bars:
            raise TransportError(f"{info.name}: MSI-X table in a missing BAR")
        self.msix_table = info.bars[table_bar][0] + (table & ~pci.PCI_MSIX_BIR_MASK)
        self._vectors: dict[int, int] = {}  # MSI-X entry -> interrupt controller data

    # -- common configuration -------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        return self.platform.mmio_read(self.common + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.platform.mmio_write(self.common + offset, size, value)

    @property
    def status(self) -> int:
        return self.read(vp.VIRTIO_PCI_COMMON_STATUS, 1)

    def add_status(self, bits: int) -> None:
        self.write(vp.VIRTIO_PCI_COMMON_STATUS, 1, self.status | bits)

    async def reset(self, timeout: float = RESET_TIMEOUT) -> None:
        """Write 0 and wait until the device reads back 0 (4.1.4.3.2), without blocking the loop:
        a device whose storage still has requests in flight completes its reset when they end."""
        self.write(vp.VIRTIO_PCI_COMMON_STATUS, 1, 0)
        if self.status == 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = RESET_POLL_FIRST
        while self.status != 0:
            if not pci_bus.present(self.platform, self.info):
                # Surprise removal: the function is gone, and with it all it could touch.
                log.info("virtio_pci_device_gone", device=self.info.name)
                return
            if loop.time() > deadline:
                raise TransportError(f"{self.info.name}: device did not complete reset in {timeout:g} s")
            await asyncio.sleep(delay)
            delay = min(2 * delay, RESET_POLL_MAX)

    def device_features(self) -> int:
        features = 0
        for select in (0, 1):
            self.write(vp.VIRTIO_PCI_COMMON_DFSELECT, 4, select)
            features |= self.read(vp.VIRTIO_PCI_COMMON_DF, 4) << (32 * select)
        return features

    def set_driver_features(self, features: int) -> None:
        for select in (0, 1):
            self.write(vp.VIRTIO_PCI_COMMON_GFSELECT, 4, select)
            self.write(vp.VIRTIO_PCI_COMMON_GF, 4, (features >> (32 * select)) & 0xFFFFFFFF)

    def features_ok(self) -> bool:
        """Set FEATURES_OK and re-read it: False means the device refused the feature set."""
        self.add_status(VIRTIO_CONFIG_S_FEATURES_OK)
        return bool(self.status & VIRTIO_CONFIG_S_FEATURES_OK)

    @property
    def num_queues(self) -> int:
        return self.read(vp.VIRTIO_PCI_COMMON_NUMQ, 2)

    @property
    def config_generation(self) -> int:
        return self.read(vp.VIRTIO_PCI_COMMON_CFGGENERATION, 1)

    def queue_max_size(self, index: int) -> int:
        self.write(vp.VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
        return self.read(vp.VIRTIO_PCI_COMMON_Q_SIZE, 2)

    def setup_queue(self, index: int, size: int, desc: int, driver: int, device: int, vector: int) -> int:
        """Program queue ``index``; returns its notify address. Raises if the vector is refused."""
        self.write(vp.VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
        self.write(vp.VIRTIO_PCI_COMMON_Q_SIZE, 2, size)
        for low, address in (
            (vp.VIRTIO_PCI_COMMON_Q_DESCLO, desc),
            (vp.VIRTIO_PCI_COMMON_Q_AVAILLO, driver),
            (vp.VIRTIO_PCI_COMMON_Q_USEDLO, device),
        ):
            self.write(low, 4, address & 0xFFFFFFFF)
            self.write(low + 4, 4, address >> 32)
        self.write(vp.VIRTIO_PCI_COMMON_Q_MSIX, 2, vector)
        if self.read(vp.VIRTIO_PCI_COMMON_Q_MSIX, 2) != vector:
            raise TransportError(f"{self.info.name}: queue {index} refused MSI-X vector {vector}")
        notify_off = self.read(vp.VIRTIO_PCI_COMMON_Q_NOFF, 2)
        offset = notify_off * self.notify_off_multiplier
        if offset + 2 > self.notify_window.length:
            raise TransportError(f"{self.info.name}: notify offset of queue {index} out of its window")
        self.write(vp.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)
        return self.notify_window.address + offset

    def set_config_vector(self, vector: int) -> None:
        self.write(vp.VIRTIO_PCI_COMMON_MSIX, 2, vector)
        if self.read(vp.VIRTIO_PCI_COMMON_MSIX, 2) != vector:
            raise TransportError(f"{self.info.name}: config MSI-X vector {vector} refused")

    def notify(self, address: int, index: int) -> None:
        self.platform.mmio_write(address, 2, index)

    def read_isr(self) -> int:
        return self.platform.mmio_read(self.isr_address, 1)

    # -- device-specific configuration ------------------------------------------------------

    def read_device_config(self, length: int) -> bytes:
        """The first ``length`` bytes of device config, consistent per config_generation."""
        if length > self.device_cfg_length:
            raise TransportError(f"{self.info.name}: device config shorter than {length}")
        for _ in range(100):
            before = self.config_generation
            raw = bytearray()
            offset = 0
            while offset < length:
                size = 4 if length - offset >= 4 else 1
                value = self.platform.mmio_read(self.device_cfg + offset, size)
                raw += value.to_bytes(size, "little")
                offset += size
            if self.config_generation == before:
                return bytes(raw)
        raise TransportError(f"{self.info.name}: config generation never settled")

    def write_device_config(self, offset: int, size: int, value: int) -> None:
        self.platform.mmio_write(self.device_cfg + offset, size, value)

    # -- MSI-X --------------------------------------------------------------------------------

    def msix_enable(self) -> None:
        control = self.cfg.read(self._msix_cap + pci.PCI_MSIX_FLAGS, 2)
        control = (control | pci.PCI_MSIX_FLAGS_ENABLE) & ~pci.PCI_MSIX_FLAGS_MASKALL
        self.cfg.write(self._msix_cap + pci.PCI_MSIX_FLAGS, 2, control)

    def msix_disable(self) -> None:
        control = self.cfg.read(self._msix_cap + pci.PCI_MSIX_FLAGS, 2)
        self.cfg.write(self._msix_cap + pci.PCI_MSIX_FLAGS, 2, control & ~pci.PCI_MSIX_FLAGS_ENABLE)

    def request_vector(self, entry: int, handler: InterruptHandler) -> int:
        """Route MSI-X table ``entry`` to ``handler`` and unmask it; returns ``entry``."""
        if not 0 <= entry < self.msix_table_size:
            raise TransportError(f"{self.info.name}: MSI-X entry {entry} beyond the table")
        address, data = self.platform.interrupts.allocate_vector(handler)
        base = self.msix_table + entry * pci.PCI_MSIX_ENTRY_SIZE
        mmio_write = self.platform.mmio_write
        mmio_write(base + pci.PCI_MSIX_ENTRY_LOWER_ADDR, 4, address & 0xFFFFFFFF)
        mmio_write(base + pci.PCI_MSIX_ENTRY_UPPER_ADDR, 4, address >> 32)
        mmio_write(base + pci.PCI_MSIX_ENTRY_DATA, 4, data)
        mmio_write(base + pci.PCI_MSIX_ENTRY_VECTOR_CTRL, 4, 0)
        self._vectors[entry] = data
        return entry

    def free_vectors(self) -> None:
        for entry, data in self._vectors.items():
            base = self.msix_table + entry * pci.PCI_MSIX_ENTRY_SIZE
            self.platform.mmio_write(
                base + pci.PCI_MSIX_ENTRY_VECTOR_CTRL, 4, pci.PCI_MSIX_ENTRY_CTRL_MASKBIT
            )
            self.platform.interrupts.free_vector(data)
        self._vectors.clear()


NO_VECTOR: Final = VIRTIO_MSI_NO_VECTOR


class PciTransport:
    """:class:`driver.transport.VirtioTransport` over a modern virtio-pci function.

    MSI-X entry 0 is the configuration interrupt, entry ``n + 1`` queue ``n``'s.
    """

    shared_with_other_cpus = False  # the device model runs on this event loop

    def __init__(self, platform: Platform, info: PciDeviceInfo, device_id: int) -> None:
        if info.vendor_id != vp.PCI_VENDOR_ID_REDHAT_QUMRANET or info.device_id != (
            vp.VIRTIO_PCI_MODERN_DEVICE_ID_BASE + device_id
        ):
            raise TransportError(f"{info.name} is not a modern virtio function of device type {device_id}")
        self.platform = platform
        self.info = info
        self._regs: VirtioPciTransport | None = None

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def regs(self) -> VirtioPciTransport:
        if self._regs is None:
            raise TransportError(f"{self.name}: transport not open")
        return self._regs

    async def open(self) -> None:
        pci_bus.enable(self.platform, self.info)
        for line in pci_bus.dump_config(self.info):
            log.debug("pci_config", line=line)
        self._regs = VirtioPciTransport(self.platform, self.info)

    async def reset(self) -> None:
        await self.regs.reset()

    async def reconnect(self) -> None:
        """A PCI function does not go away."""

    @property
    def status(self) -> int:
        return self.regs.status

    def add_status(self, bits: int) -> None:
        self.regs.add_status(bits)

    def device_features(self) -> int:
        return self.regs.device_features()

    def set_driver_features(self, features: int) -> None:
        self.regs.set_driver_features(features)

    def features_ok(self) -> bool:
        return self.regs.features_ok()

    def read_device_config(self, length: int) -> bytes:
        return self.regs.read_device_config(length)

    def write_device_config(self, offset: int, size: int, value: int) -> None:
        self.regs.write_device_config(offset, size, value)

    def enable_config_interrupt(self, handler: InterruptHandler) -> None:
        regs = self.regs
        regs.msix_enable()
        regs.request_vector(0, handler)
        regs.set_config_vector(0)

    def queue_max_size(self, index: int) -> int:
        return self.regs.queue_max_size(index)

    def setup_queue(
        self, index: int, size: int, desc: int, avail: int, used: int, handler: InterruptHandler
    ) -> Callable[[], None]:
        regs = self.regs
        vector = regs.request_vector(index + 1, handler)
        address = regs.setup_queue(index, size, desc, avail, used, vector)

        def notify() -> None:
            regs.notify(address, index)

        return notify

    def release_interrupts(self) -> None:
        if self._regs is not None:
            self._regs.free_vectors()
            self._regs.msix_disable()

    def close(self) -> None:
        pass
