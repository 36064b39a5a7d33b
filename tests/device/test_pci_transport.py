"""The virtio-blk PCI function seen from a driver: configuration space, BARs, virtio-pci
registers, ISR, notifications and MSI-X.

Every access goes through the machine (PCI configuration cycles and physical MMIO), the
way a kernel driver sees the device; addresses come from walking the capability list.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from device.blk import BlkConfig, VirtioBlkDevice, plug_blk
from device.block.memory import MemoryNode
from device.block.node import blocking_call
from device.machine import Machine
from device.memory import GuestMemory
from device.spec import pci
from device.spec import virtio_blk as vb
from device.spec import virtio_pci as vp
from device.spec.virtio import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_MSI_NO_VECTOR,
)
from device.spec.virtio_blk import Status
from tests.device.ring import Heap, RingWriter, in_request, settle

SECTOR = 512
DISK = 1 << 20
NUM_QUEUES = 2
QUEUE_SIZE = 16


class PciBench:
    """A machine with one virtio-blk function, driven by hand through config space and MMIO."""

    def __init__(self, config: BlkConfig | None = None) -> None:
        self.memory = GuestMemory(1 << 20)
        self.machine = Machine(self.memory)
        self.backend = MemoryNode(DISK)
        self.device: VirtioBlkDevice = plug_blk(
            self.machine, self.backend, config or BlkConfig(num_queues=NUM_QUEUES, queue_size=QUEUE_SIZE)
        )
        [(self.slot, _fn)] = self.machine.bus.functions
        self.cfg_write(pci.PCI_COMMAND, 2, pci.PCI_COMMAND_MEMORY | pci.PCI_COMMAND_MASTER)
        self.caps = self.capabilities()
        self.virtio: dict[int, tuple[int, int, int]] = {}  # cfg_type -> (cap offset, address, length)
        for offset, cap_id in self.caps:
            if cap_id == pci.PCI_CAP_ID_VNDR:
                raw = bytes(self.cfg_read(offset + k, 1) for k in range(vp.VIRTIO_PCI_CAP_LEN))
                _vndr, _next, _len, cfg_type, bar, _id, cap_offset, length = vp.VIRTIO_PCI_CAP.unpack(raw)
                self.virtio[cfg_type] = (offset, self.bar_address(bar) + cap_offset, length)
        self.msix_cap = next(off for off, cap_id in self.caps if cap_id == pci.PCI_CAP_ID_MSIX)
        table = self.cfg_read(self.msix_cap + pci.PCI_MSIX_TABLE, 4)
        pba = self.cfg_read(self.msix_cap + pci.PCI_MSIX_PBA, 4)
        self.msix_table = self.bar_address(table & pci.PCI_MSIX_BIR_MASK) + (table & ~pci.PCI_MSIX_BIR_MASK)
        self.msix_pba = self.bar_address(pba & pci.PCI_MSIX_BIR_MASK) + (pba & ~pci.PCI_MSIX_BIR_MASK)
        self.heap = Heap(self.memory.base + 0x10000, self.memory.end)

    # -- configuration space ---------------------------------------------------------------

    def cfg_read(self, offset: int, size: int) -> int:
        return self.machine.pci_config_read(self.slot, 0, offset, size)

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.machine.pci_config_write(self.slot, 0, offset, size, value)

    def capabilities(self) -> list[tuple[int, int]]:
        """Walk the capability list: (offset, id) in order; fails on a loop or a bad pointer."""
        assert self.cfg_read(pci.PCI_STATUS, 2) & pci.PCI_STATUS_CAP_LIST
        out: list[tuple[int, int]] = []
        offset = self.cfg_read(pci.PCI_CAPABILITY_LIST, 1)
        while offset:
            assert 0x40 <= offset <= 0xFC and offset % 4 == 0, hex(offset)
            assert len(out) < 48, "capability list loops"
            out.append((offset, self.cfg_read(offset, 1)))
            offset = self.cfg_read(offset + 1, 1)
        return out

    def bar_address(self, index: int) -> int:
        reg = pci.PCI_BASE_ADDRESS_0 + 4 * index
        low = self.cfg_read(reg, 4)
        high = self.cfg_read(reg + 4, 4) if low & pci.PCI_BASE_ADDRESS_MEM_TYPE_64 else 0
        return (high << 32) | (low & ~0xF)

    def device_bar_size(self, index: int) -> int:
        """The BAR size the function was built with (to compare with what sizing finds)."""
        return self.machine.bus.functions[(self.slot, 0)].bars[index].size

    # -- virtio-pci structures -------------------------------------------------------------

    def common_read(self, offset: int, size: int) -> int:
        return self.machine.mmio_read(self.virtio[vp.VIRTIO_PCI_CAP_COMMON_CFG][1] + offset, size)

    def common_write(self, offset: int, size: int, value: int) -> None:
        self.machine.mmio_write(self.virtio[vp.VIRTIO_PCI_CAP_COMMON_CFG][1] + offset, size, value)

    @property
    def status(self) -> int:
        return self.common_read(vp.VIRTIO_PCI_COMMON_STATUS, 1)

    def add_status(self, bits: int) -> None:
        self.common_write(vp.VIRTIO_PCI_COMMON_STATUS, 1, self.status | bits)

    def isr(self) -> int:
        return self.machine.mmio_read(self.virtio[vp.VIRTIO_PCI_CAP_ISR_CFG][1], 1)

    def device_cfg(self, offset: int, size: int) -> int:
        return self.machine.mmio_read(self.virtio[vp.VIRTIO_PCI_CAP_DEVICE_CFG][1] + offset, size)

    def device_features(self) -> int:
        features = 0
        for select in (0, 1):
            self.common_write(vp.VIRTIO_PCI_COMMON_DFSELECT, 4, select)
            features |= self.common_read(vp.VIRTIO_PCI_COMMON_DF, 4) << (32 * select)
        return features

    def negotiate(self, features: int) -> bool:
        self.common_write(vp.VIRTIO_PCI_COMMON_STATUS, 1, 0)
        assert self.status == 0
        self.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
        for select in (0, 1):
            self.common_write(vp.VIRTIO_PCI_COMMON_GFSELECT, 4, select)
            self.common_write(vp.VIRTIO_PCI_COMMON_GF, 4, (features >> (32 * select)) & 0xFFFFFFFF)
        self.add_status(VIRTIO_CONFIG_S_FEATURES_OK)
        return bool(self.status & VIRTIO_CONFIG_S_FEATURES_OK)

    def setup_queue(self, index: int, vector: int = VIRTIO_MSI_NO_VECTOR) -> tuple[RingWriter, int]:
        """Lay out and program queue ``index``; returns its rings and its notify address."""
        ring = RingWriter.layout(self.memory, QUEUE_SIZE, self.heap.alloc(4096, 4096))
        self.common_write(vp.VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
        self.common_write(vp.VIRTIO_PCI_COMMON_Q_SIZE, 2, QUEUE_SIZE)
        for low, address in (
            (vp.VIRTIO_PCI_COMMON_Q_DESCLO, ring.desc_addr),
            (vp.VIRTIO_PCI_COMMON_Q_AVAILLO, ring.avail_addr),
            (vp.VIRTIO_PCI_COMMON_Q_USEDLO, ring.used_addr),
        ):
            self.common_write(low, 4, address & 0xFFFFFFFF)
            self.common_write(low + 4, 4, address >> 32)
        self.common_write(vp.VIRTIO_PCI_COMMON_Q_MSIX, 2, vector)
        self.common_write(vp.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)
        cap_offset, notify_base, _length = self.virtio[vp.VIRTIO_PCI_CAP_NOTIFY_CFG]
        multiplier = self.cfg_read(cap_offset + vp.VIRTIO_PCI_NOTIFY_CAP_MULT, 4)
        notify_off = self.common_read(vp.VIRTIO_PCI_COMMON_Q_NOFF, 2)
        return ring, notify_base + notify_off * multiplier

    def start(self) -> tuple[RingWriter, int]:
        """Initialise the device with every offered feature but packed rings (the split ring is
        written by hand here) and queue 0; returns its ring."""
        assert self.negotiate(self.device_features() & ~(1 << VIRTIO_F_RING_PACKED))
        ring, notify = self.setup_queue(0)
        self.add_status(VIRTIO_CONFIG_S_DRIVER_OK)
        return ring, notify

    def read_request(self, ring: RingWriter, sector: int) -> tuple[int, int]:
        """Put a one-sector IN at head 0 of ``ring``; returns its data and status addresses."""
        chain = in_request(self.memory, self.heap.alloc, sector)
        ring.write_descs(chain)
        ring.publish(0)
        return chain[1].addr, chain[2].addr

    # -- MSI-X -----------------------------------------------------------------------------

    def msix_control(self, value: int) -> None:
        self.cfg_write(self.msix_cap + pci.PCI_MSIX_FLAGS, 2, value)

    def route(self, entry: int, handler: list[int], *, masked: bool = False) -> None:
        """Point MSI-X table ``entry`` at a fresh LAPIC vector that appends to ``handler``."""
        address, data = self.machine.lapic.allocate_vector(lambda: handler.append(entry))
        base = self.msix_table + 16 * entry
        self.machine.mmio_write(base + pci.PCI_MSIX_ENTRY_LOWER_ADDR, 4, address & 0xFFFFFFFF)
        self.machine.mmio_write(base + pci.PCI_MSIX_ENTRY_UPPER_ADDR, 4, address >> 32)
        self.machine.mmio_write(base + pci.PCI_MSIX_ENTRY_DATA, 4, data)
        self.mask(entry, masked)

    def mask(self, entry: int, masked: bool) -> None:
        ctrl = self.msix_table + 16 * entry + pci.PCI_MSIX_ENTRY_VECTOR_CTRL
        self.machine.mmio_write(ctrl, 4, pci.PCI_MSIX_ENTRY_CTRL_MASKBIT if masked else 0)

    def pending(self) -> int:
        return self.machine.mmio_read(self.msix_pba, 8)

    def config_vector(self, control: int = pci.PCI_MSIX_FLAGS_ENABLE, *, masked: bool = False) -> list[int]:
        """Start, set the MSI-X ``control``, route config changes to entry 0; what it fires."""
        self.start()
        fired: list[int] = []
        self.msix_control(control)
        self.route(0, fired, masked=masked)
        self.common_write(vp.VIRTIO_PCI_COMMON_MSIX, 2, 0)
        return fired


@pytest.fixture
def bench() -> PciBench:
    return PciBench()


# -- identity and configuration space -----------------------------------------------------


def test_identity_is_a_modern_virtio_blk_storage_function(bench: PciBench) -> None:
    assert bench.cfg_read(pci.PCI_VENDOR_ID, 2) == 0x1AF4
    assert bench.cfg_read(pci.PCI_DEVICE_ID, 2) == 0x1042  # 0x1040 + virtio device id 2
    assert bench.cfg_read(pci.PCI_REVISION_ID, 1) >= 1  # modern: revision 1 or more
    assert bench.cfg_read(pci.PCI_CLASS_DEVICE + 1, 1) == 0x01  # base class: mass storage
    assert bench.cfg_read(pci.PCI_HEADER_TYPE, 1) & 0x7F == 0
    assert bench.cfg_read(pci.PCI_SUBSYSTEM_VENDOR_ID, 2) == 0x1AF4
    assert bench.cfg_read(pci.PCI_SUBSYSTEM_ID, 2) >= 0x40  # modern devices use >= 0x40


def test_identity_registers_are_read_only(bench: PciBench) -> None:
    fields = [
        (pci.PCI_VENDOR_ID, 2),
        (pci.PCI_DEVICE_ID, 2),
        (pci.PCI_REVISION_ID, 1),
        (pci.PCI_CLASS_DEVICE, 2),
        (pci.PCI_SUBSYSTEM_VENDOR_ID, 2),
        (pci.PCI_SUBSYSTEM_ID, 2),
        (pci.PCI_CAPABILITY_LIST, 1),
        (pci.PCI_STATUS, 2),
    ]
    before = [bench.cfg_read(offset, size) for offset, size in fields]
    for offset, size in fields:
        bench.cfg_write(offset, size, (1 << (8 * size)) - 1)
        bench.cfg_write(offset, size, 0)
    assert [bench.cfg_read(offset, size) for offset, size in fields] == before
    # So is every capability byte, except the MSI-X enable and function-mask bits.
    control = bench.msix_cap + pci.PCI_MSIX_FLAGS
    snapshot = [bench.cfg_read(offset, 1) for offset in range(0x40, 0x100)]
    for offset in range(0x40, 0x100):
        if offset not in (control, control + 1):
            bench.cfg_write(offset, 1, snapshot[offset - 0x40] ^ 0xFF)
    assert [bench.cfg_read(offset, 1) for offset in range(0x40, 0x100)] == snapshot
    qsize = bench.cfg_read(control, 2)
    bench.cfg_write(control, 2, 0xFFFF)
    assert bench.cfg_read(control, 2) == qsize | pci.PCI_MSIX_FLAGS_ENABLE | pci.PCI_MSIX_FLAGS_MASKALL
    bench.cfg_write(control, 2, 0)
    assert bench.cfg_read(control, 2) == qsize


def test_empty_slot_reads_all_ones(bench: PciBench) -> None:
    empty = bench.slot + 1
    assert bench.machine.pci_config_read(empty, 0, pci.PCI_VENDOR_ID, 2) == pci.PCI_VENDOR_ID_INVALID
    assert bench.machine.pci_config_read(bench.slot, 3, pci.PCI_VENDOR_ID, 4) == 0xFFFFFFFF


def test_capability_list_has_the_virtio_structures_and_msix(bench: PciBench) -> None:
    ids = [cap_id for _, cap_id in bench.caps]
    assert ids.count(pci.PCI_CAP_ID_MSIX) == 1
    assert set(bench.virtio) >= {
        vp.VIRTIO_PCI_CAP_COMMON_CFG,
        vp.VIRTIO_PCI_CAP_NOTIFY_CFG,
        vp.VIRTIO_PCI_CAP_ISR_CFG,
        vp.VIRTIO_PCI_CAP_DEVICE_CFG,
    }
    for cfg_type, (offset, address, length) in bench.virtio.items():
        cap_len = bench.cfg_read(offset + 2, 1)
        bar = bench.cfg_read(offset + vp.VIRTIO_PCI_CAP_BAR, 1)
        assert cap_len >= vp.VIRTIO_PCI_CAP_LEN
        assert offset + cap_len <= 0x100
        # The structure lies inside its BAR (BAR size from the function's BAR record).
        bar_base = bench.bar_address(bar)
        assert bar_base and bar_base <= address and address + length <= bar_base + bench.device_bar_size(bar)
        if cfg_type == vp.VIRTIO_PCI_CAP_NOTIFY_CFG:
            assert cap_len == vp.VIRTIO_PCI_NOTIFY_CAP_LEN
            multiplier = bench.cfg_read(offset + vp.VIRTIO_PCI_NOTIFY_CAP_MULT, 4)
            assert multiplier % 2 == 0
            # 4.1.4.4: every queue's notify address (+2 bytes) lies inside the structure.
            assert (NUM_QUEUES - 1) * multiplier + 2 <= length
    assert bench.virtio[vp.VIRTIO_PCI_CAP_COMMON_CFG][2] >= vp.VIRTIO_PCI_COMMON_CFG_SIZE
    assert bench.virtio[vp.VIRTIO_PCI_CAP_DEVICE_CFG][2] >= vb.VIRTIO_BLK_CONFIG.size
    control = bench.cfg_read(bench.msix_cap + pci.PCI_MSIX_FLAGS, 2)
    assert (control & pci.PCI_MSIX_FLAGS_QSIZE) + 1 == NUM_QUEUES + 1  # config + one per queue
    assert not control & pci.PCI_MSIX_FLAGS_ENABLE  # off until the driver enables it
    table_end = bench.msix_table + 16 * (NUM_QUEUES + 1)
    assert table_end <= bench.msix_pba or bench.msix_pba + 8 <= bench.msix_table


def _bar_size(bench: PciBench, index: int) -> tuple[int, int]:
    """Size BAR ``index`` like firmware does: write all ones, read back, restore."""
    reg = pci.PCI_BASE_ADDRESS_0 + 4 * index
    saved = bench.cfg_read(reg, 4)
    bench.cfg_write(reg, 4, 0xFFFFFFFF)
    mask = bench.cfg_read(reg, 4)
    bench.cfg_write(reg, 4, saved)
    assert bench.cfg_read(reg, 4) == saved
    return mask, saved


def test_bar_sizing(bench: PciBench) -> None:
    sizes = {}
    index = 0
    while index < pci.PCI_NUM_BARS:
        mask, saved = _bar_size(bench, index)
        if mask == 0:
            index += 1
            continue
        assert not mask & pci.PCI_BASE_ADDRESS_SPACE_IO  # memory BARs
        assert mask & 0xF == saved & 0xF  # type bits are read-only
        size_mask = mask & ~0xF
        if mask & pci.PCI_BASE_ADDRESS_MEM_TYPE_64:
            high, high_saved = _bar_size(bench, index + 1)
            size_mask |= high << 32
            size = (~size_mask & ((1 << 64) - 1)) + 1
            assert bench.bar_address(index) == (high_saved << 32) | (saved & ~0xF)
            sizes[index] = size
            index += 2
        else:
            sizes[index] = (~size_mask & 0xFFFFFFFF) + 1
            index += 1
    assert sizes == {1: 0x1000, 4: 0x4000}
    for index, size in sizes.items():
        assert size & (size - 1) == 0
        assert bench.bar_address(index) % size == 0  # naturally aligned
        assert bench.device_bar_size(index) == size
    # Decoding still works after sizing.
    assert bench.common_read(vp.VIRTIO_PCI_COMMON_NUMQ, 2) == NUM_QUEUES


def test_memory_decode_off_means_no_mmio(bench: PciBench) -> None:
    bench.cfg_write(pci.PCI_COMMAND, 2, pci.PCI_COMMAND_MASTER)
    assert bench.common_read(vp.VIRTIO_PCI_COMMON_NUMQ, 2) == 0xFFFF  # nothing decodes it
    bench.cfg_write(pci.PCI_COMMAND, 2, pci.PCI_COMMAND_MASTER | pci.PCI_COMMAND_MEMORY)
    assert bench.common_read(vp.VIRTIO_PCI_COMMON_NUMQ, 2) == NUM_QUEUES


# -- common configuration --------------------------------------------------------------------


def test_queue_size_reads_zero_for_a_queue_that_does_not_exist(bench: PciBench) -> None:
    for missing in (NUM_QUEUES, NUM_QUEUES + 1, 0xFFFF):
        bench.common_write(vp.VIRTIO_PCI_COMMON_Q_SELECT, 2, missing)
        assert bench.common_read(vp.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 0
        bench.common_write(vp.VIRTIO_PCI_COMMON_Q_SIZE, 2, 8)  # ignored
        bench.common_write(vp.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)
        assert bench.common_read(vp.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 0
        assert bench.common_read(vp.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0
    for existing in range(NUM_QUEUES):
        bench.common_write(vp.VIRTIO_PCI_COMMON_Q_SELECT, 2, existing)
        assert bench.common_read(vp.VIRTIO_PCI_COMMON_Q_SIZE, 2) == QUEUE_SIZE
        assert bench.common_read(vp.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0
    assert bench.common_read(vp.VIRTIO_PCI_COMMON_NUMQ, 2) == NUM_QUEUES


def test_out_of_range_msix_vectors_read_back_no_vector(bench: PciBench) -> None:
    entries = NUM_QUEUES + 1
    bench.common_write(vp.VIRTIO_PCI_COMMON_Q_SELECT, 2, 1)
    assert bench.common_read(vp.VIRTIO_PCI_COMMON_Q_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    for vector, expected in (
        (entries - 1, entries - 1),
        (entries, VIRTIO_MSI_NO_VECTOR),
        (0x7FFF, VIRTIO_MSI_NO_VECTOR),
        (0, 0),
    ):
        bench.common_write(vp.VIRTIO_PCI_COMMON_Q_MSIX, 2, vector)
        assert bench.common_read(vp.VIRTIO_PCI_COMMON_Q_MSIX, 2) == expected
        bench.common_write(vp.VIRTIO_PCI_COMMON_MSIX, 2, vector)
        assert bench.common_read(vp.VIRTIO_PCI_COMMON_MSIX, 2) == expected


def test_features_ok_is_refused_for_a_feature_set_the_device_does_not_offer(bench: PciBench) -> None:
    offered = bench.device_features()
    assert offered >> VIRTIO_F_VERSION_1 & 1
    assert offered >> VIRTIO_F_RING_PACKED & 1  # packed rings are offered...
    assert not offered >> VIRTIO_F_IN_ORDER & 1  # ...in-order use is not
    assert not bench.negotiate(offered | 1 << VIRTIO_F_IN_ORDER)
    assert not bench.status & VIRTIO_CONFIG_S_FEATURES_OK
    assert not bench.negotiate(offered | 1 << 63)
    assert not bench.negotiate(offered & ~(1 << VIRTIO_F_VERSION_1))  # a modern-only device
    assert bench.negotiate(1 << VIRTIO_F_VERSION_1)  # any offered subset is fine
    assert bench.negotiate(offered)
    # Features are frozen once FEATURES_OK is set.
    bench.common_write(vp.VIRTIO_PCI_COMMON_GFSELECT, 4, 0)
    bench.common_write(vp.VIRTIO_PCI_COMMON_GF, 4, 0)
    assert bench.common_read(vp.VIRTIO_PCI_COMMON_GF, 4) == offered & 0xFFFFFFFF
    assert bench.device.driver_features == offered


async def test_writing_zero_to_device_status_resets(bench: PciBench) -> None:
    ring, _notify = bench.start()
    bench.common_write(vp.VIRTIO_PCI_COMMON_MSIX, 2, 0)
    bench.device.resize(2 * DISK)  # sets ISR bit 1
    resets = bench.device.stats.resets
    bench.common_write(vp.VIRTIO_PCI_COMMON_STATUS, 1, 0)
    assert bench.status == 0
    assert bench.device.stats.resets == resets + 1
    assert bench.isr() == 0
    assert bench.common_read(vp.VIRTIO_PCI_COMMON_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    bench.common_write(vp.VIRTIO_PCI_COMMON_GFSELECT, 4, 1)
    assert bench.common_read(vp.VIRTIO_PCI_COMMON_GF, 4) == 0
    bench.common_write(vp.VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
    assert bench.common_read(vp.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0
    assert bench.common_read(vp.VIRTIO_PCI_COMMON_Q_SIZE, 2) == QUEUE_SIZE
    assert bench.common_read(vp.VIRTIO_PCI_COMMON_Q_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    for low in (vp.VIRTIO_PCI_COMMON_Q_DESCLO, vp.VIRTIO_PCI_COMMON_Q_AVAILLO, vp.VIRTIO_PCI_COMMON_Q_USEDLO):
        assert bench.common_read(low, 4) == bench.common_read(low + 4, 4) == 0
    # A reset device processes nothing until it is initialised again.
    bench.read_request(ring, 0)
    bench.device.kick(0)
    await asyncio.sleep(0)
    assert ring.used_idx == 0


async def test_notify_before_driver_ok_is_ignored_until_driver_ok(bench: PciBench) -> None:
    image = os.urandom(SECTOR)
    blocking_call(bench.backend.writev, 0, [memoryview(image)])
    assert bench.negotiate(bench.device_features() & ~(1 << VIRTIO_F_RING_PACKED))
    ring, notify = bench.setup_queue(0)
    data, status = bench.read_request(ring, 0)
    ignored = bench.device.stats.kicks_ignored
    bench.machine.mmio_write(notify, 2, 0)
    for _ in range(5):
        await asyncio.sleep(0)
    assert ring.used_idx == 0 and bench.memory.read(status, 1) == b"\xff"
    assert bench.device.stats.kicks_ignored == ignored + 1
    # 2.1.2: no buffers consumed before DRIVER_OK; at DRIVER_OK the waiting chain is served.
    bench.add_status(VIRTIO_CONFIG_S_DRIVER_OK)
    await settle(lambda: ring.used_idx == 1)
    assert ring.used(0) == (0, SECTOR + 1)
    assert bench.memory.read(status, 1) == bytes([Status.OK])
    assert bench.memory.read(data, SECTOR) == image


async def test_notify_with_another_queue_index_is_ignored(bench: PciBench) -> None:
    ring, notify = bench.start()
    bench.read_request(ring, 0)
    ignored = bench.device.stats.kicks_ignored
    bench.machine.mmio_write(notify, 2, 1)  # queue 0's doorbell, but "queue 1" written
    await asyncio.sleep(0)
    assert ring.used_idx == 0
    assert bench.device.stats.kicks_ignored == ignored + 1
    bench.machine.mmio_write(notify, 2, 0)
    await settle(lambda: ring.used_idx == 1)


async def test_queue_registers_are_frozen_once_the_device_is_live(bench: PciBench) -> None:
    ring, notify = bench.start()
    bench.common_write(vp.VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
    bench.common_write(vp.VIRTIO_PCI_COMMON_Q_SIZE, 2, 4)
    bench.common_write(vp.VIRTIO_PCI_COMMON_Q_DESCLO, 4, 0)
    bench.common_write(vp.VIRTIO_PCI_COMMON_Q_USEDHI, 4, 0xDEAD)
    assert bench.common_read(vp.VIRTIO_PCI_COMMON_Q_SIZE, 2) == QUEUE_SIZE
    assert bench.common_read(vp.VIRTIO_PCI_COMMON_Q_DESCLO, 4) == ring.desc_addr & 0xFFFFFFFF
    assert bench.common_read(vp.VIRTIO_PCI_COMMON_Q_USEDHI, 4) == ring.used_addr >> 32
    bench.read_request(ring, 0)
    bench.machine.mmio_write(notify, 2, 0)
    await settle(lambda: ring.used_idx == 1)
    assert ring.used(0) == (0, SECTOR + 1)


async def test_isr_is_read_to_clear(bench: PciBench) -> None:
    ring, notify = bench.start()
    assert bench.isr() == 0
    bench.read_request(ring, 0)
    bench.machine.mmio_write(notify, 2, 0)
    await settle(lambda: ring.used_idx == 1)
    assert bench.isr() == vp.VIRTIO_PCI_ISR_QUEUE
    assert bench.isr() == 0
    bench.device.resize(2 * DISK)
    assert bench.isr() == vp.VIRTIO_PCI_ISR_CONFIG
    assert bench.isr() == 0
    # ISR is read-only: writes change nothing.
    bench.device.resize(DISK)
    bench.machine.mmio_write(bench.virtio[vp.VIRTIO_PCI_CAP_ISR_CFG][1], 1, 0)
    assert bench.isr() == vp.VIRTIO_PCI_ISR_CONFIG


async def test_config_generation_changes_on_resize(bench: PciBench) -> None:
    bench.start()
    generation = bench.common_read(vp.VIRTIO_PCI_COMMON_CFGGENERATION, 1)
    assert bench.device_cfg(vb.VIRTIO_BLK_CFG_CAPACITY, 8) == DISK // SECTOR
    bench.device.resize(4 * DISK)
    assert bench.common_read(vp.VIRTIO_PCI_COMMON_CFGGENERATION, 1) != generation
    assert bench.device_cfg(vb.VIRTIO_BLK_CFG_CAPACITY, 4) == 4 * DISK // SECTOR
    assert bench.device_cfg(vb.VIRTIO_BLK_CFG_CAPACITY + 4, 4) == 0
    generations = set()
    for size in range(2, 300):  # the 8-bit generation wraps but never repeats back to back
        before = bench.common_read(vp.VIRTIO_PCI_COMMON_CFGGENERATION, 1)
        bench.device.resize(size * SECTOR * 8)
        after = bench.common_read(vp.VIRTIO_PCI_COMMON_CFGGENERATION, 1)
        assert after != before
        generations.add(after)
    assert generations == set(range(256))


def test_device_config_fields_at_spec_offsets(bench: PciBench) -> None:
    config = BlkConfig(num_queues=NUM_QUEUES, queue_size=QUEUE_SIZE)
    assert bench.device_cfg(vb.VIRTIO_BLK_CFG_CAPACITY, 8) == DISK // SECTOR
    assert bench.device_cfg(vb.VIRTIO_BLK_CFG_SIZE_MAX, 4) == config.size_max
    assert bench.device_cfg(vb.VIRTIO_BLK_CFG_SEG_MAX, 4) == QUEUE_SIZE - 2
    assert bench.device_cfg(vb.VIRTIO_BLK_CFG_BLK_SIZE, 4) == 512
    assert bench.device_cfg(vb.VIRTIO_BLK_CFG_NUM_QUEUES, 2) == NUM_QUEUES
    assert bench.device_cfg(vb.VIRTIO_BLK_CFG_MAX_DISCARD_SEG, 4) == config.max_discard_seg
    assert bench.device_cfg(vb.VIRTIO_BLK_CFG_WRITE_ZEROES_MAY_UNMAP, 1) == 1
    assert bench.device_cfg(vb.VIRTIO_BLK_CONFIG_SIZE, 4) == 0  # past the structure


# -- MSI-X -----------------------------------------------------------------------------------


async def _config_change(bench: PciBench) -> None:
    bench.device.resize(bench.device.node.size + DISK)
    for _ in range(3):
        await asyncio.sleep(0)


async def test_msix_function_mask_leaves_the_vector_pending_and_unmask_delivers(bench: PciBench) -> None:
    fired = bench.config_vector(pci.PCI_MSIX_FLAGS_ENABLE | pci.PCI_MSIX_FLAGS_MASKALL)
    await _config_change(bench)
    assert fired == [] and bench.pending() == 1
    bench.msix_control(pci.PCI_MSIX_FLAGS_ENABLE)
    for _ in range(3):
        await asyncio.sleep(0)
    assert fired == [0] and bench.pending() == 0
    await _config_change(bench)
    assert fired == [0, 0]


async def test_msix_vector_mask_leaves_the_vector_pending_and_unmask_delivers(bench: PciBench) -> None:
    bench.start()
    fired: list[int] = []
    bench.msix_control(pci.PCI_MSIX_FLAGS_ENABLE)
    bench.route(0, fired, masked=True)
    bench.route(2, fired, masked=True)
    bench.common_write(vp.VIRTIO_PCI_COMMON_MSIX, 2, 0)
    await _config_change(bench)
    assert fired == [] and bench.pending() == 0b001
    bench.mask(0, False)
    for _ in range(3):
        await asyncio.sleep(0)
    assert fired == [0] and bench.pending() == 0
    # PBA bits are read-only to the driver.
    bench.machine.mmio_write(bench.msix_pba, 8, 0b111)
    assert bench.pending() == 0


async def test_msix_changes_after_a_message_was_sent_apply_to_the_next_one(bench: PciBench) -> None:
    # The function keeps each vector's message decoded between interrupts: every write that
    # could change it (table entry, vector mask, function mask, bus mastering) must count.
    fired = bench.config_vector()
    await _config_change(bench)
    assert fired == [0]
    bench.mask(0, True)
    await _config_change(bench)
    assert fired == [0] and bench.pending() == 1
    bench.mask(0, False)
    await _config_change(bench)
    assert fired == [0, 0, 0] and bench.pending() == 0  # the pending one, then the new one
    bench.msix_control(pci.PCI_MSIX_FLAGS_ENABLE | pci.PCI_MSIX_FLAGS_MASKALL)
    await _config_change(bench)
    assert fired == [0, 0, 0] and bench.pending() == 1
    bench.msix_control(pci.PCI_MSIX_FLAGS_ENABLE)
    await _config_change(bench)
    assert fired == [0] * 5
    moved: list[int] = []
    bench.route(0, moved)  # a new address and data for the same entry
    await _config_change(bench)
    assert fired == [0] * 5 and moved == [0]
    bench.cfg_write(pci.PCI_COMMAND, 2, pci.PCI_COMMAND_MEMORY)
    await _config_change(bench)
    assert moved == [0]


async def test_no_msix_message_while_msix_is_disabled(bench: PciBench) -> None:
    fired = bench.config_vector(masked=True)
    await _config_change(bench)
    assert bench.pending() == 1
    bench.msix_control(0)  # MSI-X off: the function must not send MSI-X messages
    bench.mask(0, False)
    await _config_change(bench)
    assert fired == []
    bench.msix_control(pci.PCI_MSIX_FLAGS_ENABLE)  # back on: the pending message goes out
    for _ in range(3):
        await asyncio.sleep(0)
    assert fired == [0]


async def test_bus_master_off_means_no_interrupt_messages(bench: PciBench) -> None:
    fired = bench.config_vector()
    bench.cfg_write(pci.PCI_COMMAND, 2, pci.PCI_COMMAND_MEMORY)
    await _config_change(bench)
    assert fired == []
    bench.cfg_write(pci.PCI_COMMAND, 2, pci.PCI_COMMAND_MEMORY | pci.PCI_COMMAND_MASTER)
    await _config_change(bench)
    assert fired == [0]
