"""A PCI Express root port with a native hot-plug slot (PCIe Base 4.0 sections 6.7 and 7.5.3).

Device layer, between bus 0 of :class:`device.machine.Machine` and the card in its slot: a
PCI-to-PCI bridge function (type 1 header: bus numbers, a memory window) with a PCI Express
capability (root port, Slot Implemented; Slot Capabilities, Control and Status; Link Status)
and one MSI-X vector for the hot-plug interrupt, laid out as QEMU's pcie-root-port and read
as Linux's pciehp reads it. Command Completed is supported: every Slot Control write sets it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

import structlog

from device.pci import Bar, MsiSink, MsixBar, PciFunction
from device.spec import pci
from device.virtio import VirtioDevice
from device.virtio_pci import VirtioPciFunction

log = structlog.get_logger("vblk.device.pcie_port")

PCIE_CAP_OFFSET: Final = 0x40
MSIX_BAR: Final = 0
MSIX_BAR_SIZE: Final = 0x1000
MSIX_PBA_OFFSET: Final = 0x800
HOTPLUG_VECTOR: Final = 0  # the MSI-X entry of the hot-plug interrupt (Interrupt Message Number)

SLOT_CAPABILITIES: Final = (
    pci.PCI_EXP_SLTCAP_ABP
    | pci.PCI_EXP_SLTCAP_PCP
    | pci.PCI_EXP_SLTCAP_AIP
    | pci.PCI_EXP_SLTCAP_PIP
    | pci.PCI_EXP_SLTCAP_HPS
    | pci.PCI_EXP_SLTCAP_HPC
)
SLOT_CONTROL_WRITABLE: Final = (
    pci.PCI_EXP_SLTCTL_ABPE
    | pci.PCI_EXP_SLTCTL_PFDE
    | pci.PCI_EXP_SLTCTL_MRLSCE
    | pci.PCI_EXP_SLTCTL_PDCE
    | pci.PCI_EXP_SLTCTL_CCIE
    | pci.PCI_EXP_SLTCTL_HPIE
    | pci.PCI_EXP_SLTCTL_AIC
    | pci.PCI_EXP_SLTCTL_PIC
    | pci.PCI_EXP_SLTCTL_PCC
    | pci.PCI_EXP_SLTCTL_DLLSCE
)
SLOT_CONTROL_RESET: Final = (
    pci.PCI_EXP_SLTCTL_ATTN_IND_OFF | pci.PCI_EXP_SLTCTL_PWR_IND_OFF | pci.PCI_EXP_SLTCTL_PWR_OFF
)
SLOT_STATUS_EVENTS: Final = (  # the RW1C change bits
    pci.PCI_EXP_SLTSTA_ABP
    | pci.PCI_EXP_SLTSTA_PFD
    | pci.PCI_EXP_SLTSTA_MRLSC
    | pci.PCI_EXP_SLTSTA_PDC
    | pci.PCI_EXP_SLTSTA_CC
    | pci.PCI_EXP_SLTSTA_DLLSC
)
# Which Slot Control enable bit lets each Slot Status event raise the hot-plug interrupt.
EVENT_ENABLES: Final = (
    (pci.PCI_EXP_SLTSTA_ABP, pci.PCI_EXP_SLTCTL_ABPE),
    (pci.PCI_EXP_SLTSTA_PFD, pci.PCI_EXP_SLTCTL_PFDE),
    (pci.PCI_EXP_SLTSTA_MRLSC, pci.PCI_EXP_SLTCTL_MRLSCE),
    (pci.PCI_EXP_SLTSTA_PDC, pci.PCI_EXP_SLTCTL_PDCE),
    (pci.PCI_EXP_SLTSTA_CC, pci.PCI_EXP_SLTCTL_CCIE),
    (pci.PCI_EXP_SLTSTA_DLLSC, pci.PCI_EXP_SLTCTL_DLLSCE),
)


class HotplugError(RuntimeError):
    """A hot-plug request the slots cannot honour (no free slot, an empty slot, no such port)."""


def _overlaps(offset: int, size: int, register: int, width: int) -> bool:
    return offset < register + width and register < offset + size


class PcieRootPort:
    """One root port and its slot. ``function`` is the bridge as bus 0 sees it; ``card`` the
    function in the slot (reachable on the secondary bus while the slot is powered).

    ``upstream_msi`` receives the card's MSI writes the bridge forwards (bus mastering on);
    ``on_change`` is told when what the bridge forwards may have changed (decoding), and
    ``on_removed`` when a card leaves the slot (powered off by the guest, or pulled).

    Not modelled: I/O and prefetchable windows (their registers read 0), Secondary Bus Reset
    and Link Disable (the bits read back and do nothing), MRL sensor, power faults and the
    electromechanical interlock (not advertised).
    """

    def __init__(
        self,
        *,
        port_number: int,
        physical_slot: int,
        upstream_msi: MsiSink,
        on_change: Callable[[], None],
        on_removed: Callable[[PcieRootPort, PciFunction], None],
    ) -> None:
        self.port_number = port_number
        self.physical_slot = physical_slot
        self._upstream_msi = upstream_msi
        self._on_change = on_change
        self._on_removed = on_removed
        self.card: PciFunction | None = None
        self._reports: set[asyncio.Task[None]] = set()
        self._link_up = False
        self._asserted = False  # the hot-plug interrupt's level: a message goes on 0 -> 1
        self.interrupts_sent = 0
        f = self.function = PciFunction(
            vendor_id=pci.PCI_VENDOR_ID_REDHAT,
            device_id=pci.PCI_DEVICE_ID_REDHAT_PCIE_RP,
            class_code=pci.PCI_CLASS_BRIDGE_PCI,
            revision=0,
            subsystem_vendor_id=0,
            subsystem_id=0,
        )
        f.init_register(pci.PCI_HEADER_TYPE, 1, pci.PCI_HEADER_TYPE_BRIDGE)
        # A type 1 header has no subsystem ids at 0x2c: that is the prefetchable limit's upper half.
        f.init_register(pci.PCI_PREF_LIMIT_UPPER32, 4, 0)
        for register in (pci.PCI_PRIMARY_BUS, pci.PCI_SECONDARY_BUS, pci.PCI_SUBORDINATE_BUS):
            f.init_register(register, 1, 0, writable=0xFF)
        f.init_register(pci.PCI_SEC_LATENCY_TIMER, 1, 0, writable=0xFF)
        # No I/O window and no prefetchable window: their registers read 0 (Bridge spec 3.2.5).
        f.init_register(pci.PCI_MEMORY_BASE, 2, 0, writable=pci.PCI_MEMORY_RANGE_MASK)
        f.init_register(pci.PCI_MEMORY_LIMIT, 2, 0, writable=pci.PCI_MEMORY_RANGE_MASK)
        f.init_register(
            pci.PCI_BRIDGE_CONTROL, 2, 0, writable=pci.PCI_BRIDGE_CTL_SERR | pci.PCI_BRIDGE_CTL_BUS_RESET
        )
        f.add_bar(MSIX_BAR, Bar(size=MSIX_BAR_SIZE, region=MsixBar(f)))
        self.cap = f.add_capability(pci.PCI_CAP_ID_EXP, bytes(pci.PCI_CAP_EXP_ENDPOINT_SIZEOF_V2 - 2))
        self._init_pcie_capability()
        f.add_msix(1, MSIX_BAR, 0, MSIX_PBA_OFFSET)
        f.config_write_hook = self._config_written

    def _init_pcie_capability(self) -> None:
        f, cap = self.function, self.cap
        f.init_register(
            cap + pci.PCI_EXP_FLAGS,
            2,
            2  # capability version 2
            | pci.PCI_EXP_TYPE_ROOT_PORT << pci.PCI_EXP_FLAGS_TYPE_SHIFT
            | pci.PCI_EXP_FLAGS_SLOT
            | HOTPLUG_VECTOR << pci.PCI_EXP_FLAGS_IRQ_SHIFT,
        )
        f.init_register(cap + pci.PCI_EXP_DEVCAP, 4, pci.PCI_EXP_DEVCAP_RBER)
        f.init_register(cap + pci.PCI_EXP_DEVCTL, 2, 0, writable=0x7FFF)
        f.init_register(cap + pci.PCI_EXP_DEVSTA, 2, 0, write1_to_clear=0x000F)
        f.init_register(
            cap + pci.PCI_EXP_LNKCAP,
            4,
            pci.PCI_EXP_LNKCAP_SLS_2_5GB
            | 1 << pci.PCI_EXP_LNKCAP_MLW_SHIFT
            | pci.PCI_EXP_LNKCAP_DLLLARC
            | (self.port_number & 0xFF) << pci.PCI_EXP_LNKCAP_PN_SHIFT,
        )
        f.init_register(cap + pci.PCI_EXP_LNKCTL, 2, 0, writable=0x0FFB)
        f.init_register(cap + pci.PCI_EXP_LNKSTA, 2, 0)
        f.init_register(
            cap + pci.PCI_EXP_SLTCAP,
            4,
            SLOT_CAPABILITIES | (self.physical_slot & 0x1FFF) << pci.PCI_EXP_SLTCAP_PSN_SHIFT,
        )
        f.init_register(cap + pci.PCI_EXP_SLTCTL, 2, SLOT_CONTROL_RESET, writable=SLOT_CONTROL_WRITABLE)
        f.init_register(cap + pci.PCI_EXP_SLTSTA, 2, 0, write1_to_clear=SLOT_STATUS_EVENTS)
        f.init_register(cap + pci.PCI_EXP_RTCTL, 2, 0, writable=0x001F)
        self._slot_control = SLOT_CONTROL_RESET

    def firmware_setup(
        self, *, primary_bus: int, secondary_bus: int, memory_base: int, memory_limit: int
    ) -> None:
        """What firmware programs before the guest boots: bus numbers and the memory window."""
        f = self.function
        f.config_write(pci.PCI_PRIMARY_BUS, 1, primary_bus)
        f.config_write(pci.PCI_SECONDARY_BUS, 1, secondary_bus)
        f.config_write(pci.PCI_SUBORDINATE_BUS, 1, secondary_bus)
        f.config_write(pci.PCI_MEMORY_BASE, 2, (memory_base >> pci.PCI_MEMORY_RANGE_SHIFT) & 0xFFF0)
        f.config_write(pci.PCI_MEMORY_LIMIT, 2, (memory_limit >> pci.PCI_MEMORY_RANGE_SHIFT) & 0xFFF0)

    # -- state ------------------------------------------------------------------------------

    def _reg(self, offset: int) -> int:
        return self.function.get_register(self.cap + offset, 2)

    def _set_reg(self, offset: int, value: int) -> None:
        self.function.put_register(self.cap + offset, 2, value)

    @property
    def secondary_bus(self) -> int:
        return self.function.get_register(pci.PCI_SECONDARY_BUS, 1)

    @property
    def subordinate_bus(self) -> int:
        return self.function.get_register(pci.PCI_SUBORDINATE_BUS, 1)

    @property
    def slot_control(self) -> int:
        return self._reg(pci.PCI_EXP_SLTCTL)

    @property
    def slot_status(self) -> int:
        return self._reg(pci.PCI_EXP_SLTSTA)

    @property
    def powered(self) -> bool:
        """Power Controller Control says on."""
        return self.slot_control & pci.PCI_EXP_SLTCTL_PCC == pci.PCI_EXP_SLTCTL_PWR_ON

    @property
    def link_up(self) -> bool:
        """Data Link Layer Link Active: a card is present and its slot powered."""
        return self._link_up

    def memory_window(self) -> tuple[int, int] | None:
        """The memory window [base, limit] as programmed, None when closed (base above limit)."""
        f = self.function
        mask, shift = pci.PCI_MEMORY_RANGE_MASK, pci.PCI_MEMORY_RANGE_SHIFT
        base = (f.get_register(pci.PCI_MEMORY_BASE, 2) & mask) << shift
        limit = (f.get_register(pci.PCI_MEMORY_LIMIT, 2) & mask) << shift
        limit |= pci.PCI_MEMORY_WINDOW_GRANULARITY - 1
        return (base, limit) if base <= limit else None

    def forwarded_window(self) -> tuple[int, int] | None:
        """The window the bridge forwards downstream now: open, and Memory Space Enable set."""
        return self.memory_window() if self.function.memory_decode else None

    def reachable_card(self) -> PciFunction | None:
        """The card, while its link is up."""
        return self.card if self._link_up else None

    # -- the secondary bus ----------------------------------------------------------------------

    def downstream_config_read(self, device: int, function: int, offset: int, size: int) -> int:
        card = self.reachable_card()
        if card is None or device != 0 or function != 0:
            return (1 << (8 * size)) - 1 if size in (1, 2, 4) else 0xFFFFFFFF
        return card.config_read(offset, size)

    def downstream_config_write(self, device: int, function: int, offset: int, size: int, value: int) -> None:
        card = self.reachable_card()
        if card is not None and device == 0 and function == 0:
            card.config_write(offset, size, value)

    def _forward_msi(self, address: int, data: int) -> None:
        if self.function.bus_master:  # the bridge forwards upstream memory writes only then
            self._upstream_msi(address, data)

    # -- the operator's hands ----------------------------------------------------------------------

    def insert(self, card: PciFunction) -> None:
        """A card goes into the slot: Presence Detect State, Presence Detect Changed, and the
        link comes up if the slot is powered (Data Link Layer State Changed)."""
        if self.card is not None:
            raise HotplugError(f"hot-plug slot {self.physical_slot} is occupied")
        self.card = card
        card.msi_sink = self._forward_msi
        self._set_status(pci.PCI_EXP_SLTSTA_PDS | pci.PCI_EXP_SLTSTA_PDC)
        self._update_link()
        self._update_interrupt()
        self._on_change()

    def press_attention_button(self) -> None:
        """The operator asks for the card to be released: Attention Button Pressed. The guest
        answers by powering the slot off, which lets the card go."""
        self._set_status(pci.PCI_EXP_SLTSTA_ABP)
        self._update_interrupt()

    def surprise_removal(self) -> PciFunction:
        """The card is pulled out without warning (Hot-Plug Surprise)."""
        card = self.card
        if card is None:
            raise HotplugError(f"hot-plug slot {self.physical_slot} is empty")
        self._remove_card(card)
        return card

    def _remove_card(self, card: PciFunction) -> None:
        """The card leaves: unreachable at once (no configuration cycle, MMIO or MSI gets through),
        its power gone. The change is reported (Presence Detect Changed, Data Link Layer State
        Changed, the owner told) once the card can no longer touch memory: at once, or when a
        virtio device's work in flight has ended, so the guest never frees a buffer that a
        transfer still running would write."""
        self.card = None
        card.msi_sink = None
        card.power_off()
        self._set_reg(pci.PCI_EXP_SLTSTA, self.slot_status & ~pci.PCI_EXP_SLTSTA_PDS)
        link_was_up = self._link_up
        self._link_up = False
        lnksta = self._reg(pci.PCI_EXP_LNKSTA)
        lnksta &= ~(pci.PCI_EXP_LNKSTA_DLLLA | pci.PCI_EXP_LNKSTA_CLS | pci.PCI_EXP_LNKSTA_NLW)
        self._set_reg(pci.PCI_EXP_LNKSTA, lnksta)
        self._on_change()
        device = card.device if isinstance(card, VirtioPciFunction) else None
        if device is None or not device.resetting:
            self._report_removal(card, link_was_up)
            return
        log.info("pcie_slot_removal_waits_for_dma", slot=self.physical_slot)
        task = asyncio.get_running_loop().create_task(self._report_when_idle(device, card, link_was_up))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report_when_idle(self, device: VirtioDevice, card: PciFunction, link_was_up: bool) -> None:
        await device.reset_done()
        self._report_removal(card, link_was_up)

    def _report_removal(self, card: PciFunction, link_was_up: bool) -> None:
        events = pci.PCI_EXP_SLTSTA_PDC | (pci.PCI_EXP_SLTSTA_DLLSC if link_was_up else 0)
        self._set_status(events)
        self._update_interrupt()
        self._on_removed(self, card)

    @property
    def removals_in_progress(self) -> int:
        """Cards gone whose removal is not reported yet (their device still ending its work)."""
        return len(self._reports)

    def _set_status(self, bits: int) -> None:
        self._set_reg(pci.PCI_EXP_SLTSTA, self.slot_status | bits)

    def _update_link(self) -> None:
        up = self.card is not None and self.powered
        if up == self._link_up:
            return
        self._link_up = up
        lnksta = self._reg(pci.PCI_EXP_LNKSTA)
        if up:
            width = 1 << pci.PCI_EXP_LNKSTA_NLW_SHIFT  # x1 at 2.5 GT/s
            lnksta |= pci.PCI_EXP_LNKSTA_DLLLA | pci.PCI_EXP_LNKCAP_SLS_2_5GB | width
        else:
            lnksta &= ~(pci.PCI_EXP_LNKSTA_DLLLA | pci.PCI_EXP_LNKSTA_CLS | pci.PCI_EXP_LNKSTA_NLW)
        self._set_reg(pci.PCI_EXP_LNKSTA, lnksta)
        self._set_status(pci.PCI_EXP_SLTSTA_DLLSC)

    # -- software's writes ---------------------------------------------------------------------

    def _config_written(self, offset: int, size: int, value: int) -> None:
        if _overlaps(offset, size, self.cap + pci.PCI_EXP_SLTCTL, 2):
            self._slot_control_written()
        self._update_interrupt()  # RW1C writes to Slot Status may have lowered it

    def _slot_control_written(self) -> None:
        old, new = self._slot_control, self.slot_control
        self._slot_control = new
        changed = old ^ new
        card = self.card
        if changed & pci.PCI_EXP_SLTCTL_PCC:
            if not self.powered and card is not None:
                log.info("pcie_slot_powered_off", slot=self.physical_slot)
                self._remove_card(card)
            else:
                self._update_link()
                self._on_change()
        # Each Slot Control write is a command; it completes at once.
        self._set_status(pci.PCI_EXP_SLTSTA_CC)

    def _update_interrupt(self) -> None:
        control = self.slot_control
        status = self.slot_status
        pending = any(status & event and control & enable for event, enable in EVENT_ENABLES)
        asserted = bool(control & pci.PCI_EXP_SLTCTL_HPIE) and pending
        if asserted and not self._asserted:
            self.interrupts_sent += 1
            self.function.msix_notify(HOTPLUG_VECTOR)
        self._asserted = asserted
