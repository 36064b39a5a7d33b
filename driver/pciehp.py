"""The guest's PCI Express native hot-plug driver, after Linux's pciehp (drivers/pci/hotplug).

Driver layer, beside the boot-time scan of :mod:`driver.guest`: it finds the hot-plug capable
root ports on bus 0, takes each one's hot-plug interrupt (an MSI-X vector), and on slot events
powers the slot on, enumerates the card on the port's secondary bus as at boot, places its BARs
in the port's memory window and binds a :class:`~driver.blk.VirtioBlk` to it; an attention-button
press unbinds the driver and powers the slot off, a surprise removal fails the disk's requests
in flight and frees what the driver held. Slots are named by their Physical Slot Number.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Final

import structlog

from device.platform import Platform
from device.spec import pci
from device.spec.virtio_pci import (
    PCI_VENDOR_ID_REDHAT_QUMRANET,
    VIRTIO_ID_BLOCK,
    VIRTIO_PCI_MODERN_DEVICE_ID_BASE,
)
from driver import pci as pci_bus
from driver.blk import VirtioBlk
from driver.dma import DmaAllocator
from driver.pci import PciConfig, PciDeviceInfo
from driver.virtio_pci import PciTransport

log = structlog.get_logger("vblk.driver.pciehp")

SLOT_EVENTS: Final = (
    pci.PCI_EXP_SLTSTA_ABP
    | pci.PCI_EXP_SLTSTA_PFD
    | pci.PCI_EXP_SLTSTA_MRLSC
    | pci.PCI_EXP_SLTSTA_PDC
    | pci.PCI_EXP_SLTSTA_CC
    | pci.PCI_EXP_SLTSTA_DLLSC
)
PRESENCE_OR_LINK: Final = pci.PCI_EXP_SLTSTA_PDC | pci.PCI_EXP_SLTSTA_DLLSC
# The notifications the driver enables. Command Completed is polled (CCIE off), as Linux does
# whenever it cannot sleep on the interrupt.
NOTIFICATIONS: Final = (
    pci.PCI_EXP_SLTCTL_ABPE | pci.PCI_EXP_SLTCTL_PDCE | pci.PCI_EXP_SLTCTL_DLLSCE | pci.PCI_EXP_SLTCTL_HPIE
)
NOTIFICATION_MASK: Final = (
    NOTIFICATIONS | pci.PCI_EXP_SLTCTL_CCIE | pci.PCI_EXP_SLTCTL_PFDE | pci.PCI_EXP_SLTCTL_MRLSCE
)
POWER_ON: Final = pci.PCI_EXP_SLTCTL_PWR_ON | pci.PCI_EXP_SLTCTL_PWR_IND_ON
POWER_OFF: Final = pci.PCI_EXP_SLTCTL_PWR_OFF | pci.PCI_EXP_SLTCTL_PWR_IND_OFF
POWER_MASK: Final = pci.PCI_EXP_SLTCTL_PCC | pci.PCI_EXP_SLTCTL_PIC
ISR_REREADS: Final = 8  # a Slot Status whose bits will not clear ends the loop here
POLL_INTERVAL: Final = 0.001


class PciehpError(Exception):
    """A hot-plug slot did not end up with a bound disk, or no such slot is driven."""


@dataclasses.dataclass(frozen=True, slots=True)
class HotplugTiming:
    """How long the driver waits (seconds): presence debounce after a Presence Detect Changed,
    the settle time after the link comes up (PCIe Base 6.6.1: 100 ms before the first
    configuration request), and the limits on link training and on a slot command."""

    debounce: float = 0.1
    link_settle: float = 0.1
    link_timeout: float = 1.0
    command_timeout: float = 1.0


@dataclasses.dataclass(slots=True)
class SlotStatistics:
    interrupts: int = 0
    spurious_interrupts: int = 0
    events: int = 0
    bound: int = 0
    unbound: int = 0
    surprise_removals: int = 0


class HotplugSlot:
    """One root port's slot as the driver drives it."""

    def __init__(self, port: PciDeviceInfo, cfg: PciConfig, cap: int, number: int, bus: int) -> None:
        self.port = port
        self.cfg = cfg
        self.cap = cap
        self.number = number
        self.bus = bus
        self.window: tuple[int, int] = (0, -1)
        self.disk: VirtioBlk | None = None
        self.card: PciDeviceInfo | None = None
        self.pending = 0  # Slot Status events collected by the interrupt handler
        self.stale_interrupts = 0  # messages in flight for events the driver already took back
        self.wakeup = asyncio.Event()
        self.busy = False  # the worker is handling events
        self.task: asyncio.Task[None] | None = None
        self.vector_data: int | None = None
        self.msix_cap = 0
        self.msix_entry = 0
        self.msix_table = 0
        self.statistics = SlotStatistics()
        self.arrival_waiters: list[asyncio.Future[VirtioBlk]] = []
        self.idle_waiters: list[asyncio.Future[None]] = []

    def read(self, register: int) -> int:
        return self.cfg.read(self.cap + register, 2)

    def write(self, register: int, value: int) -> None:
        self.cfg.write(self.cap + register, 2, value)

    @property
    def slot_status(self) -> int:
        return self.read(pci.PCI_EXP_SLTSTA)

    @property
    def slot_control(self) -> int:
        return self.read(pci.PCI_EXP_SLTCTL)

    @property
    def present(self) -> bool:
        status = self.slot_status
        return status != 0xFFFF and bool(status & pci.PCI_EXP_SLTSTA_PDS)

    @property
    def link_active(self) -> bool:
        status = self.read(pci.PCI_EXP_LNKSTA)
        return status != 0xFFFF and bool(status & pci.PCI_EXP_LNKSTA_DLLLA)

    @property
    def powered(self) -> bool:
        return self.slot_control & pci.PCI_EXP_SLTCTL_PCC == pci.PCI_EXP_SLTCTL_PWR_ON

    def settled(self) -> bool:
        return not self.busy and not self.pending


class Pciehp:
    """The hot-plug slots of ``platform``'s root ports. ``driver_options`` go to each VirtioBlk."""

    def __init__(
        self,
        platform: Platform,
        dma: DmaAllocator,
        *,
        timing: HotplugTiming | None = None,
        driver_options: dict[str, Any] | None = None,
    ) -> None:
        self.platform = platform
        self.dma = dma
        self.timing = timing or HotplugTiming()
        self.driver_options: dict[str, Any] = dict(driver_options or {})
        self.slots: dict[int, HotplugSlot] = {}
        self.started = False
        self._closed = False

    # -- the service's view ------------------------------------------------------------------------

    @property
    def disks(self) -> dict[int, VirtioBlk]:
        """The disks bound now, by slot number."""
        return {number: slot.disk for number, slot in self.slots.items() if slot.disk is not None}

    def _slot(self, number: int) -> HotplugSlot:
        slot = self.slots.get(number)
        if slot is None:
            raise PciehpError(f"no hot-plug slot {number}")
        return slot

    async def arrived(self, number: int) -> VirtioBlk:
        """The disk bound in slot ``number``: at once if one is, else when the next card there
        is bound. Raises :class:`PciehpError` if that card could not be bound (or left first)."""
        slot = self._slot(number)
        if slot.disk is not None:
            return slot.disk
        if self._closed:
            raise PciehpError(f"slot {number}: driver closed")
        waiter: asyncio.Future[VirtioBlk] = asyncio.get_running_loop().create_future()
        slot.arrival_waiters.append(waiter)
        return await waiter

    async def removed(self, number: int) -> None:
        """Until slot ``number`` holds no bound disk and the driver has finished with it (the
        slot powered off): at once if so already."""
        slot = self._slot(number)
        while slot.disk is not None or not slot.settled():
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            slot.idle_waiters.append(waiter)
            await waiter

    async def settled(self, number: int) -> None:
        """Until the driver has handled every event of slot ``number`` seen so far."""
        slot = self._slot(number)
        while not slot.settled():
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            slot.idle_waiters.append(waiter)
            await waiter

    # -- probe ---------------------------------------------------------------------------------------

    async def start(self) -> list[int]:
        """Find the hot-plug slots and take their interrupts (once); returns the slot numbers."""
        if self.started or self._closed:
            return sorted(self.slots)
        self.started = True
        buses = {0}
        found: list[HotplugSlot] = []
        for info in pci_bus.enumerate_bus(self.platform):
            slot = self._probe_port(info, buses)
            if slot is not None:
                found.append(slot)
        loop = asyncio.get_running_loop()
        for slot in found:
            if slot.number in self.slots:
                log.warning("pciehp_port_skipped", port=slot.port.name, reason=f"slot {slot.number} twice")
                continue
            try:
                self._take_interrupt(slot)
            except PciehpError as exc:
                log.warning("pciehp_port_skipped", port=slot.port.name, reason=str(exc))
                continue
            self.slots[slot.number] = slot
            self._clear_status(slot, SLOT_EVENTS)
            await self._command(slot, NOTIFICATIONS, NOTIFICATION_MASK)
            log.info("pciehp_slot", slot=slot.number, port=slot.port.name, bus=slot.bus)
            # A card present at boot, or a powered empty slot, is handled as a presence change.
            slot.pending |= pci.PCI_EXP_SLTSTA_PDC
            slot.task = loop.create_task(self._worker(slot), name=f"pciehp-slot-{slot.number}")
            slot.wakeup.set()
        return sorted(self.slots)

    def _probe_port(self, info: PciDeviceInfo, buses: set[int]) -> HotplugSlot | None:
        if info.header_type != pci.PCI_HEADER_TYPE_BRIDGE or info.class_code != pci.PCI_CLASS_BRIDGE_PCI:
            return None
        cap = info.capability(pci.PCI_CAP_ID_EXP)
        if not cap:
            return None
        cfg = pci_bus.config_of(self.platform, info)
        flags = cfg.read(cap + pci.PCI_EXP_FLAGS, 2)
        port_type = (flags & pci.PCI_EXP_FLAGS_TYPE) >> pci.PCI_EXP_FLAGS_TYPE_SHIFT
        if port_type not in (pci.PCI_EXP_TYPE_ROOT_PORT, pci.PCI_EXP_TYPE_DOWNSTREAM):
            return None
        if not flags & pci.PCI_EXP_FLAGS_SLOT:
            return None
        sltcap = cfg.read(cap + pci.PCI_EXP_SLTCAP, 4)
        if not sltcap & pci.PCI_EXP_SLTCAP_HPC:
            return None
        number = sltcap >> pci.PCI_EXP_SLTCAP_PSN_SHIFT
        if number == 0:
            log.warning("pciehp_port_skipped", port=info.name, reason="physical slot number 0")
            return None
        if not sltcap & pci.PCI_EXP_SLTCAP_PCP:
            log.warning("pciehp_port_skipped", port=info.name, reason="no power controller")
            return None
        # Respect what firmware set: bus numbers and the memory window. Only a port it left
        # without a secondary bus gets one (the next free number, as Linux would assign it).
        bus = cfg.read(pci.PCI_SECONDARY_BUS, 1)
        if bus == 0 or bus in buses:
            bus = max(buses) + 1
            if bus > 0xFF:
                log.warning("pciehp_port_skipped", port=info.name, reason="no bus number left")
                return None
            cfg.write(pci.PCI_PRIMARY_BUS, 1, info.bus)
            cfg.write(pci.PCI_SECONDARY_BUS, 1, bus)
            cfg.write(pci.PCI_SUBORDINATE_BUS, 1, bus)
        buses.add(bus)
        slot = HotplugSlot(info, cfg, cap, number, bus)
        mask, shift = pci.PCI_MEMORY_RANGE_MASK, pci.PCI_MEMORY_RANGE_SHIFT
        base = (cfg.read(pci.PCI_MEMORY_BASE, 2) & mask) << shift
        limit = (cfg.read(pci.PCI_MEMORY_LIMIT, 2) & mask) << shift | (pci.PCI_MEMORY_WINDOW_GRANULARITY - 1)
        if base > limit or base == 0:
            log.warning("pciehp_port_skipped", port=info.name, reason="firmware gave it no memory window")
            return None
        slot.window = (base, limit)
        return slot

    def _take_interrupt(self, slot: HotplugSlot) -> None:
        """Enable the port (decoding, bus mastering) and route its hot-plug MSI-X entry to us."""
        info = slot.port
        msix = info.capability(pci.PCI_CAP_ID_MSIX)
        if not msix:
            raise PciehpError("no MSI-X capability")
        control = slot.cfg.read(msix + pci.PCI_MSIX_FLAGS, 2)
        table_size = (control & pci.PCI_MSIX_FLAGS_QSIZE) + 1
        flags = slot.read(pci.PCI_EXP_FLAGS)
        entry = (flags & pci.PCI_EXP_FLAGS_IRQ) >> pci.PCI_EXP_FLAGS_IRQ_SHIFT
        if entry >= table_size:
            raise PciehpError(f"interrupt message number {entry} beyond the MSI-X table")
        table = slot.cfg.read(msix + pci.PCI_MSIX_TABLE, 4)
        bar = table & pci.PCI_MSIX_BIR_MASK
        if bar not in info.bars or not info.bars[bar][0]:
            raise PciehpError("MSI-X table in an unassigned BAR")
        pci_bus.enable(self.platform, info)
        slot.msix_cap = msix
        slot.msix_entry = entry
        slot.msix_table = info.bars[bar][0] + (table & ~pci.PCI_MSIX_BIR_MASK)
        address, data = self.platform.interrupts.allocate_vector(lambda: self._interrupt(slot))
        slot.vector_data = data
        base = slot.msix_table + entry * pci.PCI_MSIX_ENTRY_SIZE
        mmio_write = self.platform.mmio_write
        mmio_write(base + pci.PCI_MSIX_ENTRY_LOWER_ADDR, 4, address & 0xFFFFFFFF)
        mmio_write(base + pci.PCI_MSIX_ENTRY_UPPER_ADDR, 4, address >> 32)
        mmio_write(base + pci.PCI_MSIX_ENTRY_DATA, 4, data)
        mmio_write(base + pci.PCI_MSIX_ENTRY_VECTOR_CTRL, 4, 0)
        control = (control | pci.PCI_MSIX_FLAGS_ENABLE) & ~pci.PCI_MSIX_FLAGS_MASKALL
        slot.cfg.write(msix + pci.PCI_MSIX_FLAGS, 2, control)

    def _release_interrupt(self, slot: HotplugSlot) -> None:
        if slot.vector_data is None:
            return
        base = slot.msix_table + slot.msix_entry * pci.PCI_MSIX_ENTRY_SIZE
        self.platform.mmio_write(base + pci.PCI_MSIX_ENTRY_VECTOR_CTRL, 4, pci.PCI_MSIX_ENTRY_CTRL_MASKBIT)
        control = slot.cfg.read(slot.msix_cap + pci.PCI_MSIX_FLAGS, 2)
        slot.cfg.write(slot.msix_cap + pci.PCI_MSIX_FLAGS, 2, control & ~pci.PCI_MSIX_FLAGS_ENABLE)
        self.platform.interrupts.free_vector(slot.vector_data)
        slot.vector_data = None

    # -- the interrupt handler (pciehp_isr) -------------------------------------------------------

    def _interrupt(self, slot: HotplugSlot) -> None:
        slot.statistics.interrupts += 1
        if self._closed:
            return
        collected = 0
        status = slot.slot_status
        for _ in range(ISR_REREADS):
            if status == 0xFFFF:
                log.warning("pciehp_port_unreadable", slot=slot.number)
                break
            events = status & SLOT_EVENTS
            if not events:
                break
            # Clear exactly the bits read (RW1C). With MSI no new message comes while any enabled
            # bit stays set, so read again for a bit set between the read and the write.
            slot.write(pci.PCI_EXP_SLTSTA, events)
            collected |= events
            status = slot.slot_status
        events = collected & ~pci.PCI_EXP_SLTSTA_CC  # commands are polled
        if not events and slot.stale_interrupts:
            slot.stale_interrupts -= 1  # raised by the driver's own power command
            return
        if not events:
            slot.statistics.spurious_interrupts += 1
            log.info("pciehp_spurious_interrupt", slot=slot.number, slot_status=f"{status:#06x}")
            return
        slot.pending |= events
        slot.wakeup.set()

    # -- slot commands ------------------------------------------------------------------------------

    def _clear_status(self, slot: HotplugSlot, bits: int) -> None:
        slot.write(pci.PCI_EXP_SLTSTA, bits)

    async def _command(self, slot: HotplugSlot, value: int, mask: int) -> bool:
        """Write Slot Control (pcie_write_cmd) and poll Command Completed; False on a timeout."""
        control = slot.slot_control
        if control == 0xFFFF:
            log.warning("pciehp_port_unreadable", slot=slot.number)
            return False
        slot.write(pci.PCI_EXP_SLTCTL, (control & ~mask) | (value & mask))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timing.command_timeout
        while not slot.slot_status & pci.PCI_EXP_SLTSTA_CC:
            if loop.time() > deadline:
                log.warning("pciehp_command_timeout", slot=slot.number, slot_control=f"{value:#06x}")
                return False
            await asyncio.sleep(POLL_INTERVAL)
        self._clear_status(slot, pci.PCI_EXP_SLTSTA_CC)
        return True

    async def _power_on(self, slot: HotplugSlot) -> bool:
        if not slot.powered:
            await self._command(slot, POWER_ON, POWER_MASK)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timing.link_timeout
        while not slot.link_active:  # pcie_wait_for_link
            if loop.time() > deadline:
                log.warning("pciehp_link_down", slot=slot.number, present=slot.present)
                return False
            await asyncio.sleep(POLL_INTERVAL)
        if self.timing.link_settle:
            await asyncio.sleep(self.timing.link_settle)
        self._take_back_own_events(slot)  # the power-on's own link change
        return True

    async def _power_off(self, slot: HotplugSlot) -> None:
        await self._command(slot, POWER_OFF, POWER_MASK)
        self._take_back_own_events(slot)  # the presence and link changes the power-off causes

    def _take_back_own_events(self, slot: HotplugSlot) -> None:
        """Presence and link changes a power command caused are no events to handle (Linux
        drops them from ``pending_events`` the same way); their message may still be on its way."""
        status = slot.slot_status
        if status != 0xFFFF and status & PRESENCE_OR_LINK:
            self._clear_status(slot, PRESENCE_OR_LINK)
            if slot.slot_control & pci.PCI_EXP_SLTCTL_HPIE:
                slot.stale_interrupts += 1
        slot.pending &= ~PRESENCE_OR_LINK

    # -- events (pciehp_ist) ------------------------------------------------------------------------

    async def _worker(self, slot: HotplugSlot) -> None:
        while True:
            await slot.wakeup.wait()
            slot.wakeup.clear()
            while slot.pending:
                events, slot.pending = slot.pending, 0
                slot.busy = True
                slot.statistics.events += 1
                try:
                    await self._handle(slot, events)
                except Exception:
                    log.exception("pciehp_event_failed", slot=slot.number, events=f"{events:#06x}")
                finally:
                    slot.busy = False
            self._wake_idle(slot)

    def _wake_idle(self, slot: HotplugSlot) -> None:
        waiters, slot.idle_waiters = slot.idle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _arrival_failed(self, slot: HotplugSlot, reason: str) -> None:
        waiters, slot.arrival_waiters = slot.arrival_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(PciehpError(f"slot {slot.number}: {reason}"))

    async def _handle(self, slot: HotplugSlot, events: int) -> None:
        if events & pci.PCI_EXP_SLTSTA_ABP:
            log.info("pciehp_attention_button", slot=slot.number)
            await self._disable_slot(slot, "attention button pressed")
            return
        if events & PRESENCE_OR_LINK:
            await self._presence_or_link_change(slot)
        elif events:
            log.info("pciehp_event_ignored", slot=slot.number, events=f"{events:#06x}")

    async def _disable_slot(self, slot: HotplugSlot, reason: str) -> None:
        if slot.disk is not None:
            await self._unbind(slot, reason)
        elif slot.arrival_waiters:
            self._arrival_failed(slot, reason)
        if slot.powered or slot.present:
            await self._power_off(slot)

    async def _presence_or_link_change(self, slot: HotplugSlot) -> None:
        present, link = slot.present, slot.link_active
        if slot.disk is not None:
            if present and link:
                # A new card cannot enter a powered slot: this is the bound one, still there.
                log.info("pciehp_presence_glitch", slot=slot.number)
                return
            slot.statistics.surprise_removals += 1
            log.info("pciehp_surprise_removal", slot=slot.number, present=present, link=link)
            await self._disable_slot(slot, "device removed")
            return
        if not present:
            if slot.powered:
                await self._power_off(slot)
            if slot.arrival_waiters:
                self._arrival_failed(slot, "the card left before it was bound")
            return
        if self.timing.debounce:
            await asyncio.sleep(self.timing.debounce)
        if not slot.present:
            await self._presence_or_link_change(slot)
            return
        await self._enable_slot(slot)

    async def _enable_slot(self, slot: HotplugSlot) -> None:
        if not await self._power_on(slot):
            await self._give_up(slot, "the link did not come up")
            return
        functions = pci_bus.probe_slot(self.platform, 0, slot.bus)  # one device on a PCIe link
        if not functions:
            await self._give_up(slot, "no function answers on the secondary bus")
            return
        info = functions[0]
        if not pci_bus.assign_bars(self.platform, info, *slot.window):
            await self._give_up(slot, "its BARs do not fit the port's memory window")
            return
        if (
            info.vendor_id != PCI_VENDOR_ID_REDHAT_QUMRANET
            or info.device_id != VIRTIO_PCI_MODERN_DEVICE_ID_BASE + VIRTIO_ID_BLOCK
        ):
            await self._give_up(slot, f"no driver for {info.vendor_id:04x}:{info.device_id:04x}")
            return
        disk = VirtioBlk(PciTransport(self.platform, info, VIRTIO_ID_BLOCK), self.dma, **self.driver_options)
        try:
            await disk.start()
        except Exception as exc:  # a card that went away meanwhile, or refuses the driver
            await disk.close("probe failed")
            await self._give_up(slot, f"binding failed: {exc}")
            return
        disk.pci_address = info.address
        slot.disk = disk
        slot.card = info
        slot.statistics.bound += 1
        log.info("pciehp_card_bound", slot=slot.number, device=info.name)
        waiters, slot.arrival_waiters = slot.arrival_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(disk)

    async def _give_up(self, slot: HotplugSlot, reason: str) -> None:
        """The card cannot be used: power the slot off (which releases it)."""
        log.warning("pciehp_card_refused", slot=slot.number, reason=reason)
        self._arrival_failed(slot, reason)
        await self._power_off(slot)

    async def _unbind(self, slot: HotplugSlot, reason: str) -> None:
        """Stop the disk's driver: reset the device (unless it is gone), fail what is in flight,
        free its vectors, queues and DMA buffers, and turn decoding and bus mastering off."""
        disk, info = slot.disk, slot.card
        slot.disk = slot.card = None
        if disk is None or info is None:
            return
        gone = not pci_bus.present(self.platform, info)
        await disk.close(reason)
        if not gone:
            pci_bus.disable(self.platform, info)
        slot.statistics.unbound += 1
        log.info("pciehp_card_unbound", slot=slot.number, device=info.name, reason=reason)

    # -- shutdown -------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Unbind every disk (the slots stay powered), mask the interrupts and free the vectors."""
        if self._closed:
            return
        self._closed = True
        for slot in self.slots.values():
            if slot.task is not None:
                slot.task.cancel()
                await asyncio.gather(slot.task, return_exceptions=True)
                slot.task = None
        for slot in self.slots.values():
            if slot.disk is not None:
                await self._unbind(slot, "driver closed")
            self._arrival_failed(slot, "driver closed")
            control = slot.slot_control
            if control != 0xFFFF:
                slot.write(pci.PCI_EXP_SLTCTL, control & ~NOTIFICATION_MASK)
                self._clear_status(slot, pci.PCI_EXP_SLTSTA_CC)
            self._release_interrupt(slot)
            slot.pending = 0
            self._wake_idle(slot)
