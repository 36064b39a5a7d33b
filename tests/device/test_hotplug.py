"""The PCI Express root port and its hot-plug slot, seen through configuration space and MMIO.

No guest driver here: the tests play the OS by hand (config cycles, MSI-X table writes) and
the operator through the machine's hot-plug calls. Register offsets and bits are written as
numbers from the PCIe Base Specification (what lspci decodes), not through device.spec, so a
wrong constant there shows.
"""

from __future__ import annotations

import asyncio

import pytest

from device.blk import BlkConfig, VirtioBlkDevice, plug_blk
from device.block.memory import MemoryNode
from device.machine import MMIO_WINDOW_END, ROOT_PORT_FIRST_DEVICE, HotplugError, Machine
from device.memory import GuestMemory
from device.pci import PciFunction
from device.virtio_pci import VirtioPciFunction

MiB = 1 << 20
PORT = ROOT_PORT_FIRST_DEVICE  # 0:16.0, slot 1
EXP = 0x40  # the PCI Express capability, first in the list


def card(machine: Machine) -> tuple[VirtioBlkDevice, VirtioPciFunction]:
    device = VirtioBlkDevice(machine.memory, MemoryNode(MiB), BlkConfig())
    return device, VirtioPciFunction(device)


class Os:
    """Configuration cycles and MMIO the way an OS issues them."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def cfg(self, offset: int, size: int, device: int = PORT, bus: int = 0) -> int:
        return self.machine.pci_config_read(device, 0, offset, size, bus)

    def wcfg(self, offset: int, size: int, value: int, device: int = PORT, bus: int = 0) -> None:
        self.machine.pci_config_write(device, 0, offset, size, value, bus)

    def capabilities(self, device: int = PORT, bus: int = 0) -> list[tuple[int, int]]:
        out = []
        offset = self.cfg(0x34, 1, device, bus)
        while offset:
            out.append((offset, self.cfg(offset, 1, device, bus)))
            offset = self.cfg(offset + 1, 1, device, bus)
        return out

    def slot_status(self) -> int:
        return self.cfg(EXP + 0x1A, 2)

    def slot_control(self, value: int) -> None:
        self.wcfg(EXP + 0x18, 2, value)


@pytest.fixture
def machine() -> Machine:
    return Machine(GuestMemory(16 * MiB), hotplug_ports=2)


def lspci_sltcap(value: int) -> str:
    """The SltCap line of ``lspci -vvv`` (pciutils ls-caps.c, cap_express_slot)."""
    flags = [("AttnBtn", 0x1), ("PwrCtrl", 0x2), ("MRL", 0x4), ("AttnInd", 0x8), ("PwrInd", 0x10)]
    flags += [("HotPlug", 0x40), ("Surprise", 0x20)]
    text = " ".join(f"{name}{'+' if value & bit else '-'}" for name, bit in flags)
    return f"{text} Slot #{value >> 19} NoCompl{'+' if value & 0x40000 else '-'}"


def test_root_port_config_space_as_lspci_decodes_it(machine: Machine) -> None:
    os_ = Os(machine)
    assert (os_.cfg(0x00, 2), os_.cfg(0x02, 2)) == (0x1B36, 0x000C)  # QEMU's pcie-root-port
    assert os_.cfg(0x0A, 2) == 0x0604  # PCI bridge
    assert os_.cfg(0x0E, 1) & 0x7F == 1  # type 1 header
    # Bus: primary=00, secondary=01, subordinate=01 (and 02 for the second port).
    assert (os_.cfg(0x18, 1), os_.cfg(0x19, 1), os_.cfg(0x1A, 1)) == (0, 1, 1)
    assert os_.cfg(0x19, 1, device=PORT + 1) == 2
    # Memory behind bridge: a 2 MiB window at the top of the MMIO hole, port by port.
    base = (os_.cfg(0x20, 2) & 0xFFF0) << 16
    limit = (os_.cfg(0x22, 2) & 0xFFF0) << 16 | 0xFFFFF
    assert (base, limit) == (MMIO_WINDOW_END - 4 * MiB, MMIO_WINDOW_END - 2 * MiB - 1)
    # No I/O and no prefetchable window: both read 0.
    assert os_.cfg(0x1C, 2) == 0 and os_.cfg(0x24, 4) == 0
    assert os_.cfg(0x06, 2) & 0x10  # capability list
    caps = os_.capabilities()
    assert caps == [(0x40, 0x10), (0x7C, 0x11)]  # Express, then MSI-X
    # Express (v2) Root Port (Slot+), MSI 00
    flags = os_.cfg(EXP + 0x02, 2)
    assert flags & 0xF == 2 and (flags >> 4) & 0xF == 4 and flags & 0x100 and (flags >> 9) & 0x1F == 0
    # LnkCap: Port #0, Speed 2.5GT/s, Width x1, DLActive reporting
    lnkcap = os_.cfg(EXP + 0x0C, 4)
    assert lnkcap & 0xF == 1 and (lnkcap >> 4) & 0x3F == 1 and lnkcap & 0x100000 and lnkcap >> 24 == 0
    assert os_.cfg(EXP + 0x0C, 4, device=PORT + 1) >> 24 == 1
    assert lspci_sltcap(os_.cfg(EXP + 0x14, 4)) == (
        "AttnBtn+ PwrCtrl+ MRL- AttnInd+ PwrInd+ HotPlug+ Surprise+ Slot #1 NoCompl-"
    )
    assert os_.cfg(EXP + 0x14, 4, device=PORT + 1) >> 19 == 2
    # SltCtl: AttnInd Off, PwrInd Off, Power- (PCC set), no interrupt enabled.
    assert os_.cfg(EXP + 0x18, 2) == 0x00C0 | 0x0300 | 0x0400
    assert os_.slot_status() == 0  # PresDet-, no change bits
    assert os_.cfg(EXP + 0x12, 2) & 0x2000 == 0  # LnkSta: DLActive-
    # MSI-X: Count=1, table and PBA in BAR 0, which firmware assigned below the windows.
    msix = 0x7C
    assert os_.cfg(msix + 2, 2) & 0x7FF == 0
    assert os_.cfg(msix + 4, 4) == 0 and os_.cfg(msix + 8, 4) == 0x800
    assert 0 < os_.cfg(0x10, 4) & ~0xF < MMIO_WINDOW_END - 4 * MiB


def test_slot_registers_honour_rw1c_and_read_only_bits(machine: Machine) -> None:
    os_ = Os(machine)
    _, fn = card(machine)
    assert machine.hotplug(fn) == 1
    assert os_.slot_status() == 0x0040 | 0x0008  # PresDet+, PresDetChg+
    os_.wcfg(EXP + 0x1A, 2, 0)  # writing 0 clears nothing
    assert os_.slot_status() == 0x0048
    os_.wcfg(EXP + 0x1A, 2, 0xFFFF)  # writing 1s clears the change bits, never the state
    assert os_.slot_status() == 0x0040
    os_.wcfg(EXP + 0x14, 4, 0)  # Slot Capabilities are read-only
    assert os_.cfg(EXP + 0x14, 4) >> 19 == 1
    os_.wcfg(EXP + 0x02, 2, 0)
    assert os_.cfg(EXP + 0x02, 2) & 0xF == 2
    # Every Slot Control write is a command, completed at once.
    os_.slot_control(0x07C0)
    assert os_.slot_status() & 0x0010
    os_.wcfg(EXP + 0x1A, 2, 0x0010)
    assert not os_.slot_status() & 0x0010


def test_power_brings_the_link_up_and_the_card_onto_the_secondary_bus(machine: Machine) -> None:
    os_ = Os(machine)
    _, fn = card(machine)
    machine.hotplug(fn)
    assert os_.cfg(0x00, 2, device=0, bus=1) == 0xFFFF  # powered off: nothing answers
    os_.wcfg(EXP + 0x1A, 2, 0xFFFF)
    os_.slot_control(0x01C0)  # PCC on, power indicator on
    assert os_.cfg(EXP + 0x12, 2) & 0x2000  # DLActive+
    assert os_.slot_status() & 0x0100  # DLL state changed
    assert os_.cfg(0x00, 2, device=0, bus=1) == 0x1AF4
    assert os_.cfg(0x00, 2, device=1, bus=1) == 0xFFFF  # only device 0 on a link
    assert os_.cfg(0x00, 2, device=0, bus=3) == 0xFFFF  # no bridge claims bus 3
    assert os_.cfg(0x00, 2, device=0, bus=2) == 0xFFFF  # the other slot is empty


def test_power_off_lets_the_card_go_and_tells_the_owner(machine: Machine) -> None:
    os_ = Os(machine)
    device, fn = card(machine)
    removed: list[tuple[int, PciFunction]] = []
    machine.unplug_listeners.append(lambda slot, function: removed.append((slot, function)))
    slot = machine.hotplug(fn)
    os_.slot_control(0x01C0)
    os_.wcfg(0x04, 2, 0x6, device=0, bus=1)
    assert fn.memory_decode
    os_.slot_control(0x07C0)  # PCC off
    assert removed == [(slot, fn)]
    assert machine.hotplug_card(slot) is None
    assert not os_.slot_status() & 0x0040 and os_.slot_status() & 0x0108  # PDC and DLLSC
    assert not os_.cfg(EXP + 0x12, 2) & 0x2000
    assert not fn.memory_decode  # power gone: the function is back at its reset values
    assert device.status == 0
    assert machine.hotplug(card(machine)[1]) == slot  # empty and off: free again


def test_no_free_slot_and_empty_slots_are_refused(machine: Machine) -> None:
    machine.hotplug(card(machine)[1])
    machine.hotplug(card(machine)[1])
    with pytest.raises(HotplugError):
        machine.hotplug(card(machine)[1])
    with pytest.raises(HotplugError):
        machine.surprise_unplug(3)
    machine.surprise_unplug(2)
    with pytest.raises(HotplugError):
        machine.surprise_unplug(2)
    assert Machine(GuestMemory(MiB)).root_ports == []  # the default machine has none


async def test_hotplug_interrupt_is_an_msix_message_on_each_rising_edge(machine: Machine) -> None:
    os_ = Os(machine)
    fired: list[int] = []
    address, data = machine.lapic.allocate_vector(lambda: fired.append(1))
    bar0 = os_.cfg(0x10, 4) & ~0xF
    os_.wcfg(0x04, 2, 0x6)  # memory decoding (for the MSI-X table) and bus mastering
    machine.mmio_write(bar0 + 0, 4, address)
    machine.mmio_write(bar0 + 8, 4, data)
    machine.mmio_write(bar0 + 12, 4, 0)
    os_.wcfg(0x7C + 2, 2, 0x8000)  # MSI-X enable
    os_.slot_control(0x0020 | 0x0008 | 0x07C0)  # HPIE, PDCE (power off, indicators off)
    os_.wcfg(EXP + 0x1A, 2, 0xFFFF)
    machine.hotplug(card(machine)[1])
    await asyncio.sleep(0)
    assert fired == [1]
    machine.surprise_unplug(1)  # PDC still set: no new message (MSI is edge-triggered)
    await asyncio.sleep(0)
    assert fired == [1]
    os_.wcfg(EXP + 0x1A, 2, 0x0008)
    machine.hotplug(card(machine)[1])
    await asyncio.sleep(0)
    assert fired == [1, 1]
    os_.wcfg(EXP + 0x1A, 2, 0x0008)
    future = machine.request_unplug(1)  # ABP, but ABPE is off
    await asyncio.sleep(0)
    assert fired == [1, 1] and os_.slot_status() & 0x0001
    os_.slot_control(0x0020 | 0x0008 | 0x0001 | 0x07C0)  # enabling ABPE with ABP pending fires
    await asyncio.sleep(0)
    assert fired == [1, 1, 1]
    assert not future.done()
    os_.wcfg(EXP + 0x1A, 2, 0xFFFF)
    os_.slot_control(0x0020 | 0x0008 | 0x0001 | 0x07C0)  # power stays off: nothing to release yet
    assert not future.done()
    os_.slot_control(0x0020 | 0x0008 | 0x0001 | 0x01C0)  # on ...
    os_.slot_control(0x0020 | 0x0008 | 0x0001 | 0x07C0)  # ... and off: the card goes
    assert future.done() and machine.hotplug_card(1) is None


def test_mmio_reaches_a_card_only_through_an_enabled_bridge_window(machine: Machine) -> None:
    os_ = Os(machine)
    _, fn = card(machine)
    machine.hotplug(fn)
    os_.slot_control(0x01C0)
    window = (os_.cfg(0x20, 2) & 0xFFF0) << 16
    # BAR 1 (MSI-X, 4 KiB) and BAR 4 (64-bit, 16 KiB) inside the window.
    os_.wcfg(0x14, 4, window, device=0, bus=1)
    os_.wcfg(0x20, 4, window + 0x4000, device=0, bus=1)
    os_.wcfg(0x24, 4, 0, device=0, bus=1)
    os_.wcfg(0x04, 2, 0x6, device=0, bus=1)
    common = window + 0x4000
    num_queues = 0x12  # virtio common config: num_queues
    assert machine.mmio_read(common + num_queues, 2) == 0xFFFF  # bridge memory space off
    os_.wcfg(0x04, 2, 0x6)
    assert machine.mmio_read(common + num_queues, 2) == 1
    os_.wcfg(0x04, 2, 0x0, device=0, bus=1)  # the card's own decode off
    assert machine.mmio_read(common + num_queues, 2) == 0xFFFF
    os_.wcfg(0x04, 2, 0x6, device=0, bus=1)
    os_.wcfg(0x22, 2, 0)  # limit below base: the window closes
    assert machine.mmio_read(common + num_queues, 2) == 0xFFFF
    os_.wcfg(0x22, 2, os_.cfg(0x20, 2) + 0x10)
    assert machine.mmio_read(common + num_queues, 2) == 1
    # A BAR outside the window is not forwarded.
    os_.wcfg(0x20, 4, window + 2 * MiB, device=0, bus=1)
    assert machine.mmio_read(window + 2 * MiB + num_queues, 2) == 0xFFFF


def test_the_bus0_path_of_plug_and_unplug_is_unchanged() -> None:
    machine = Machine(GuestMemory(16 * MiB), hotplug_ports=1)
    device = plug_blk(machine, MemoryNode(MiB))
    assert device.pci_slot == 4
    assert machine.pci_config_read(4, 0, 0, 2) == 0x1AF4
    assert machine.pci_config_read(PORT, 0, 0, 2) == 0x1B36
    machine.unplug(4)
    assert machine.pci_config_read(4, 0, 0, 2) == 0xFFFF
