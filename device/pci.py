"""A PCI bus and PCI functions: configuration space, BARs, capabilities and MSI-X.

Device layer, below the virtio-pci transport (:mod:`device.virtio_pci`) and the PCI Express
root port (:mod:`device.pcie_port`). Configuration space honours read-only, writable and
write-1-to-clear bits and BAR sizing; MSI-X table and PBA live in a memory BAR.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

from device.spec import pci

MsiSink = Callable[[int, int], None]  # (address, data): a memory write that raises an MSI


class MmioRegion(Protocol):
    """The registers behind one BAR."""

    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, size: int, value: int) -> None: ...


@dataclasses.dataclass(slots=True)
class Bar:
    """One memory BAR: its size (a power of two), whether it is 64-bit, and its registers."""

    size: int
    region: MmioRegion
    is_64bit: bool = False
    address: int = 0


class PciFunction:
    """A type-0 PCI function with a 256-byte configuration space."""

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int,
        subsystem_vendor_id: int,
        subsystem_id: int,
    ) -> None:
        self.config = bytearray(pci.PCI_CONFIG_SPACE_SIZE)
        self._wmask = bytearray(pci.PCI_CONFIG_SPACE_SIZE)  # 1 bits are driver-writable
        self._w1cmask = bytearray(pci.PCI_CONFIG_SPACE_SIZE)  # 1 bits are cleared by writing 1
        #: Called after every configuration write with (offset, size, value written): the
        #: registers with side effects of a function that composes this one (a bridge's slot).
        self.config_write_hook: Callable[[int, int, int], None] | None = None
        self.bars: dict[int, Bar] = {}
        self._bar_sizing: set[int] = set()
        self._cap_tail = 0  # offset of the last capability's "next" byte, 0 when none
        self._cap_free = 0x40
        self._put(pci.PCI_VENDOR_ID, 2, vendor_id)
        self._put(pci.PCI_DEVICE_ID, 2, device_id)
        self._put(pci.PCI_REVISION_ID, 1, revision)
        self._put(pci.PCI_CLASS_PROG, 1, 0)
        self._put(pci.PCI_CLASS_DEVICE, 2, class_code)
        self._put(pci.PCI_HEADER_TYPE, 1, 0)
        self._put(pci.PCI_SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._put(pci.PCI_SUBSYSTEM_ID, 2, subsystem_id)
        self._put(pci.PCI_INTERRUPT_PIN, 1, 1)
        self._writable(
            pci.PCI_COMMAND,
            2,
            pci.PCI_COMMAND_MEMORY | pci.PCI_COMMAND_MASTER | pci.PCI_COMMAND_INTX_DISABLE,
        )
        self._writable(pci.PCI_INTERRUPT_LINE, 1, 0xFF)
        # MSI-X state (set up by add_msix).
        self.msix_entries = 0
        self._msix_cap = 0
        self._msix_table: bytearray = bytearray()
        self._msix_pending: list[bool] = []
        # Per vector, the (address, data) an interrupt sends now, or None if it cannot be sent
        # straight away (MSI-X off, masked, no bus mastering): decoded once, not per interrupt.
        # None as a whole until decoded again after a write that may change it.
        self._msix_routes: list[tuple[int, int] | None] | None = None
        self.msi_sink: MsiSink | None = None

    # -- configuration space helpers -------------------------------------------------------

    def _put(self, offset: int, size: int, value: int) -> None:
        self.config[offset : offset + size] = value.to_bytes(size, "little")

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset : offset + size], "little")

    def _writable(self, offset: int, size: int, mask: int) -> None:
        self._wmask[offset : offset + size] = mask.to_bytes(size, "little")

    def init_register(
        self, offset: int, size: int, value: int, *, writable: int = 0, write1_to_clear: int = 0
    ) -> None:
        """Set a register's power-on value and which of its bits software may write or clear
        (QEMU's wmask and w1cmask); bits in neither are read-only."""
        self._put(offset, size, value)
        self._writable(offset, size, writable)
        self._w1cmask[offset : offset + size] = write1_to_clear.to_bytes(size, "little")

    def get_register(self, offset: int, size: int) -> int:
        """A register's current value, as the hardware sees it."""
        return self._get(offset, size)

    def put_register(self, offset: int, size: int, value: int) -> None:
        """Hardware updates a register (a status bit it sets), whatever its write masks."""
        self._put(offset, size, value)

    def power_off(self) -> None:
        """The function lost power (its slot was switched off, or the card pulled): every
        register software set returns to its reset value; MSI-X is disabled and masked."""
        self._put(pci.PCI_COMMAND, 2, 0)
        self._put(pci.PCI_INTERRUPT_LINE, 1, 0)
        for index, bar in self.bars.items():
            reg = pci.PCI_BASE_ADDRESS_0 + 4 * index
            self._put(reg, 4, pci.PCI_BASE_ADDRESS_MEM_TYPE_64 if bar.is_64bit else 0)
            if bar.is_64bit:
                self._put(reg + 4, 4, 0)
            bar.address = 0
        self._bar_sizing.clear()
        if self._msix_cap:
            self._put(self._msix_cap + pci.PCI_MSIX_FLAGS, 2, self._msix_control() & pci.PCI_MSIX_FLAGS_QSIZE)
            self._msix_table[:] = bytes(len(self._msix_table))
            for i in range(self.msix_entries):
                self._msix_table[i * pci.PCI_MSIX_ENTRY_SIZE + pci.PCI_MSIX_ENTRY_VECTOR_CTRL] = (
                    pci.PCI_MSIX_ENTRY_CTRL_MASKBIT
                )
            self.msix_reset()
        self._msix_routes = None

    def add_bar(self, index: int, bar: Bar) -> None:
        if bar.size & (bar.size - 1) or bar.size < 16:
            raise ValueError("a BAR size is a power of two of at least 16 bytes")
        self.bars[index] = bar
        flags = pci.PCI_BASE_ADDRESS_MEM_TYPE_64 if bar.is_64bit else 0
        self._put(pci.PCI_BASE_ADDRESS_0 + 4 * index, 4, flags)
        self._writable(pci.PCI_BASE_ADDRESS_0 + 4 * index, 4, ~(bar.size - 1) & 0xFFFFFFF0)
        if bar.is_64bit:
            self._writable(pci.PCI_BASE_ADDRESS_0 + 4 * (index + 1), 4, 0xFFFFFFFF)

    def add_capability(self, cap_id: int, body: bytes) -> int:
        """Append a capability (``body`` excludes the id and next bytes); returns its offset."""
        offset = self._cap_free
        length = 2 + len(body)
        if offset + length > pci.PCI_CONFIG_SPACE_SIZE:
            raise ValueError("configuration space full")
        self.config[offset] = cap_id
        self.config[offset + 1] = 0
        self.config[offset + 2 : offset + length] = body
        if self._cap_tail:
            self.config[self._cap_tail] = offset
        else:
            self._put(pci.PCI_CAPABILITY_LIST, 1, offset)
            self._put(pci.PCI_STATUS, 2, self._get(pci.PCI_STATUS, 2) | pci.PCI_STATUS_CAP_LIST)
        self._cap_tail = offset + 1
        self._cap_free = (offset + length + 3) & ~3
        return offset

    def add_msix(self, entries: int, bar_index: int, table_offset: int, pba_offset: int) -> None:
        """An MSI-X capability with ``entries`` vectors; table and PBA live in ``bar_index``."""
        body = bytearray(pci.PCI_MSIX_CAP_SIZE - 2)
        body[0:2] = ((entries - 1) & pci.PCI_MSIX_FLAGS_QSIZE).to_bytes(2, "little")
        body[2:6] = (table_offset | bar_index).to_bytes(4, "little")
        body[6:10] = (pba_offset | bar_index).to_bytes(4, "little")
        self._msix_cap = self.add_capability(pci.PCI_CAP_ID_MSIX, bytes(body))
        self._writable(
            self._msix_cap + pci.PCI_MSIX_FLAGS,
            2,
            pci.PCI_MSIX_FLAGS_ENABLE | pci.PCI_MSIX_FLAGS_MASKALL,
        )
        self.msix_entries = entries
        self._msix_table = bytearray(entries * pci.PCI_MSIX_ENTRY_SIZE)
        for i in range(entries):
            ctrl = i * pci.PCI_MSIX_ENTRY_SIZE + pci.PCI_MSIX_ENTRY_VECTOR_CTRL
            self._msix_table[ctrl] = pci.PCI_MSIX_ENTRY_CTRL_MASKBIT
        self._msix_pending = [False] * entries
        self._msix_routes = None
        self._msix_table_offset = table_offset
        self._msix_pba_offset = pba_offset

    # -- configuration space access (the bus calls these) ------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset < 0 or offset + size > pci.PCI_CONFIG_SPACE_SIZE:
            return (1 << (8 * size)) - 1 if size in (1, 2, 4) else 0xFFFFFFFF
        return self._get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset < 0 or offset + size > pci.PCI_CONFIG_SPACE_SIZE:
            return
        old_msix = self._msix_control()
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            mask = self._wmask[offset + i]
            cleared = byte & self._w1cmask[offset + i]
            self.config[offset + i] = ((self.config[offset + i] & ~mask) | (byte & mask)) & ~cleared
        self._msix_routes = None
        self._update_bar_addresses()
        if self._msix_cap and self._msix_control() != old_msix:
            self._msix_deliver_pending()
        hook = self.config_write_hook
        if hook is not None:
            hook(offset, size, value)

    def _update_bar_addresses(self) -> None:
        for index, bar in self.bars.items():
            low = self._get(pci.PCI_BASE_ADDRESS_0 + 4 * index, 4) & pci.PCI_BASE_ADDRESS_MEM_MASK
            high = self._get(pci.PCI_BASE_ADDRESS_0 + 4 * (index + 1), 4) if bar.is_64bit else 0
            bar.address = (high << 32) | (low & 0xFFFFFFFF)

    @property
    def memory_decode(self) -> bool:
        return bool(self._get(pci.PCI_COMMAND, 2) & pci.PCI_COMMAND_MEMORY)

    @property
    def bus_master(self) -> bool:
        return bool(self._get(pci.PCI_COMMAND, 2) & pci.PCI_COMMAND_MASTER)

    # -- MSI-X ----------------------------------------------------------------------------------

    def _msix_control(self) -> int:
        return self._get(self._msix_cap + pci.PCI_MSIX_FLAGS, 2) if self._msix_cap else 0

    @property
    def msix_enabled(self) -> bool:
        return bool(self._msix_control() & pci.PCI_MSIX_FLAGS_ENABLE)

    def _msix_masked(self, vector: int) -> bool:
        if self._msix_control() & pci.PCI_MSIX_FLAGS_MASKALL:
            return True
        ctrl = vector * pci.PCI_MSIX_ENTRY_SIZE + pci.PCI_MSIX_ENTRY_VECTOR_CTRL
        return bool(self._msix_table[ctrl] & pci.PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def _decode_msix_routes(self) -> list[tuple[int, int] | None]:
        routes: list[tuple[int, int] | None] = []
        live = self.msix_enabled and self.bus_master
        for vector in range(self.msix_entries):
            if live and not self._msix_masked(vector):
                routes.append(self._msix_message(vector))
            else:
                routes.append(None)
        self._msix_routes = routes
        return routes

    def msix_notify(self, vector: int) -> bool:
        """Raise MSI-X ``vector``; returns False if it could only be left pending (or is invalid)."""
        routes = self._msix_routes
        if routes is None:
            routes = self._decode_msix_routes()
        if 0 <= vector < len(routes):
            route = routes[vector]
            sink = self.msi_sink
            if route is not None and sink is not None:  # the common case: enabled, unmasked
                sink(route[0], route[1])
                return True
        if not self.msix_enabled or not 0 <= vector < self.msix_entries:
            return False
        if self._msix_masked(vector):
            self._msix_pending[vector] = True
            return False
        self._msix_send(vector)
        return True

    def _msix_message(self, vector: int) -> tuple[int, int]:
        """The (address, data) pair of ``vector``'s table entry."""
        base = vector * pci.PCI_MSIX_ENTRY_SIZE
        address = int.from_bytes(self._msix_table[base : base + 8], "little")
        data = int.from_bytes(self._msix_table[base + 8 : base + 12], "little")
        return address, data

    def _msix_send(self, vector: int) -> None:
        address, data = self._msix_message(vector)
        if self.msi_sink is not None and self.bus_master:
            self.msi_sink(address, data)

    def _msix_deliver_pending(self) -> None:
        if not self.msix_enabled:
            return
        for vector, pending in enumerate(self._msix_pending):
            if pending and not self._msix_masked(vector):
                self._msix_pending[vector] = False
                self._msix_send(vector)

    def msix_reset(self) -> None:
        for i in range(self.msix_entries):
            self._msix_pending[i] = False

    def msix_table_read(self, offset: int, size: int) -> int:
        if offset >= self._msix_pba_offset:
            bit = (offset - self._msix_pba_offset) * 8
            pending = 0
            for i in range(8 * size):
                if bit + i < self.msix_entries and self._msix_pending[bit + i]:
                    pending |= 1 << i
            return pending
        rel = offset - self._msix_table_offset
        if rel < 0 or rel + size > len(self._msix_table):
            return 0
        return int.from_bytes(self._msix_table[rel : rel + size], "little")

    def msix_table_write(self, offset: int, size: int, value: int) -> None:
        rel = offset - self._msix_table_offset
        if rel < 0 or rel + size > len(self._msix_table) or offset >= self._msix_pba_offset:
            return  # PBA is read-only
        self._msix_table[rel : rel + size] = value.to_bytes(size, "little")
        self._msix_routes = None
        vector = rel // pci.PCI_MSIX_ENTRY_SIZE
        # Unmasking sends a pending message, but only while MSI-X is enabled: a disabled
        # function sends none (enabling it later delivers what is still pending).
        if self.msix_enabled and self._msix_pending[vector] and not self._msix_masked(vector):
            self._msix_pending[vector] = False
            self._msix_send(vector)


class MsixBar:
    """The MMIO region of a BAR holding only an MSI-X table and PBA."""

    def __init__(self, function: PciFunction) -> None:
        self._function = function

    def mmio_read(self, offset: int, size: int) -> int:
        return self._function.msix_table_read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self._function.msix_table_write(offset, size, value)


class PciBus:
    """One PCI bus (bus 0, or a bridge's secondary bus): up to 32 devices of up to 8 functions each."""

    def __init__(self) -> None:
        self.functions: dict[tuple[int, int], PciFunction] = {}

    def plug(self, device: int, function: PciFunction, fn: int = 0) -> None:
        if not 0 <= device < 32 or not 0 <= fn < 8:
            raise ValueError("device 0-31, function 0-7")
        if (device, fn) in self.functions:
            raise ValueError(f"slot {device}.{fn} is taken")
        self.functions[(device, fn)] = function

    def unplug(self, device: int, fn: int = 0) -> PciFunction:
        return self.functions.pop((device, fn))

    def config_read(self, device: int, fn: int, offset: int, size: int) -> int:
        function = self.functions.get((device, fn))
        if function is None:
            return (1 << (8 * size)) - 1  # master abort: all ones
        return function.config_read(offset, size)

    def config_write(self, device: int, fn: int, offset: int, size: int, value: int) -> None:
        function = self.functions.get((device, fn))
        if function is not None:
            function.config_write(offset, size, value)
