"""The device side of the packed virtqueue: what a spec-following driver gets back, and what a
hostile one is refused.

A hypothesis state machine runs random workloads (queue sizes that are not powers of two, lists
that cross the end of the ring, indirect tables, completions in any order, many wraps) against a
model of the ring; every rule a driver can break is refused with ``VirtqueueError`` before the
device uses anything of the buffer, and a refused pop writes nothing to guest memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from device.memory import GuestMemory
from device.spec.virtio_packed import (
    PVIRTQ_DESC,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
    avail_flags,
    off_wrap,
)
from device.virtqueue import VirtqueueError
from tests.device.packed_ring import INDIRECT, NEXT, WRITE, Buffer, PackedRing

MiB = 1 << 20


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory(16 * MiB, memfd=False)
    try:
        yield mem
    finally:
        mem.close()


def request(ring: PackedRing, out: int = 16, data: int = 512, status: int = 1) -> list[Buffer]:
    """A virtio-blk shaped buffer: a readable header, device-writable data and status."""
    return [
        Buffer(ring.buffer(out), out),
        Buffer(ring.buffer(data), data, True),
        Buffer(ring.buffer(status), status, True),
    ]


def test_a_buffer_round_trip(memory: GuestMemory) -> None:
    ring = PackedRing(memory, 8)
    assert ring.queue.pop() is None  # a zeroed ring has nothing available (AVAIL 0 != wrap 1)
    buffers = request(ring)
    buffer_id = ring.add(buffers)
    chain = ring.queue.pop()
    assert chain is not None and chain.head == buffer_id
    assert chain.readable == [(buffers[0].addr, 16)]
    assert chain.writable == [(buffers[1].addr, 512), (buffers[2].addr, 1)]
    assert ring.queue.pop() is None
    ring.queue.push(buffer_id, 513)
    assert ring.used() is None  # not visible before publish
    assert ring.queue.publish() is True  # Driver Event Suppression ENABLE (zero): interrupt
    assert ring.used() == (buffer_id, 513)
    # The used descriptor went at the device's used position, slot 0, with AVAIL|USED of wrap 1.
    assert ring.desc_at(0)[3] & 0x8080 == 0x8080
    assert ring.queue.used_idx == 3 and ring.queue.last_avail_idx == 3


def test_out_of_order_completion_and_the_ring_wrapping(memory: GuestMemory) -> None:
    ring = PackedRing(memory, 5)  # not a power of two
    for lap in range(7):
        ids = [ring.add([Buffer(ring.buffer(8), 8, True)]) for _ in range(5)]
        chains = [ring.queue.pop() for _ in ids]
        assert [c.head for c in chains if c is not None] == ids
        assert ring.queue.pop() is None
        for buffer_id in reversed(ids):  # the last made available completes first
            ring.queue.push(buffer_id, 8)
        ring.queue.publish()
        assert [ring.used() for _ in ids] == [(i, 8) for i in reversed(ids)], lap
        assert ring.used() is None
    assert ring.avail_wrap == ring.queue.avail_wrap and ring.used_wrap == ring.queue.used_wrap


def test_a_list_crossing_the_end_of_the_ring_carries_the_flipped_bits(memory: GuestMemory) -> None:
    ring = PackedRing(memory, 4)
    first = ring.add([Buffer(ring.buffer(8), 8, True)] * 3)
    chain = ring.queue.pop()
    assert chain is not None and chain.head == first
    ring.queue.push(first, 0)
    ring.queue.publish()
    assert ring.used() == (first, 0)
    crossing = ring.add(request(ring))  # positions 3, 0, 1: the driver's counter flips after 3
    assert ring.avail_wrap == 0
    chain = ring.queue.pop()
    assert chain is not None and chain.head == crossing and len(chain.writable) == 2
    assert ring.queue.avail_wrap == 0 and ring.queue.last_avail_idx == 2


def test_an_indirect_table_takes_one_ring_descriptor(memory: GuestMemory) -> None:
    ring = PackedRing(memory, 4)
    buffers = request(ring)
    buffer_id = ring.add(buffers, indirect=True)
    chain = ring.queue.pop()
    assert chain is not None and chain.head == buffer_id
    assert chain.readable == [(buffers[0].addr, 16)] and len(chain.writable) == 2
    assert ring.queue.last_avail_idx == 1 and ring.queue.slots == {buffer_id: 1}


def test_driver_event_suppression(memory: GuestMemory) -> None:
    ring = PackedRing(memory, 8, event_idx=True)

    def complete_one() -> bool:
        buffer_id = ring.add([Buffer(ring.buffer(8), 8, True)])
        chain = ring.queue.pop()
        assert chain is not None
        ring.queue.push(chain.head, 8)
        interrupt = ring.queue.publish()
        assert ring.used() == (buffer_id, 8)
        return interrupt

    ring.set_driver_event(0, VRING_PACKED_EVENT_FLAG_DISABLE)
    assert complete_one() is False
    ring.set_driver_event(0, VRING_PACKED_EVENT_FLAG_ENABLE)
    assert complete_one() is True
    # DESC: an interrupt only once the device's used position passes offset 4 (wrap 1).
    ring.set_driver_event(off_wrap(4, 1), VRING_PACKED_EVENT_FLAG_DESC)
    assert [complete_one() for _ in range(4)] == [False, False, True, False]
    # Past the end of the ring, an event for the next lap's offset 1.
    ring.set_driver_event(off_wrap(1, 0), VRING_PACKED_EVENT_FLAG_DESC)
    # (the 8th completion wraps the ring, which forces an interrupt; the 10th writes position 1)
    assert [complete_one() for _ in range(4)] == [False, True, False, True]


def test_device_event_suppression_asks_for_the_next_descriptor(memory: GuestMemory) -> None:
    ring = PackedRing(memory, 4, event_idx=True)
    for _ in range(3):
        ring.add([Buffer(ring.buffer(8), 8, True)])
        assert ring.queue.pop() is not None
    assert ring.queue.enable_notification() is False
    assert ring.device_event() == (off_wrap(3, 1), VRING_PACKED_EVENT_FLAG_DESC)
    ring.queue.disable_notification()
    assert ring.device_event()[1] == VRING_PACKED_EVENT_FLAG_DISABLE
    ring.add([Buffer(ring.buffer(8), 8, True)])
    assert ring.queue.enable_notification() is True  # it arrived meanwhile: process again
    plain = PackedRing(memory, 4, event_idx=False)
    plain.queue.enable_notification()
    assert plain.device_event()[1] == VRING_PACKED_EVENT_FLAG_ENABLE


# -- what a hostile driver is refused ------------------------------------------------------------


def refused(ring: PackedRing, match: str) -> None:
    before = ring.memory.read(ring.memory.base, ring.memory.size)
    with pytest.raises(VirtqueueError, match=match):
        ring.queue.pop()
    assert ring.memory.read(ring.memory.base, ring.memory.size) == before  # nothing written


def raw(ring: PackedRing, position: int, addr: int, length: int, buffer_id: int, flags: int) -> None:
    ring.write_desc(position, addr, length, buffer_id, flags | avail_flags(1))


def test_hostile_descriptors_are_refused_and_nothing_is_written(memory: GuestMemory) -> None:
    def fresh(**kwargs: bool) -> PackedRing:
        memory.fill(memory.base, 8 * MiB)
        return PackedRing(
            memory, 8, event_idx=kwargs.get("event_idx", False), indirect=kwargs.get("indirect", True)
        )

    data = memory.base + 4 * MiB
    cases: list[tuple[str, list[tuple[int, int, int, int, int]], dict[str, bool]]] = [
        ("reserved flags", [(0, data, 8, 0, 0x10)], {}),
        ("outside guest RAM", [(0, memory.end - 4, 8, 0, 0)], {}),
        ("outside guest RAM", [(0, memory.base - 512, 8, 0, 0)], {}),
        ("buffer id 8 >= queue size", [(0, data, 8, 8, 0)], {}),
        ("readable descriptor after a writable", [(0, data, 8, 0, WRITE | NEXT), (1, data, 8, 0, 0)], {}),
        ("not available", [(0, data, 8, 0, NEXT)], {}),  # the next one is stale
        ("indirect descriptor not negotiated", [(0, data, 16, 0, INDIRECT)], {"indirect": False}),
        ("indirect descriptor in a list", [(0, data, 8, 0, NEXT), (1, data, 16, 0, INDIRECT)], {}),
        ("indirect descriptor in a list", [(0, data, 16, 0, INDIRECT | NEXT), (1, data, 8, 0, 0)], {}),
        ("WRITE on an indirect descriptor", [(0, data, 16, 0, INDIRECT | WRITE)], {}),
        ("indirect table length 24", [(0, data, 24, 0, INDIRECT)], {}),
        ("indirect table length 0", [(0, data, 0, 0, INDIRECT)], {}),
        ("indirect table of 2048 entries", [(0, data, 16 * 2048, 0, INDIRECT)], {}),
        ("indirect table outside guest RAM", [(0, memory.end - 16, 32, 0, INDIRECT)], {}),
        ("longer than the ring", [(k, data, 8, 0, NEXT) for k in range(8)], {}),
    ]
    for match, descs, options in cases:
        ring = fresh(**options)
        for position, addr, length, buffer_id, flags in descs:
            raw(ring, position, addr, length, buffer_id, flags)
        refused(ring, match)


def test_tables_with_nested_indirection_or_buffers_outside_ram_are_refused(memory: GuestMemory) -> None:
    ring = PackedRing(memory, 8)
    table = ring.tables
    memory.write(table, PVIRTQ_DESC.pack(ring.buffer(8), 8, 0, INDIRECT))
    raw(ring, 0, table, 16, 0, INDIRECT)
    refused(ring, "nested indirect")
    memory.write(table, PVIRTQ_DESC.pack(memory.end - 4, 8, 0, WRITE))
    refused(ring, "outside guest RAM")
    memory.write(table, PVIRTQ_DESC.pack(ring.buffer(8), 8, 0, WRITE))
    memory.write(table + 16, PVIRTQ_DESC.pack(ring.buffer(8), 8, 0, 0))
    raw(ring, 0, table, 32, 0, INDIRECT)
    refused(ring, "readable descriptor after a writable")


def test_an_id_in_flight_and_more_descriptors_than_the_ring_are_refused(memory: GuestMemory) -> None:
    ring = PackedRing(memory, 4)
    data = ring.buffer(8)
    raw(ring, 0, data, 8, 2, WRITE)
    assert ring.queue.pop() is not None
    raw(ring, 1, data, 8, 2, WRITE)  # id 2 again, still in flight
    refused(ring, "buffer id 2 made available while in flight")
    ring = PackedRing(memory, 4)
    memory.fill(ring.ring, 64)
    for position in range(4):  # two buffers of two descriptors each: the whole ring
        raw(ring, position, data, 8, position // 2, WRITE | (NEXT if position % 2 == 0 else 0))
    assert ring.queue.pop() is not None and ring.queue.pop() is not None
    # The driver flips its counter and makes slot 0 available again before any was used.
    ring.write_desc(0, data, 8, 2, WRITE | avail_flags(0))
    refused(ring, "5 descriptors in flight, more than the 4 of the ring")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("desc_addr", 8, "not 16-aligned"),
        ("driver_addr", 2, "not 4-aligned"),
        ("device_addr", 1 << 40, "outside guest RAM"),
        ("size", 0, "size 0"),
        ("size", 2048, "size 2048"),
    ],
)
def test_a_bad_configuration_is_refused_at_driver_ok(
    memory: GuestMemory, field: str, value: int, match: str
) -> None:
    ring = PackedRing(memory, 8)
    queue = ring.queue
    setattr(queue, field, memory.base + value if field.endswith("addr") else value)
    with pytest.raises(VirtqueueError, match=match):
        queue.activate(event_idx=False, indirect=True)


# -- random workloads against a model --------------------------------------------------------------


class PackedWorkload(RuleBasedStateMachine):
    """A spec-following driver and the device, many laps round a ring of a random size."""

    def __init__(self) -> None:
        super().__init__()
        self.memory = GuestMemory(16 * MiB, memfd=False)
        self.ring: PackedRing | None = None
        self.made: dict[int, list[Buffer]] = {}  # id -> buffers, made available, not popped
        self.order: list[int] = []
        self.popped: dict[int, list[Buffer]] = {}
        self.pushed: list[tuple[int, int]] = []
        self.expected_used: list[tuple[int, int]] = []

    def teardown(self) -> None:
        self.memory.close()

    @rule(size=st.integers(1, 37), event_idx=st.booleans())
    @precondition(lambda self: self.ring is None)
    def start(self, size: int, event_idx: bool) -> None:
        self.ring = PackedRing(self.memory, size, event_idx=event_idx)

    @rule(count=st.integers(1, 4), indirect=st.booleans(), data=st.data())
    @precondition(lambda self: self.ring is not None)
    def add(self, count: int, indirect: bool, data: st.DataObject) -> None:
        ring = self.ring
        assert ring is not None
        need = 1 if indirect else count
        if need > ring.free_slots or not ring.free_ids:
            return
        readable = data.draw(st.integers(0, count))
        buffers = [Buffer(ring.data + 64 * k, 8 + k, k >= readable) for k in range(count)]
        buffer_id = ring.add(buffers, indirect=indirect)  # (each table has memory of its own)
        self.made[buffer_id] = buffers
        self.order.append(buffer_id)

    @rule()
    @precondition(lambda self: self.ring is not None)
    def pop(self) -> None:
        ring = self.ring
        assert ring is not None
        chain = ring.queue.pop()
        if not self.order:
            assert chain is None
            return
        expected_id = self.order.pop(0)
        buffers = self.made.pop(expected_id)
        assert chain is not None and chain.head == expected_id
        assert chain.readable == [(b.addr, b.length) for b in buffers if not b.write]
        assert chain.writable == [(b.addr, b.length) for b in buffers if b.write]
        self.popped[expected_id] = buffers

    @rule(data=st.data())
    @precondition(lambda self: self.ring is not None and self.popped)
    def push(self, data: st.DataObject) -> None:
        ring = self.ring
        assert ring is not None
        buffer_id = data.draw(st.sampled_from(sorted(self.popped)))
        del self.popped[buffer_id]
        length = data.draw(st.integers(0, 1 << 20))
        ring.queue.push(buffer_id, length)
        self.pushed.append((buffer_id, length))

    @rule()
    @precondition(lambda self: self.ring is not None)
    def publish_and_reap(self) -> None:
        ring = self.ring
        assert ring is not None
        ring.queue.publish()
        self.expected_used.extend(self.pushed)
        self.pushed.clear()
        got = []
        while (used := ring.used()) is not None:
            got.append(used)
        assert got == self.expected_used
        self.expected_used.clear()

    @invariant()
    def positions_agree(self) -> None:
        ring = self.ring
        if ring is None:
            return
        queue = ring.queue
        assert queue.slots_in_flight == sum(queue.slots.values()) <= ring.size
        assert set(queue.slots) == set(self.popped)  # popped and not yet pushed


TestPackedWorkload = PackedWorkload.TestCase
TestPackedWorkload.settings = settings(max_examples=60, stateful_step_count=80, deadline=None)


@given(size=st.integers(1, 64), laps=st.integers(1, 5))
@settings(max_examples=40, deadline=None)
def test_positions_and_wrap_counters_stay_in_step(size: int, laps: int) -> None:
    memory = GuestMemory(16 * MiB, memfd=False)
    try:
        ring = PackedRing(memory, size)
        for _ in range(laps * size):
            buffer_id = ring.add([Buffer(ring.buffer(8), 8, True)])
            chain = ring.queue.pop()
            assert chain is not None
            ring.queue.push(chain.head, 4)
            ring.queue.publish()
            assert ring.used() == (buffer_id, 4)
        assert (ring.queue.last_avail_idx, ring.queue.avail_wrap) == (ring.next_avail, ring.avail_wrap)
        assert (ring.queue.used_idx, ring.queue.used_wrap) == (ring.next_used, ring.used_wrap)
        assert ring.queue.last_avail_idx == 0 and ring.queue.avail_wrap == 1 ^ (laps & 1)  # a flip a lap
    finally:
        memory.close()
