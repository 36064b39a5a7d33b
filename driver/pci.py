"""PCI enumeration the way a kernel does it: configuration-space reads only.

Driver layer, bottom. Scans bus 0 or a bridge's secondary bus, sizes BARs (six in a type-0
header, two in a bridge's), walks capability lists, assigns BARs inside a bridge's window and
enables memory decoding and bus mastering; :func:`dump_config` prints what the article's
``pci_dump_config`` printed.
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
    header_type: int = pci.PCI_HEADER_TYPE_NORMAL  # without the multi-function bit
    bus: int = 0

    @property
    def name(self) -> str:
        return f"{self.bus}:{self.device}.{self.function}"

    @property
    def address(self) -> tuple[int, int, int]:
        """(bus, device, function)."""
        return (self.bus, self.device, self.function)

    def capability(self, cap_id: int) -> int:
        """The offset of the first capability ``cap_id``, 0 if it has none."""
        for offset, found in self.capabilities:
            if found == cap_id:
                return offset
        return 0


class PciConfig:
    """Configuration-space accessors for one function."""

    def __init__(self, platform: Platform, device: int, function: int, bus: int = 0) -> None:
        self.platform = platform
        self.device = device
        self.function = function
        self.bus = bus

    def read(self, offset: int, size: int) -> int:
        return self.platform.pci_config_read(self.device, self.function, offset, size, self.bus)

    def write(self, offset: int, size: int, value: int) -> None:
        self.platform.pci_config_write(self.device, self.function, offset, size, value, self.bus)


def config_of(platform: Platform, info: PciDeviceInfo) -> PciConfig:
    return PciConfig(platform, info.device, info.function, info.bus)


def _size_bars(cfg: PciConfig, count: int) -> dict[int, tuple[int, int]]:
    bars: dict[int, tuple[int, int]] = {}
    command = cfg.read(pci.PCI_COMMAND, 2)
    cfg.write(pci.PCI_COMMAND, 2, command & ~pci.PCI_COMMAND_MEMORY)  # no decoding while sizing
    index = 0
    while index < count:
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


def probe(platform: Platform, device: int, function: int = 0, bus: int = 0) -> PciDeviceInfo | None:
    """Read one function's identity, BARs and capabilities; None for an empty slot."""
    cfg = PciConfig(platform, device, function, bus)
    vendor = cfg.read(pci.PCI_VENDOR_ID, 2)
    if vendor == pci.PCI_VENDOR_ID_INVALID:
        return None
    header_type = cfg.read(pci.PCI_HEADER_TYPE, 1) & pci.PCI_HEADER_TYPE_MASK
    bridge = header_type == pci.PCI_HEADER_TYPE_BRIDGE
    bar_count = pci.PCI_BRIDGE_NUM_BARS if bridge else pci.PCI_NUM_BARS
    return PciDeviceInfo(
        device=device,
        function=function,
        vendor_id=vendor,
        device_id=cfg.read(pci.PCI_DEVICE_ID, 2),
        class_code=cfg.read(pci.PCI_CLASS_DEVICE, 2),
        revision=cfg.read(pci.PCI_REVISION_ID, 1),
        subsystem_vendor_id=0 if bridge else cfg.read(pci.PCI_SUBSYSTEM_VENDOR_ID, 2),
        subsystem_id=0 if bridge else cfg.read(pci.PCI_SUBSYSTEM_ID, 2),
        bars=_size_bars(cfg, bar_count),
        capabilities=_capabilities(cfg),
        header_type=header_type,
        bus=bus,
    )


def probe_slot(platform: Platform, device: int, bus: int = 0) -> list[PciDeviceInfo]:
    """The functions of one device: function 0, and 1-7 if it is a multi-function device."""
    first = probe(platform, device, 0, bus)
    if first is None:
        return []
    found = [first]
    if platform.pci_config_read(device, 0, pci.PCI_HEADER_TYPE, 1, bus) & pci.PCI_HEADER_TYPE_MFD:
        for function in range(1, 8):
            extra = probe(platform, device, function, bus)
            if extra is not None:
                found.append(extra)
    return found


def enumerate_bus(platform: Platform, bus: int = 0) -> list[PciDeviceInfo]:
    """Every function on ``bus``, in slot order."""
    found = []
    for device in range(32):
        found.extend(probe_slot(platform, device, bus))
    return found


def assign_bars(platform: Platform, info: PciDeviceInfo, base: int, limit: int) -> bool:
    """Give every memory BAR of ``info`` an address inside ``[base, limit]`` (a bridge's window),
    each naturally aligned, largest first (``pci_assign_unassigned_bridge_resources``).

    Decoding is off while the BARs move. Returns False, having assigned nothing, if they do not fit.
    """
    placed: dict[int, int] = {}
    cursor = base
    for index, (_address, size) in sorted(info.bars.items(), key=lambda item: (-item[1][1], item[0])):
        if size <= 0 or size & (size - 1):
            return False
        address = (cursor + size - 1) & ~(size - 1)
        if address + size - 1 > limit:
            return False
        placed[index] = address
        cursor = address + size
    cfg = config_of(platform, info)
    command = cfg.read(pci.PCI_COMMAND, 2)
    cfg.write(pci.PCI_COMMAND, 2, command & ~pci.PCI_COMMAND_MEMORY)
    for index, address in placed.items():
        reg = pci.PCI_BASE_ADDRESS_0 + 4 * index
        low = cfg.read(reg, 4)
        cfg.write(reg, 4, (address & 0xFFFFFFF0) | (low & 0xF))
        if low & pci.PCI_BASE_ADDRESS_MEM_TYPE_64:
            cfg.write(reg + 4, 4, address >> 32)
        info.bars[index] = (address, info.bars[index][1])
    cfg.write(pci.PCI_COMMAND, 2, command)
    return True


def enable(platform: Platform, info: PciDeviceInfo) -> None:
    """Turn on memory decoding and bus mastering (``pci_enable_device`` + ``pci_set_master``)."""
    cfg = config_of(platform, info)
    command = cfg.read(pci.PCI_COMMAND, 2)
    cfg.write(
        pci.PCI_COMMAND,
        2,
        command | pci.PCI_COMMAND_MEMORY | pci.PCI_COMMAND_MASTER | pci.PCI_COMMAND_INTX_DISABLE,
    )


def disable(platform: Platform, info: PciDeviceInfo) -> None:
    """Turn off memory decoding and bus mastering (``pci_disable_device``)."""
    cfg = config_of(platform, info)
    command = cfg.read(pci.PCI_COMMAND, 2)
    cfg.write(pci.PCI_COMMAND, 2, command & ~(pci.PCI_COMMAND_MEMORY | pci.PCI_COMMAND_MASTER))


def present(platform: Platform, info: PciDeviceInfo) -> bool:
    """Whether the function still answers configuration reads (``pci_device_is_present``)."""
    return config_of(platform, info).read(pci.PCI_VENDOR_ID, 2) != pci.PCI_VENDOR_ID_INVALID


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
