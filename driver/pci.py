"""PCI enumeration the way a kernel does it: configuration-space reads only.

Driver layer, bottom. Scans bus 0, sizes BARs, walks capability lists and enables memory
decoding and bus mastering; :func:`dump_config` prints what the article's ``pci_dump_config``
printed.
"""

from __future__ import annotations

import dataclasses

from device.platform import Platform
from device.spec import pci


@dataclasses.dataclass(slots=True)
class PciDeviceInfo:
    """One function found on the bus."""

    device: int
    function: int
    vendor_id: int
    device_id: int
    class_code: int
    revision: int
    subsystem_vendor_id: int
    subsystem_id: int
    bars: dict[int, tuple[int, int]]  # index -> (address, size)
    capabilities: list[tuple[int, int]]  # (config offset, capability id)

    @property
    def name(self) -> str:
        return f"0:{self.device}.{self.function}"


class PciConfig:
    """Configuration-space accessors for one function."""

    def __init__(self, platform: Platform, device: int, function: int) -> None:
        self.platform = platform
        self.device = device
        self.function = function

    def read(self, offset: int, size: int) -> int:
        return self.platform.pci_config_read(self.device, self.function, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.platform.pci_config_write(self.device, self.function, offset, size, value)


def _size_bars(cfg: PciConfig) -> dict[int, tuple[int, int]]:
    bars: dict[int, tuple[int, int]] = {}
    command = cfg.read(pci.PCI_COMMAND, 2)
    cfg.write(pci.PCI_COMMAND, 2, command & ~pci.PCI_COMMAND_MEMORY)  # no decoding while sizing
    index = 0
    while index < pci.PCI_NUM_BARS:
        reg = pci.PCI_BASE_ADDRESS_0 + 4 * index
        low = cfg.read(reg, 4)
        if low & pci.PCI_BASE_ADDRESS_SPACE_IO:
            index += 1
            continue
        is_64 = bool(low & pci.PCI_BASE_ADDRESS_MEM_TYPE_64)
        cfg.write(reg, 4, 0xFFFFFFFF)
        mask = cfg.read(reg, 4) & 0xFFFFFFF0
        cfg.write(reg, 4, low)
        address = low & 0xFFFFFFF0
        if is_64:
            high = cfg.read(reg + 4, 4)
            cfg.write(reg + 4, 4, 0xFFFFFFFF)
            mask_high = cfg.read(reg + 4, 4)
            cfg.write(reg + 4, 4, high)
            address |= high << 32
            mask |= mask_high << 32
            size = (~mask & 0xFFFFFFFFFFFFFFFF) + 1
        else:
            size = (~mask & 0xFFFFFFFF) + 1
        if mask:
            bars[index] = (address, size)
        index += 2 if is_64 else 1
    cfg.write(pci.PCI_COMMAND, 2, command)
    return bars


def _capabilities(cfg: PciConfig) -> list[tuple[int, int]]:
    caps: list[tuple[int, int]] = []
    if not cfg.read(pci.PCI_STATUS, 2) & pci.PCI_STATUS_CAP_LIST:
        return caps
    offset = cfg.read(pci.PCI_CAPABILITY_LIST, 1) & ~3
    seen: set[int] = set()
    while offset and offset not in seen and offset >= 0x40:  # a looping list ends here
        seen.add(offset)
        caps.append((offset, cfg.read(offset, 1)))
        offset = cfg.read(offset + 1, 1) & ~3
    return caps


def probe(platform: Platform, device: int, function: int = 0) -> PciDeviceInfo | None:
    """Read one function's identity, BARs and capabilities; None for an empty slot."""
    cfg = PciConfig(platform, device, function)
    vendor = cfg.read(pci.PCI_VENDOR_ID, 2)
    if vendor == pci.PCI_VENDOR_ID_INVALID:
        return None
    return PciDeviceInfo(
        device=device,
        function=function,
        vendor_id=vendor,
        device_id=cfg.read(pci.PCI_DEVICE_ID, 2),
        class_code=cfg.read(pci.PCI_CLASS_DEVICE, 2),
        revision=cfg.read(pci.PCI_REVISION_ID, 1),
        subsystem_vendor_id=cfg.read(pci.PCI_SUBSYSTEM_VENDOR_ID, 2),
        subsystem_id=cfg.read(pci.PCI_SUBSYSTEM_ID, 2),
        bars=_size_bars(cfg),
        capabilities=_capabilities(cfg),
    )


def enumerate_bus(platform: Platform) -> list[PciDeviceInfo]:
    """Every function on bus 0, in slot order."""
    found = []
    for device in range(32):
        info = probe(platform, device)
        if info is None:
            continue
        found.append(info)
        multifunction = platform.pci_config_read(device, 0, pci.PCI_HEADER_TYPE, 1) & 0x80
        if multifunction:
            for function in range(1, 8):
                extra = probe(platform, device, function)
                if extra is not None:
                    found.append(extra)
    return found


def enable(platform: Platform, info: PciDeviceInfo) -> None:
    """Turn on memory decoding and bus mastering (``pci_enable_device`` + ``pci_set_master``)."""
    cfg = PciConfig(platform, info.device, info.function)
    command = cfg.read(pci.PCI_COMMAND, 2)
    cfg.write(
        pci.PCI_COMMAND,
        2,
        command | pci.PCI_COMMAND_MEMORY | pci.PCI_COMMAND_MASTER | pci.PCI_COMMAND_INTX_DISABLE,
    )


def dump_config(info: PciDeviceInfo) -> list[str]:
    """Human-readable lines describing a function, like the article's ``pci_dump_config``."""
    lines = [
        f"[{info.name}] vid:id = {info.vendor_id:04x}:{info.device_id:04x} "
        f"class {info.class_code:04x} rev {info.revision} "
        f"subsys {info.subsystem_vendor_id:04x}:{info.subsystem_id:04x}"
    ]
    for index, (address, size) in sorted(info.bars.items()):
        lines.append(f"  BAR{index}: {address:#x} size {size:#x}")
    for offset, cap_id in info.capabilities:
        lines.append(f"  cap @{offset:#04x}: id {cap_id:#04x}")
    return lines
