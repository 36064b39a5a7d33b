"""The guest's PCI Express hot-plug driver against the machine's root ports: cards inserted,
released with the attention button, pulled by surprise, and a random mix of all of them.

Everything is awaited on events (the driver's own "settled" and "arrived"/"removed"), never on
time: the presence debounce and the link settle time are zero here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from device.blk import BlkConfig, VirtioBlkDevice, plug_blk
from device.block.faults import FaultLayer, FaultPlan
from device.block.memory import MemoryNode
from device.block.node import BlockNode, blocking_call
from device.machine import ROOT_PORT_FIRST_DEVICE, HotplugError, Machine
from device.memory import GuestMemory
from device.pci import Bar, MsixBar
from device.virtio_pci import VirtioPciFunction
from driver.blk import BlkResetError, VirtioBlk
from driver.guest import Guest
from driver.pciehp import HotplugTiming, PciehpError

MiB = 1 << 20
SECTOR = 512
EXP = 0x40
INSTANT = HotplugTiming(debounce=0, link_settle=0)


@dataclasses.dataclass
class HotplugRig:
    machine: Machine
    guest: Guest
    boot: VirtioBlkDevice
    boot_disk: VirtioBlk
    cards: list[VirtioBlkDevice] = dataclasses.field(default_factory=list)

    def card(
        self, config: BlkConfig | None = None, node: BlockNode | None = None
    ) -> tuple[VirtioBlkDevice, VirtioPciFunction]:
        device = VirtioBlkDevice(self.machine.memory, node or MemoryNode(MiB), config or BlkConfig())
        self.cards.append(device)
        return device, VirtioPciFunction(device)

    async def settle(self) -> None:
        """Let the interrupts raised so far arrive, then wait until every slot handled them."""
        for _ in range(3):
            await asyncio.sleep(0)
        for number in self.guest.hotplug.slots:
            await self.guest.hotplug.settled(number)

    async def close(self) -> None:
        await self.guest.close()
        self.boot.close()
        for device in self.cards:
            device.close()


async def make_hotplug_rig(ports: int = 2, **options: Any) -> HotplugRig:
    machine = Machine(GuestMemory(64 * MiB), hotplug_ports=ports)
    boot = plug_blk(machine, MemoryNode(MiB))
    guest = Guest(machine, hotplug_timing=INSTANT)
    [boot_disk] = await guest.probe(**options)
    rig = HotplugRig(machine, guest, boot, boot_disk)
    await rig.settle()
    return rig


@pytest.fixture
async def hp() -> Any:
    rig = await make_hotplug_rig()
    try:
        yield rig
    finally:
        await rig.close()


async def test_probe_finds_the_slots_and_powers_the_empty_ones_off(hp: HotplugRig) -> None:
    assert sorted(hp.guest.hotplug.slots) == [1, 2]
    slot = hp.guest.hotplug.slots[1]
    assert slot.bus == 1 and slot.port.address == (0, ROOT_PORT_FIRST_DEVICE, 0)
    assert slot.vector_data is not None
    assert not hp.machine.root_ports[0].powered
    control = hp.machine.root_ports[0].slot_control
    assert control & 0x1029 == 0x1029  # DLLSCE, HPIE, PDCE, ABPE
    assert hp.boot_disk.pci_address == (0, 4, 0)


async def test_an_inserted_card_is_bound_and_serves_io_through_the_rings(hp: HotplugRig) -> None:
    device, fn = hp.card()
    slot = hp.machine.hotplug(fn)
    disk = await hp.guest.hotplug.arrived(slot)
    assert disk.pci_address == (slot, 0, 0)  # bus 1 is slot 1's secondary bus
    assert disk.name == "1:0.0"
    window = hp.machine.root_ports[0].memory_window()
    assert window is not None
    assert all(window[0] <= bar.address < window[1] for bar in fn.bars.values())
    data = os.urandom(4 * SECTOR)
    delivered = hp.machine.lapic.statistics.delivered
    await disk.write(8, data)
    assert await disk.read(8, len(data)) == data
    stored = bytearray(len(data))
    blocking_call(device.node.readv, 8 * SECTOR, [memoryview(stored)])
    assert stored == data
    assert hp.machine.lapic.statistics.delivered > delivered  # completions came by MSI-X
    assert device.stats.kicks > 0
    assert await hp.boot_disk.read(0, SECTOR) == bytes(SECTOR)
    assert hp.guest.hotplug.disks == {slot: disk}


async def test_the_attention_button_unbinds_the_driver_and_frees_the_slot(hp: HotplugRig) -> None:
    device, fn = hp.card()
    slot = hp.machine.hotplug(fn)
    disk = await hp.guest.hotplug.arrived(slot)
    await disk.write(0, b"\xab" * SECTOR)
    vectors = hp.machine.lapic.vectors_in_use
    released = hp.machine.request_unplug(slot)
    assert await released is fn
    await hp.guest.hotplug.removed(slot)
    assert hp.guest.hotplug.disks == {}
    assert hp.machine.hotplug_card(slot) is None
    assert not hp.machine.root_ports[slot - 1].powered
    assert hp.machine.lapic.vectors_in_use == vectors - 2  # config and queue vectors
    assert device.status == 0
    with pytest.raises(BlkResetError):
        await disk.read(0, SECTOR)
    assert hp.machine.hotplug(hp.card()[1]) == slot  # free again


async def test_surprise_removal_fails_the_requests_in_flight_and_nothing_else(hp: HotplugRig) -> None:
    device, fn = hp.card()
    slot = hp.machine.hotplug(fn)
    disk = await hp.guest.hotplug.arrived(slot)
    _, other_fn = hp.card()
    other_slot = hp.machine.hotplug(other_fn)
    other = await hp.guest.hotplug.arrived(other_slot)
    await device.quiesce()  # the device takes no request from its ring: they stay in flight
    reads = [asyncio.ensure_future(disk.read(i, SECTOR)) for i in range(8)]
    while disk.statistics().queues[0].inflight < len(reads):
        await asyncio.sleep(0)
    hp.machine.surprise_unplug(slot)
    await hp.guest.hotplug.removed(slot)
    results = await asyncio.gather(*reads, return_exceptions=True)
    assert all(isinstance(result, BlkResetError) for result in results), results
    assert "device removed" in str(results[0])
    device.resume()
    assert hp.machine.hotplug_card(slot) is None
    assert not hp.machine.root_ports[slot - 1].powered  # the driver switched the empty slot off
    await other.write(3, b"\x11" * SECTOR)
    assert await other.read(3, SECTOR) == b"\x11" * SECTOR
    await hp.boot_disk.write(3, b"\x22" * SECTOR)
    assert await hp.boot_disk.read(3, SECTOR) == b"\x22" * SECTOR
    assert hp.guest.hotplug.disks == {other_slot: other}


async def test_a_pulled_card_is_reported_gone_only_once_its_transfers_have_ended(hp: HotplugRig) -> None:
    plan = FaultPlan(delay=0.05)
    device, fn = hp.card(BlkConfig(io_mode="thread"), FaultLayer(MemoryNode(MiB), plan))
    slot = hp.machine.hotplug(fn)
    disk = await hp.guest.hotplug.arrived(slot)
    busy_when_reported: list[bool] = []
    hp.machine.unplug_listeners.append(lambda _slot, _fn: busy_when_reported.append(device.busy))
    reads = [asyncio.ensure_future(disk.read(i, SECTOR)) for i in range(4)]
    while not device.busy:  # a worker thread is inside the slow read
        await asyncio.sleep(0.001)
    hp.machine.surprise_unplug(slot)
    assert hp.machine.root_ports[slot - 1].removals_in_progress == 1
    assert hp.machine.pci_config_read(0, 0, 0, 2, bus=slot) == 0xFFFF  # unreachable at once
    await hp.guest.hotplug.removed(slot)
    assert busy_when_reported == [False]
    results = await asyncio.gather(*reads, return_exceptions=True)
    assert all(isinstance(result, BlkResetError) for result in results), results
    assert hp.machine.root_ports[slot - 1].removals_in_progress == 0


async def test_a_request_waiting_for_the_button_completes_on_a_surprise_removal(hp: HotplugRig) -> None:
    _, fn = hp.card()
    slot = hp.machine.hotplug(fn)
    await hp.guest.hotplug.arrived(slot)
    hp.machine.surprise_unplug(slot)
    await hp.guest.hotplug.removed(slot)
    with pytest.raises(HotplugError):
        hp.machine.request_unplug(slot)  # nothing left to release


async def test_two_hundred_plug_cycles_leak_nothing(hp: HotplugRig) -> None:
    loop = asyncio.get_running_loop()
    baseline: tuple[int, ...] | None = None
    bars: dict[int, int] | None = None
    for cycle in range(200):
        device, fn = hp.card()
        slot = hp.machine.hotplug(fn)
        disk = await hp.guest.hotplug.arrived(slot)
        await disk.write(cycle % 64, bytes([cycle & 0xFF]) * SECTOR)
        placed = {index: bar.address for index, bar in fn.bars.items()}
        assert bars is None or placed == bars  # the same addresses in the same window
        bars = placed
        if cycle % 2:
            await hp.machine.request_unplug(slot)
        else:
            hp.machine.surprise_unplug(slot)
        await hp.guest.hotplug.removed(slot)
        device.close()
        hp.cards.remove(device)
        state = (
            hp.guest.dma.free_bytes,
            hp.machine.lapic.vectors_in_use,
            len(asyncio.all_tasks(loop)),
            hp.machine._next_mmio,
            len(hp.machine._decoded),
        )
        if baseline is None:
            baseline = state
        assert state == baseline, (cycle, state, baseline)
    stats = hp.guest.hotplug.slots[1].statistics
    assert stats.bound == stats.unbound == 200
    assert stats.surprise_removals == 100


@pytest.mark.parametrize("seed", range(4))
async def test_spurious_interrupts_and_garbage_in_port_registers_do_not_crash(
    hp: HotplugRig, seed: int
) -> None:
    rng = random.Random(seed)
    slot1 = hp.guest.hotplug.slots[1]
    slot2 = hp.guest.hotplug.slots[2]
    assert slot1.vector_data is not None and slot2.vector_data is not None
    for _ in range(20):  # spurious: the message arrives, no status bit is set
        hp.machine.lapic.msi_write(0xFEE0_0000, slot1.vector_data)
    await hp.settle()
    assert slot1.statistics.spurious_interrupts >= 20
    port2 = ROOT_PORT_FIRST_DEVICE + 1
    registers = [(0x18, 1), (0x19, 1), (0x1A, 1), (0x1C, 2), (0x1E, 2), (0x20, 2), (0x22, 2)]
    registers += [(0x24, 4), (0x28, 4), (0x2C, 4), (0x3C, 2), (0x3E, 2), (0x04, 2)]
    registers += [(EXP + offset, size) for offset, size in [(0x08, 2), (0x10, 2), (0x18, 2), (0x1A, 2)]]
    registers += [(EXP + 0x18, 4), (EXP + 0x1C, 2), (0x7C + 2, 2)]
    for _ in range(200):
        offset, size = rng.choice(registers)
        hp.machine.pci_config_write(port2, 0, offset, size, rng.getrandbits(8 * size))
        if rng.random() < 0.2:
            hp.machine.lapic.msi_write(0xFEE0_0000, slot2.vector_data)
    await hp.settle()
    assert slot2.task is not None and not slot2.task.done()
    # The other slot works as before.
    _, fn = hp.card()
    assert hp.machine.hotplug(fn) == 1
    disk = await hp.guest.hotplug.arrived(1)
    await disk.write(1, b"\x5a" * SECTOR)
    assert await disk.read(1, SECTOR) == b"\x5a" * SECTOR
    await hp.machine.request_unplug(1)
    await hp.guest.hotplug.removed(1)


async def test_a_card_without_a_driver_is_refused_and_released(hp: HotplugRig) -> None:
    _, fn = hp.card()
    fn.init_register(0x02, 2, 0x1001)  # another virtio device type: no driver for it here
    released: list[int] = []
    hp.machine.unplug_listeners.append(lambda slot, _function: released.append(slot))
    slot = hp.machine.hotplug(fn)
    with pytest.raises(PciehpError):
        await hp.guest.hotplug.arrived(slot)
    await hp.guest.hotplug.settled(slot)
    assert released == [slot]
    assert hp.machine.hotplug_card(slot) is None


async def test_a_card_too_big_for_the_window_is_refused_and_released(hp: HotplugRig) -> None:
    _, fn = hp.card()
    fn.add_bar(2, Bar(size=4 * MiB, region=MsixBar(fn)))  # the window is 2 MiB
    slot = hp.machine.hotplug(fn)
    with pytest.raises(PciehpError, match="window"):
        await hp.guest.hotplug.arrived(slot)
    await hp.guest.hotplug.settled(slot)
    assert hp.machine.hotplug_card(slot) is None
    assert hp.guest.hotplug.disks == {}


async def test_ports_firmware_left_unusable_are_skipped_with_a_log_line() -> None:
    machine = Machine(GuestMemory(16 * MiB), hotplug_ports=3)
    second, third = ROOT_PORT_FIRST_DEVICE + 1, ROOT_PORT_FIRST_DEVICE + 2
    machine.pci_config_write(second, 0, 0x22, 2, 0)  # memory limit below base: no window
    machine.pci_config_write(third, 0, 0x19, 1, 0)  # no secondary bus: the driver numbers it
    guest = Guest(machine, hotplug_timing=INSTANT)
    device = VirtioBlkDevice(machine.memory, MemoryNode(MiB), BlkConfig())
    try:
        assert await guest.probe() == []
        assert sorted(guest.hotplug.slots) == [1, 3]
        # The next bus number no bridge claims (the skipped port still claims bus 2).
        assert guest.hotplug.slots[3].bus == 3
        assert machine.pci_config_read(third, 0, 0x19, 1) == 3
        assert machine.hotplug(VirtioPciFunction(device)) == 1
        disk = await guest.hotplug.arrived(1)
        assert await disk.read(0, SECTOR) == bytes(SECTOR)
    finally:
        await guest.close()
        device.close()


async def test_guest_close_releases_the_hotplug_slots() -> None:
    rig = await make_hotplug_rig()
    vectors_before_cards = rig.machine.lapic.vectors_in_use
    _, fn = rig.card()
    slot = rig.machine.hotplug(fn)
    await rig.guest.hotplug.arrived(slot)
    await rig.close()
    assert rig.machine.lapic.vectors_in_use == 0
    assert vectors_before_cards == 2 + 2  # the boot disk's two, one per slot
    assert all(slot.task is None for slot in rig.guest.hotplug.slots.values())


class HotplugModel(RuleBasedStateMachine):
    """Random inserts, attention-button requests, surprise removals and power writes behind
    the driver's back; after each, once the driver has settled: a bound disk in a slot iff a
    card is present there and its slot powered, and every bound disk serves I/O."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.rig: HotplugRig | None = None
        self.baseline: tuple[int, int] = (0, 0)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @initialize()
    def boot(self) -> None:
        self.rig = self.run(make_hotplug_rig(ports=3))
        self.baseline = (self.rig.guest.dma.free_bytes, self.rig.machine.lapic.vectors_in_use)

    def teardown(self) -> None:
        if self.rig is not None:
            rig = self.rig
            self.run(self.drain(rig))
            assert (rig.guest.dma.free_bytes, rig.machine.lapic.vectors_in_use) == self.baseline
            self.run(rig.close())
        self.loop.close()

    async def drain(self, rig: HotplugRig) -> None:
        for index, port in enumerate(rig.machine.root_ports):
            if port.card is not None:
                rig.machine.surprise_unplug(index + 1)
        await rig.settle()

    # The machine's hands run on the loop: the interrupts they raise are deferred work there.

    @rule()
    def insert(self) -> None:
        assert self.rig is not None
        rig = self.rig

        async def insert() -> None:
            _, fn = rig.card(BlkConfig(queue_size=8))
            try:
                rig.machine.hotplug(fn)
            except HotplugError:
                pass  # every slot taken, or one left powered by a power write
            await rig.settle()

        self.run(insert())

    @rule(slot=st.integers(1, 3))
    def button(self, slot: int) -> None:
        assert self.rig is not None
        rig = self.rig

        async def button() -> None:
            if rig.machine.hotplug_card(slot) is None:
                return
            released = rig.machine.request_unplug(slot)
            await rig.settle()
            assert released.done()

        self.run(button())

    @rule(slot=st.integers(1, 3))
    def surprise(self, slot: int) -> None:
        assert self.rig is not None
        rig = self.rig

        async def surprise() -> None:
            if rig.machine.hotplug_card(slot) is not None:
                rig.machine.surprise_unplug(slot)
            await rig.settle()

        self.run(surprise())

    @rule(slot=st.integers(1, 3), on=st.booleans())
    def power_write(self, slot: int, on: bool) -> None:
        """Software other than the driver writes Power Controller Control."""
        assert self.rig is not None
        rig = self.rig
        device = ROOT_PORT_FIRST_DEVICE + slot - 1

        async def power_write() -> None:
            control = rig.machine.pci_config_read(device, 0, EXP + 0x18, 2)
            control = control & ~0x0400 if on else control | 0x0400
            rig.machine.pci_config_write(device, 0, EXP + 0x18, 2, control)
            await rig.settle()

        self.run(power_write())

    @precondition(lambda self: self.rig is not None and bool(self.rig.guest.hotplug.disks))
    @rule(data=st.data())
    def io(self, data: st.DataObject) -> None:
        assert self.rig is not None
        disks = self.rig.guest.hotplug.disks
        disk = disks[data.draw(st.sampled_from(sorted(disks)))]
        payload = bytes([data.draw(st.integers(0, 255))]) * SECTOR
        self.run(disk.write(5, payload))
        assert self.run(disk.read(5, SECTOR)) == payload

    @invariant()
    def bound_iff_powered_and_present(self) -> None:
        if self.rig is None:
            return
        for index, port in enumerate(self.rig.machine.root_ports):
            slot = self.rig.guest.hotplug.slots[index + 1]
            assert (slot.disk is not None) == (port.card is not None and port.powered), (
                index + 1,
                slot.disk,
                port.card,
                port.powered,
            )


HotplugModel.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
test_hotplug_model = HotplugModel.TestCase
