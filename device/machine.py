"""The machine: guest RAM, PCI bus 0, PCI Express root ports with hot-plug slots, physical
MMIO decoding and a local APIC for MSI.

Device layer, top: it implements :class:`device.platform.Platform` for the guest driver, and
plays firmware at plug time (assigns BAR addresses in an MMIO window below 4 GiB) and at
power-on (gives each root port a secondary bus number and a fixed memory window, which the
cards hot-plugged behind it reuse). :meth:`Machine.hotplug`, :meth:`Machine.request_unplug`
and :meth:`Machine.surprise_unplug` are the hands of the operator at a hot-plug slot.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import itertools
from collections.abc import Callable
from typing import Final

from device.memory import GuestMemory
from device.pci import Bar, PciBus, PciFunction
from device.pcie_port import HotplugError, PcieRootPort
from device.platform import InterruptHandler, RunningLoop
from device.spec import pci

MMIO_WINDOW_BASE: Final = 0xE000_0000
MMIO_WINDOW_END: Final = 0xFEC0_0000
FIRST_VECTOR: Final = 0x30  # below are exceptions and legacy IRQs on x86
LAST_VECTOR: Final = 0xEF
ROOT_PORT_FIRST_DEVICE: Final = 16  # root ports at 0:16.0, 0:17.0, ...; plug() users start at 4
MAX_ROOT_PORTS: Final = 32 - ROOT_PORT_FIRST_DEVICE
ROOT_PORT_WINDOW_SIZE: Final = 2 << 20  # each port's memory window (Linux's default hpmemsize)

__all__ = ["HotplugError", "InterruptStatistics", "LocalApic", "Machine"]


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

    @property
    def vectors_in_use(self) -> int:
        """Vectors allocated and not freed."""
        return len(self._handlers)

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
    """A guest machine: RAM, bus 0, ``hotplug_ports`` PCI Express root ports and a local APIC.

    Implements the Platform protocol. Root port ``i`` sits at 0:(16+i).0; its slot's Physical
    Slot Number (what the hot-plug methods take and return, and what the guest reads in Slot
    Capabilities) and its secondary bus number are ``i + 1``; its memory window is a fixed 2 MiB
    at the top of the MMIO window, so plugging and unplugging cards behind it never uses up
    address space.
    """

    def __init__(self, memory: GuestMemory, hotplug_ports: int = 0) -> None:
        if not 0 <= hotplug_ports <= MAX_ROOT_PORTS:
            raise ValueError(f"0 to {MAX_ROOT_PORTS} hot-plug ports")
        self._memory = memory
        self.bus = PciBus()
        self.lapic = LocalApic()
        self._next_mmio = MMIO_WINDOW_BASE
        self._mmio_end = MMIO_WINDOW_END - hotplug_ports * ROOT_PORT_WINDOW_SIZE
        # Decoding: sorted BAR start addresses and the BAR for each.
        self._starts: list[int] = []
        self._decoded: list[tuple[int, int, PciFunction, Bar]] = []
        self._slots = itertools.count(4)  # like the article's [0:4.0]
        #: The root ports; ``root_ports[slot - 1]`` has Physical Slot Number ``slot``.
        self.root_ports: list[PcieRootPort] = []
        #: Called with (slot, function) whenever a card leaves a hot-plug slot: the guest powered
        #: the slot off (after an attention-button request, or on its own), or
        #: :meth:`surprise_unplug` pulled it. Called synchronously: keep them short.
        self.unplug_listeners: list[Callable[[int, PciFunction], None]] = []
        self._unplug_waiters: dict[int, list[asyncio.Future[PciFunction]]] = {}
        for index in range(hotplug_ports):
            port = PcieRootPort(
                port_number=index,
                physical_slot=index + 1,
                upstream_msi=self.lapic.msi_write,
                on_change=self._rebuild_decoding,
                on_removed=self._card_removed,
            )
            self.plug(port.function, ROOT_PORT_FIRST_DEVICE + index)
            window = self._mmio_end + index * ROOT_PORT_WINDOW_SIZE
            port.firmware_setup(
                primary_bus=0,
                secondary_bus=index + 1,
                memory_base=window,
                memory_limit=window + ROOT_PORT_WINDOW_SIZE - 1,
            )
            self.root_ports.append(port)
        self._rebuild_decoding()

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
            if address + bar.size > self._mmio_end:
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

    # -- PCI Express native hot-plug (the operator's side of the slots) ---------------------------

    def _port(self, slot: int) -> PcieRootPort:
        if not 1 <= slot <= len(self.root_ports):
            raise HotplugError(f"no hot-plug slot {slot}")
        return self.root_ports[slot - 1]

    def hotplug(self, function: PciFunction) -> int:
        """Insert ``function`` into the first free hot-plug slot (empty and powered off); returns
        its Physical Slot Number. The guest learns it from the slot's presence-detect interrupt.

        A slot whose card was pulled is free again once the guest has powered it off. Raises
        :class:`HotplugError` when no slot is free.
        """
        for port in self.root_ports:
            if port.card is None and not port.powered:
                port.insert(function)
                return port.physical_slot
        raise HotplugError("no free hot-plug slot")

    def hotplug_card(self, slot: int) -> PciFunction | None:
        """The card in ``slot``, or None."""
        return self._port(slot).card

    def request_unplug(self, slot: int) -> asyncio.Future[PciFunction]:
        """Press ``slot``'s attention button: ask the guest to release the card.

        The returned future resolves with the card once it has left the slot: when the guest
        has powered the slot off (its driver unbound first), or when something else removed it
        (a surprise removal). A guest that does not answer leaves it pending: cancel it and
        :meth:`surprise_unplug` if need be. Raises :class:`HotplugError` for an empty slot.
        """
        port = self._port(slot)
        if port.card is None:
            raise HotplugError(f"hot-plug slot {slot} is empty")
        waiter: asyncio.Future[PciFunction] = asyncio.get_running_loop().create_future()
        self._unplug_waiters.setdefault(slot, []).append(waiter)
        port.press_attention_button()
        return waiter

    def surprise_unplug(self, slot: int) -> PciFunction:
        """Pull the card out of ``slot`` now, unannounced; returns it.

        Its function loses power (a virtio device resets and drops the answers of its work in
        flight); the guest learns it from the presence-detect and link-state interrupt.
        """
        port = self._port(slot)
        if port.card is None:
            raise HotplugError(f"hot-plug slot {slot} is empty")
        return port.surprise_removal()

    def _card_removed(self, port: PcieRootPort, function: PciFunction) -> None:
        slot = port.physical_slot
        for listener in list(self.unplug_listeners):
            listener(slot, function)
        for waiter in self._unplug_waiters.pop(slot, []):
            if not waiter.done():
                waiter.set_result(function)

    def _port_for_bus(self, bus: int) -> PcieRootPort | None:
        for port in self.root_ports:
            if port.secondary_bus == bus:
                return port
        return None

    # -- Platform -----------------------------------------------------------------------------

    def pci_config_read(self, device: int, function: int, offset: int, size: int, bus: int = 0) -> int:
        if bus == 0:
            return self.bus.config_read(device, function, offset, size)
        port = self._port_for_bus(bus)
        if port is None:
            return (1 << (8 * size)) - 1 if size in (1, 2, 4) else 0xFFFFFFFF  # no bridge claims it
        return port.downstream_config_read(device, function, offset, size)

    def pci_config_write(
        self, device: int, function: int, offset: int, size: int, value: int, bus: int = 0
    ) -> None:
        if bus == 0:
            self.bus.config_write(device, function, offset, size, value)
        else:
            port = self._port_for_bus(bus)
            if port is not None:
                port.downstream_config_write(device, function, offset, size, value)
        self._rebuild_decoding()

    def _rebuild_decoding(self) -> None:
        decoded = []
        for function in self.bus.functions.values():
            if not function.memory_decode:
                continue
            for bar in function.bars.values():
                if bar.address:
                    decoded.append((bar.address, bar.address + bar.size, function, bar))
        for port in self.root_ports:
            # A function behind a bridge decodes only inside the window the bridge forwards.
            window = port.forwarded_window()
            card = port.reachable_card()
            if window is None or card is None or not card.memory_decode:
                continue
            base, limit = window
            for bar in card.bars.values():
                if bar.address and base <= bar.address and bar.address + bar.size - 1 <= limit:
                    decoded.append((bar.address, bar.address + bar.size, card, bar))
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
