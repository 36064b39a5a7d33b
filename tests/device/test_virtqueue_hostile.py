"""A hostile driver against DeviceVirtqueue: one test per ring-validation rule.

Each bad ring is written by hand into the live rings of a booted guest, then kicked. The
device must set DEVICE_NEEDS_RESET once, let nothing escape to the event loop, and the
guest's VirtioBlk must reset it and serve correct data again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
from collections.abc import Callable
from typing import Any

import pytest

from device.blk import BlkConfig
from device.spec.virtio import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_INDIRECT_DESC,
)
from device.spec.virtio_blk import VIRTIO_BLK_OUTHDR, RequestType
from device.virtio import VirtioDevice
from device.virtio_pci import NOTIFY_OFF_MULTIPLIER, NOTIFY_OFFSET, VIRTIO_BAR, VirtioPciFunction
from device.virtqueue import DeviceVirtqueue, VirtqueueError
from tests.conftest import Rig, make_rig
from tests.device.ring import (
    INDIRECT,
    NEXT,
    WRITE,
    BlkBench,
    Desc,
    DescriptorReads,
    RingWriter,
    in_request,
    link,
    settle,
    write_table,
)

SECTOR = 512

# Every test here breaks a ring on purpose: the device says so at error level, once per break.
pytestmark = pytest.mark.expect_errors("virtio_device_needs_reset")


# -- a hostile driver inside a booted guest ---------------------------------------------------


@dataclasses.dataclass
class Hostile:
    """Writes straight into the rings of queue 0 of a booted rig, behind the driver's back."""

    rig: Rig
    ring: RingWriter

    @property
    def size(self) -> int:
        return self.ring.size

    def buffer(self, size: int) -> int:
        buf = self.rig.guest.dma.allocate(size)
        assert buf is not None
        return buf.gpa

    def header(self, rtype: int = RequestType.IN, sector: int = 0) -> int:
        gpa = self.buffer(16)
        self.rig.memory.write(gpa, VIRTIO_BLK_OUTHDR.pack(rtype, 0, sector))
        return gpa

    def read_request(self) -> list[Desc]:
        """A valid IN of one sector: header, data, status."""
        return in_request(self.rig.memory, self.buffer, 0)

    def table(self, descs: list[Desc]) -> int:
        gpa = self.buffer(max(16, 16 * len(descs)))
        write_table(self.rig.memory, gpa, descs)
        return gpa

    def chain(self, descs: list[Desc]) -> None:
        """Write ``descs`` at table index 0 and make head 0 available."""
        self.ring.write_descs(descs)
        self.ring.publish(0)


def _head_out_of_range(h: Hostile) -> None:
    h.ring.publish(h.size)


def _avail_idx_more_than_size_ahead(h: Hostile) -> None:
    h.ring.write_descs(h.read_request())
    for k in range(h.size + 1):
        h.ring.set_slot(h.ring.avail_idx + k, 0)
    h.ring.avail_idx = h.ring.avail_idx + h.size + 1


def _next_out_of_range(h: Hostile) -> None:
    h.chain([Desc(h.header(), 16, NEXT, h.size), Desc(h.buffer(1), 1, WRITE)])


def _loop(h: Hostile) -> None:
    hdr = h.header()
    h.chain([Desc(hdr, 16, NEXT, 1), Desc(hdr, 8, NEXT, 0)])


def _self_loop(h: Hostile) -> None:
    h.chain([Desc(h.header(), 16, NEXT, 0)])


def _readable_after_writable(h: Hostile) -> None:
    h.chain(link([(h.header(), 16, WRITE), (h.buffer(SECTOR), SECTOR, 0), (h.buffer(1), 1, WRITE)]))


def _status_not_writable(h: Hostile) -> None:
    h.chain(link([(h.header(), 16, 0), (h.buffer(SECTOR), SECTOR, WRITE), (h.buffer(1), 1, 0)]))


def _buffer_below_ram(h: Hostile) -> None:
    base = h.rig.memory.base
    h.chain(link([(h.header(), 16, 0), (base - SECTOR, SECTOR, WRITE), (h.buffer(1), 1, WRITE)]))


def _buffer_past_end_of_ram(h: Hostile) -> None:
    end = h.rig.memory.end
    h.chain(link([(h.header(), 16, 0), (end - 256, SECTOR, WRITE), (h.buffer(1), 1, WRITE)]))


def _buffer_address_wraps_64_bits(h: Hostile) -> None:
    h.chain(link([(h.header(), 16, 0), ((1 << 64) - 16, SECTOR, WRITE), (h.buffer(1), 1, WRITE)]))


def _header_at_address_zero(h: Hostile) -> None:
    h.chain(link([(0, 16, 0), (h.buffer(1), 1, WRITE)]))


def _chain_longer_than_4_gib(h: Hostile) -> None:
    mem = h.rig.memory
    pieces = (1 << 32) // mem.size + 1  # whole-RAM descriptors: one more than 2^32 bytes
    assert pieces < h.size
    h.chain(link([(mem.base, mem.size, 0)] * pieces))


def _indirect_with_next(h: Hostile) -> None:
    table = h.table(h.read_request())
    h.chain([Desc(table, 48, INDIRECT | NEXT, 1), Desc(h.buffer(1), 1, WRITE)])


def _nested_indirect(h: Hostile) -> None:
    inner = h.table(h.read_request())
    outer = h.table([Desc(h.header(), 16, NEXT, 1), Desc(inner, 48, INDIRECT)])
    h.chain([Desc(outer, 32, INDIRECT)])


def _indirect_length_zero(h: Hostile) -> None:
    h.chain([Desc(h.table(h.read_request()), 0, INDIRECT)])


def _indirect_length_not_multiple_of_16(h: Hostile) -> None:
    h.chain([Desc(h.table(h.read_request()), 40, INDIRECT)])


def _indirect_table_outside_ram(h: Hostile) -> None:
    h.chain([Desc(h.rig.memory.end - 16, 48, INDIRECT)])


def _indirect_table_longer_than_queue(h: Hostile) -> None:
    entries = h.size + 1
    table = h.table(link([(h.header(), 16, 0)] * (entries - 1) + [(h.buffer(1), 1, WRITE)]))
    h.chain([Desc(table, 16 * entries, INDIRECT)])


def _indirect_next_out_of_range(h: Hostile) -> None:
    table = h.table([Desc(h.header(), 16, NEXT, 2), Desc(h.buffer(1), 1, WRITE)])
    h.chain([Desc(table, 32, INDIRECT)])


def _indirect_loop(h: Hostile) -> None:
    hdr = h.header()
    table = h.table([Desc(hdr, 16, NEXT, 1), Desc(hdr, 16, NEXT, 0)])
    h.chain([Desc(table, 32, INDIRECT)])


def _indirect_buffer_outside_ram(h: Hostile) -> None:
    end = h.rig.memory.end
    table = h.table(link([(h.header(), 16, 0), (end, SECTOR, WRITE), (h.buffer(1), 1, WRITE)]))
    h.chain([Desc(table, 48, INDIRECT)])


def _indirect_readable_after_writable(h: Hostile) -> None:
    table = h.table(link([(h.header(), 16, 0), (h.buffer(1), 1, WRITE)]))
    h.chain([Desc(h.header(), 16, NEXT | WRITE, 1), Desc(table, 32, INDIRECT)])


def _indirect_not_negotiated(h: Hostile) -> None:
    h.chain([Desc(h.table(h.read_request()), 48, INDIRECT)])


def _head_made_available_twice(h: Hostile) -> None:
    h.ring.write_descs(h.read_request())
    h.ring.publish(0, 0)


def _no_status_byte(h: Hostile) -> None:
    h.chain(link([(h.header(RequestType.OUT), 16, 0), (h.buffer(SECTOR), SECTOR, 0)]))


def _only_zero_length_writable(h: Hostile) -> None:
    h.chain(link([(h.header(), 16, 0), (h.buffer(16), 0, WRITE)]))


def _short_header(h: Hostile) -> None:
    h.chain(link([(h.header(), 8, 0), (h.buffer(1), 1, WRITE)]))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Hostile], None]
    reason: str  # what the device's error message must say
    rig: dict[str, Any] = dataclasses.field(default_factory=dict)


CASES = [
    Case("head-out-of-range", _head_out_of_range, "available head 256 >= queue size 256"),
    Case("avail-idx-more-than-size-ahead", _avail_idx_more_than_size_ahead, "more than the 256 entries"),
    Case("next-out-of-range", _next_out_of_range, "next 256 outside the table of 256"),
    Case("loop", _loop, "longer than its table of 256"),
    Case("self-loop", _self_loop, "longer than its table of 256"),
    Case("readable-after-writable", _readable_after_writable, "readable descriptor after a writable"),
    Case("status-not-writable", _status_not_writable, "readable descriptor after a writable"),
    Case("buffer-below-ram", _buffer_below_ram, "outside guest RAM"),
    Case("buffer-past-end-of-ram", _buffer_past_end_of_ram, "outside guest RAM"),
    Case("buffer-address-wraps", _buffer_address_wraps_64_bits, "outside guest RAM"),
    Case("header-at-address-zero", _header_at_address_zero, "[0x0, +0x10) outside guest RAM"),
    Case("chain-longer-than-4-GiB", _chain_longer_than_4_gib, "longer than 2^32 bytes"),
    Case("indirect-with-next", _indirect_with_next, "indirect descriptor with NEXT set"),
    Case("nested-indirect", _nested_indirect, "nested indirect descriptor"),
    Case("indirect-length-zero", _indirect_length_zero, "indirect table length 0 "),
    Case("indirect-length-40", _indirect_length_not_multiple_of_16, "indirect table length 40 "),
    Case("indirect-table-outside-ram", _indirect_table_outside_ram, "indirect table outside guest RAM"),
    Case("indirect-table-too-long", _indirect_table_longer_than_queue, "257 entries exceeds the queue"),
    Case("indirect-next-out-of-range", _indirect_next_out_of_range, "next 2 outside the table of 2"),
    Case("indirect-loop", _indirect_loop, "longer than its table of 2"),
    Case("indirect-buffer-outside-ram", _indirect_buffer_outside_ram, "outside guest RAM"),
    Case(
        "indirect-readable-after-writable",
        _indirect_readable_after_writable,
        "readable descriptor after a writable",
    ),
    Case(
        "indirect-not-negotiated",
        _indirect_not_negotiated,
        "indirect descriptor not negotiated",
        {"features_mask": ~(1 << VIRTIO_F_INDIRECT_DESC)},
    ),
    Case(
        "head-in-flight-twice",
        _head_made_available_twice,
        "head 0 made available while in flight",
        {"config": BlkConfig(io_mode="thread")},
    ),
    Case("no-status-byte", _no_status_byte, "without a writable status byte"),
    Case("only-zero-length-writable", _only_zero_length_writable, "without a writable status byte"),
    Case("short-header", _short_header, "request header of 8 bytes"),
]


def _notify(rig: Rig, queue: int = 0) -> None:
    """A doorbell write, as the driver does it: 16-bit queue index at the notify address."""
    function = rig.device.transport
    assert isinstance(function, VirtioPciFunction)
    bar = function.bars[VIRTIO_BAR].address
    rig.machine.mmio_write(bar + NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * queue, 2, queue)


def _spy_device_errors(device: VirtioDevice, ring: RingWriter) -> list[tuple[str, int, int]]:
    """Record (reason, status, used idx) each time the device sets DEVICE_NEEDS_RESET."""
    seen: list[tuple[str, int, int]] = []
    device.error_listeners.append(lambda reason: seen.append((reason, device.status, ring.used_idx)))
    return seen


def _record_loop_errors() -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
    return errors


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_hostile_ring_needs_reset_once_and_driver_recovers(case: Case) -> None:
    loop_errors = _record_loop_errors()
    rig = await make_rig(**case.rig)
    try:
        before = os.urandom(2 * SECTOR)
        await rig.disk.write(5, before)  # the indices are not at 0 any more
        queue = rig.device.queues[0]
        ring = RingWriter.of(queue)
        assert queue.active and ring.avail_idx == queue.last_avail_idx == 1
        used_before = ring.used_idx
        seen = _spy_device_errors(rig.device, ring)

        case.build(Hostile(rig, ring))
        _notify(rig)
        await settle(lambda: rig.disk.statistics().resets == 1 and rig.disk.ready)

        [(reason, status, used_idx)] = seen
        assert case.reason in reason
        assert status & VIRTIO_CONFIG_S_NEEDS_RESET and status & VIRTIO_CONFIG_S_DRIVER_OK
        assert used_idx == used_before, "nothing may be returned for a bad ring"
        assert rig.device.stats.needs_reset == 1
        # The guest reset and re-initialised the device: it serves correct data again.
        assert not rig.device.status & VIRTIO_CONFIG_S_NEEDS_RESET
        assert rig.device.broken_reason is None
        data = os.urandom(8 * SECTOR)
        await rig.disk.write(40, data)
        assert await rig.disk.read(40, len(data)) == data
        assert await rig.disk.read(5, len(before)) == before
        await rig.disk.flush()
        assert rig.device.stats.needs_reset == 1
        assert rig.disk.statistics().resets == 1
    finally:
        await rig.close()
    gc.collect()  # report "exception never retrieved" now, into the handler
    await asyncio.sleep(0)
    assert loop_errors == []


# -- a stopped device stays stopped -----------------------------------------------------------


async def test_broken_device_ignores_kicks_until_reset() -> None:
    bench = BlkBench()
    bench.start()
    bench.ring.write_descs([Desc(bench.header(RequestType.IN, 0), 16, NEXT, 0)])  # a self-loop
    bench.ring.publish(0)
    bench.device.kick(0)
    await settle(lambda: bench.device.broken_reason is not None)
    assert bench.device.status & VIRTIO_CONFIG_S_NEEDS_RESET
    # Never loop on a bad head: more kicks neither re-parse it nor count another error.
    ignored = bench.device.stats.kicks_ignored
    for _ in range(5):
        bench.device.kick(0)
        await asyncio.sleep(0)
    assert bench.device.stats.kicks_ignored == ignored + 5
    assert bench.device.stats.needs_reset == 1
    assert bench.device.queues[0].last_avail_idx == 0
    assert bench.ring.used_idx == 0
    # The driver can't clear NEEDS_RESET except by resetting.
    bench.device.set_status(bench.device.status & ~VIRTIO_CONFIG_S_NEEDS_RESET)
    assert bench.device.status & VIRTIO_CONFIG_S_NEEDS_RESET
    bench.device.set_status(0)
    assert bench.device.status == 0
    bench.start()
    status, used = await bench.run(bench.in_chain(0, 1))
    assert (status, used) == (0, SECTOR + 1)


# -- configuration-time rules (checked at DRIVER_OK) ------------------------------------------


def _misalign(attr: str, by: int) -> Callable[[DeviceVirtqueue], None]:
    def apply(queue: DeviceVirtqueue) -> None:
        setattr(queue, attr, getattr(queue, attr) + by)

    return apply


def _set(attr: str, value: Callable[[DeviceVirtqueue], int]) -> Callable[[DeviceVirtqueue], None]:
    def apply(queue: DeviceVirtqueue) -> None:
        setattr(queue, attr, value(queue))

    return apply


CONFIG_CASES: dict[str, tuple[Callable[[DeviceVirtqueue], None], str]] = {
    "size-zero": (_set("size", lambda q: 0), "size 0 is not a power of two"),
    "size-not-power-of-two": (_set("size", lambda q: 12), "size 12 is not a power of two"),
    "size-above-max": (_set("size", lambda q: 2 * q.max_size), "is not a power of two in 1..16"),
    "desc-misaligned": (_misalign("desc_addr", 8), "descriptor table at"),
    "avail-misaligned": (_misalign("driver_addr", 1), "available ring at"),
    "used-misaligned": (_misalign("device_addr", 2), "used ring at"),
    "desc-outside-ram": (_set("desc_addr", lambda q: q.memory.end - 128), "descriptor table outside"),
    "avail-below-ram": (_set("driver_addr", lambda q: q.memory.base - 64), "available ring outside"),
    "used-straddles-end": (_set("device_addr", lambda q: q.memory.end - 64), "used ring outside"),
    "desc-at-zero": (_set("desc_addr", lambda q: 0), "descriptor table outside"),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
async def test_bad_queue_configuration_needs_reset_at_driver_ok(name: str) -> None:
    corrupt, reason = CONFIG_CASES[name]
    bench = BlkBench(queue_size=16)
    bench.negotiate()
    queue = bench.device.queues[0]
    bench.ring.configure(queue)
    corrupt(queue)
    bench.driver_ok()
    assert bench.device.broken_reason is not None and reason in bench.device.broken_reason
    assert bench.device.status & VIRTIO_CONFIG_S_NEEDS_RESET
    assert bench.device.stats.needs_reset == 1
    assert not queue.active and not bench.device.driver_ok
    bench.ring.publish(0)
    bench.device.kick(0)  # a broken device processes nothing
    assert bench.device.stats.kicks_ignored == 1
    # A reset and a correct configuration bring it back.
    bench.device.set_status(0)
    bench.start()
    assert await bench.run(bench.in_chain(0, 1)) == (0, SECTOR + 1)


# -- chain length: exactly the queue size is legal, one more is not ------------------------


def _bare_queue(size: int = 8, *, indirect: bool = True) -> tuple[DeviceVirtqueue, RingWriter, int]:
    bench = BlkBench(queue_size=size)
    queue = DeviceVirtqueue(bench.memory, 0, size)
    bench.ring.configure(queue)
    queue.activate(event_idx=False, indirect=indirect)
    return queue, bench.ring, bench.heap.alloc(1 << 16)


def test_direct_chain_of_exactly_queue_size_is_accepted() -> None:
    queue, ring, buf = _bare_queue(8)
    ring.write_descs(link([(buf + 16 * k, 16, 0 if k < 4 else WRITE) for k in range(8)]))
    ring.publish(0)
    chain = queue.pop()
    assert chain is not None
    assert chain.readable == [(buf + 16 * k, 16) for k in range(4)]
    assert chain.writable == [(buf + 16 * k, 16) for k in range(4, 8)]


def test_direct_chain_of_queue_size_plus_one_is_refused() -> None:
    queue, ring, buf = _bare_queue(8)
    # Eight distinct descriptors, the last pointing back at the first: the 9th step is refused
    # before it is even read.
    ring.write_descs([Desc(buf, 16, NEXT, (k + 1) % 8) for k in range(8)])
    ring.publish(0)
    with DescriptorReads() as reads, pytest.raises(VirtqueueError, match="longer than its table of 8"):
        queue.pop()
    assert reads.count == 8
    assert queue.last_avail_idx == 0 and not queue.inflight


def test_indirect_table_of_exactly_queue_size_is_accepted_one_more_is_refused() -> None:
    queue, ring, buf = _bare_queue(8)
    table = buf + 4096
    write_table(queue.memory, table, link([(buf, 16, 0)] * 7 + [(buf, 1, WRITE)]))
    ring.write_descs([Desc(table, 16 * 8, INDIRECT), Desc(table, 16 * 9, INDIRECT)])
    ring.publish(0, 1)
    chain = queue.pop()
    assert chain is not None and len(chain.readable) == 7 and chain.writable == [(buf, 1)]
    with pytest.raises(VirtqueueError, match="9 entries exceeds the queue size 8"):
        queue.pop()


def test_indirect_descriptor_write_flag_is_ignored() -> None:
    """2.7.5.3.2: the device MUST ignore the write-only flag of an indirect descriptor."""
    queue, ring, buf = _bare_queue(8)
    write_table(queue.memory, buf + 4096, link([(buf, 16, 0), (buf + 16, 1, WRITE)]))
    ring.write_descs([Desc(buf + 4096, 32, INDIRECT | WRITE)])
    ring.publish(0)
    chain = queue.pop()
    assert chain is not None
    assert (chain.readable, chain.writable) == ([(buf, 16)], [(buf + 16, 1)])


def test_direct_descriptors_then_one_indirect_are_one_chain() -> None:
    """2.7.5.3.2: zero or more direct descriptors followed by one indirect descriptor."""
    queue, ring, buf = _bare_queue(8)
    write_table(queue.memory, buf + 4096, link([(buf + 32, 512, WRITE), (buf + 1024, 1, WRITE)]))
    ring.write_descs([Desc(buf, 8, NEXT, 1), Desc(buf + 8, 8, NEXT, 2), Desc(buf + 4096, 32, INDIRECT)])
    ring.publish(0)
    chain = queue.pop()
    assert chain is not None
    assert chain.readable == [(buf, 8), (buf + 8, 8)]
    assert chain.writable == [(buf + 32, 512), (buf + 1024, 1)]
