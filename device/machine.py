"""The machine: guest RAM, PCI bus 0, physical MMIO decoding and a local APIC for MSI.

Device layer, top: it implements :class:`device.platform.Platform` for the guest driver, and
plays firmware at plug time (assigns BAR addresses in an MMIO window below 4 GiB).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from typing import Final

from device.memory import GuestMemory
from device.pci import Bar, PciBus, PciFunction
from device.platform import InterruptHandler, RunningLoop
from device.spec import pci

MMIO_WINDOW_BASE: Final = 0xE000_0000
MMIO_WINDOW_END: Final = 0xFEC0_0000
FIRST_VECTOR: Final = 0x30  # below are exceptions and legacy IRQs on x86
LAST_VECTOR: Final = 0xEF


@dataclasses.dataclass(slots=True)
class InterruptStatistics:
    delivered: int = 0
    spurious: int = 0


class LocalApic:
    """Receives MSI writes and runs the handler of the vector as deferred work (soon, not inline).

    Delivering through the loop's :class:`~device.platform.WorkQueue` is what makes an
    interrupt asynchronous: a device raising one never runs driver code on its own stack.
    """

    def __init__(self) -> None:
        self._handlers: dict[int, InterruptHandler] = {}
        self._free = list(range(LAST_VECTOR, FIRST_VECTOR - 1, -1))
        self.statistics = InterruptStatistics()
        self.delivered_by_vector: dict[int, int] = {}
        self._running = RunningLoop()

    def allocate_vector(self, handler: InterruptHandler) -> tuple[int, int]:
        if not self._free:
            raise RuntimeError("no free interrupt vectors")
        vector = self._free.pop()
        self._handlers[vector] = handler
        return pci.MSI_ADDRESS_BASE, vector

    def free_vector(self, data: int) -> None:
        if self._handlers.pop(data, None) is not None:
            self._free.append(data)

    def msi_write(self, address: int, data: int) -> None:
        handler = self._handlers.get(data & 0xFF)
        if address & 0xFFF0_0000 != pci.MSI_ADDRESS_BASE or handler is None:
            self.statistics.spurious += 1
            return
        self.statistics.delivered += 1
        vector = data & 0xFF
        self.delivered_by_vector[vector] = self.delivered_by_vector.get(vector, 0) + 1
        self._running.work().defer(handler)


class Machine:
    """A guest machine: RAM, bus 0 and a local APIC. Implements the Platform protocol."""

    def __init__(self, memory: GuestMemory) -> None:
        self._memory = memory
        self.bus = PciBus()
        self.lapic = LocalApic()
        self._next_mmio = MMIO_WINDOW_BASE
        # Decoding: sorted BAR start addresses and the BAR for each.
        self._starts: list[int] = []
        self._decoded: list[tuple[int, int, PciFunction, Bar]] = []
        self._slots = itertools.count(4)  # like the article's [0:4.0]

    @property
    def memory(self) -> GuestMemory:
        return self._memory

    @property
    def interrupts(self) -> LocalApic:
        return self.lapic

    def plug(self, function: PciFunction, device: int | None = None) -> int:
        """Plug ``function`` at ``device``.0 (next free slot by default) and assign its BARs."""
        if device is None:
            device = next(d for d in self._slots if (d, 0) not in self.bus.functions)
        self.bus.plug(device, function)
        function.msi_sink = self.lapic.msi_write
        for index, bar in sorted(function.bars.items()):
            address = (self._next_mmio + bar.size - 1) & ~(bar.size - 1)
            if address + bar.size > MMIO_WINDOW_END:
                raise RuntimeError("MMIO window exhausted")
            self._next_mmio = address + bar.size
            reg = pci.PCI_BASE_ADDRESS_0 + 4 * index
            function.config_write(reg, 4, address & 0xFFFFFFFF)
            if bar.is_64bit:
                function.config_write(reg + 4, 4, address >> 32)
        return device

    def unplug(self, device: int) -> PciFunction:
        function = self.bus.unplug(device)
        function.msi_sink = None
        return function

    # -- Platform -----------------------------------------------------------------------------

    def pci_config_read(self, device: int, function: int, offset: int, size: int) -> int:
        return self.bus.config_read(device, function, offset, size)

    def pci_config_write(self, device: int, function: int, offset: int, size: int, value: int) -> None:
        self.bus.config_write(device, function, offset, size, value)
        self._rebuild_decoding()

    def _rebuild_decoding(self) -> None:
        decoded = []
        for function in self.bus.functions.values():
            if not function.memory_decode:
                continue
            for bar in function.bars.values():
                if bar.address:
                    decoded.append((bar.address, bar.address + bar.size, function, bar))
        decoded.sort(key=lambda item: item[0])
        self._decoded = decoded
        self._starts = [item[0] for item in decoded]

    def _find(self, address: int, size: int) -> tuple[Bar, int] | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i < 0:
            return None
        start, end, _function, bar = self._decoded[i]
        if address + size > end:
            return None
        return bar, address - start

    def mmio_read(self, address: int, size: int) -> int:
        found = self._find(address, size)
        if found is None:
            return (1 << (8 * size)) - 1
        bar, offset = found
        return bar.region.mmio_read(offset, size)

    def mmio_write(self, address: int, size: int, value: int) -> None:
        found = self._find(address, size)
        if found is not None:
            bar, offset = found
            bar.region.mmio_write(offset, size, value & ((1 << (8 * size)) - 1))
