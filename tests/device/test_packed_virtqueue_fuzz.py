"""Fuzzing the packed virtqueue with random rings: a valid buffer or VirtqueueError, nothing else.

Random descriptor rings (flags with the right or wrong AVAIL/USED bits, reserved bits, random
ids), random indirect tables and a random device position, wrap counter and buffers in flight;
each pop is checked against a reference walk written from the packed-ring rules (packed-ring.tex
2.8), a refused pop must leave the queue's state and guest memory as they were, and an accepted
one must point only at guest RAM. ``tests/fuzz/atheris_main.py ring-packed`` drives this property
coverage-guided.
"""

from __future__ import annotations

import dataclasses

from hypothesis import event, given, settings
from hypothesis import strategies as st

from device.memory import GuestMemory
from device.packed_virtqueue import PackedDeviceVirtqueue
from device.spec.virtio import VIRTQ_MAX_CHAIN_BYTES
from device.spec.virtio_packed import PVIRTQ_DESC, VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED
from device.virtqueue import DescriptorChain, VirtqueueError
from tests.device.packed_ring import INDIRECT, NEXT, WRITE

BASE = 0x4000_0000
MEM_SIZE = 64 * 1024
END = BASE + MEM_SIZE
RING = BASE
DRIVER_AREA = BASE + 0x800
DEVICE_AREA = BASE + 0x810
TABLES = [BASE + 0x1000 + 0x400 * k for k in range(2)]
DATA = BASE + 0x2000
MAX_SIZE = 8
AVAIL, USED = VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED
KNOWN = NEXT | WRITE | INDIRECT | AVAIL | USED
HOSTILE_ADDRESSES = (0, BASE - 1, BASE - 16, END - 1, END - 16, (1 << 64) - 1, *TABLES)
HOSTILE_LENGTHS = (0, 1, 16, 24, 32, 16 * 9, MEM_SIZE, (1 << 32) - 1)


@dataclasses.dataclass(frozen=True)
class PDesc:
    addr: int
    length: int
    buffer_id: int
    flags: int


def shape(raw: bytes, size: int, position: int, wrap_at: int) -> PDesc:
    """16 random bytes into a descriptor: mostly plausible with the AVAIL/USED bits of the lap
    it is on (``wrap_at``: the device's wrap counter at this position), sometimes not."""
    kind, fl, ident, a, b = raw[0], raw[1], raw[2], int.from_bytes(raw[3:7], "little"), raw[7]
    bits = (
        (AVAIL if wrap_at else USED)
        if kind % 8
        else (USED if wrap_at else AVAIL)
        if kind % 16
        else AVAIL | USED
    )
    if kind < 140:
        flags = (NEXT if fl % 3 == 0 else 0) | (WRITE if fl & 0x10 else 0)
        return PDesc(
            DATA + a % (END - 64 - DATA), b % 65, ident % size if ident < 240 else ident, flags | bits
        )
    if kind < 200:
        table = TABLES[a % 2] if a % 8 else END - 16 * (1 + a % 3)
        length = 16 * (1 + b % (MAX_SIZE + 1)) + (8 if b % 16 == 15 else 0)
        extra = (fl & (NEXT | WRITE)) if fl % 4 == 0 else 0
        return PDesc(table, length, ident % size, INDIRECT | extra | bits)
    if kind < 230:
        return PDesc(
            HOSTILE_ADDRESSES[a % len(HOSTILE_ADDRESSES)],
            HOSTILE_LENGTHS[b % len(HOSTILE_LENGTHS)],
            ident,
            fl | bits,
        )
    return PDesc(a, b, ident, (fl << 8 | ident) & 0xFFFF)  # anything, reserved bits included


def table_entry(raw: bytes) -> PDesc:
    kind, fl, a, b = raw[0], raw[1], int.from_bytes(raw[2:6], "little"), raw[6]
    if kind < 200:
        return PDesc(DATA + a % (END - 64 - DATA), b % 65, 0, WRITE if fl & 1 else 0)
    if kind < 230:
        return PDesc(
            HOSTILE_ADDRESSES[a % len(HOSTILE_ADDRESSES)], HOSTILE_LENGTHS[b % len(HOSTILE_LENGTHS)], 0, fl
        )
    return PDesc(DATA, 8, 0, INDIRECT | (fl & WRITE))


@dataclasses.dataclass
class Scenario:
    size: int
    indirect: bool
    last_avail: int
    avail_wrap: int
    ring: list[PDesc]
    tables: list[list[PDesc]]
    in_flight: dict[int, int]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    size = draw(st.sampled_from([1, 2, 3, 4, 5, 8]))
    last_avail = draw(st.integers(0, size - 1))
    avail_wrap = draw(st.integers(0, 1))
    raw = draw(st.binary(min_size=16 * size, max_size=16 * size))
    ring = []
    for position in range(size):
        # Positions before the device's are on the next lap: the driver's counter flipped there.
        wrap_at = avail_wrap if position >= last_avail else avail_wrap ^ 1
        ring.append(shape(raw[16 * position : 16 * position + 16], size, position, wrap_at))
    tables = []
    for _ in TABLES:
        count = draw(st.integers(0, MAX_SIZE + 1))
        entries = draw(st.binary(min_size=8 * count, max_size=8 * count))
        tables.append([table_entry(entries[8 * k : 8 * k + 8]) for k in range(count)])
    busy = draw(st.lists(st.integers(0, size - 1), max_size=3, unique=True))
    in_flight = {i: 1 for i in busy} if draw(st.booleans()) else {}
    return Scenario(size, draw(st.booleans()), last_avail, avail_wrap, ring, tables, in_flight)


def _inside(addr: int, length: int) -> bool:
    return addr >= BASE and addr + length <= END


def _available(flags: int, wrap: int) -> bool:
    return bool(flags & AVAIL) == bool(wrap) and bool(flags & USED) != bool(wrap)


def reference_pop(
    memory: GuestMemory, s: Scenario, queue: PackedDeviceVirtqueue
) -> DescriptorChain | str | None:
    """What pop must do, from the spec's rules: the buffer, None (nothing available), or the
    rule the ring breaks."""
    position, wrap = queue.last_avail_idx, queue.avail_wrap

    def desc(at: int) -> PDesc:
        addr, length, buffer_id, flags = PVIRTQ_DESC.unpack(memory.read(RING + 16 * at, 16))
        return PDesc(addr, length, buffer_id, flags)

    if not _available(desc(position).flags, wrap):
        return None
    flat: list[tuple[int, int, bool]] = []
    taken = 0
    while True:
        taken += 1
        if taken > s.size:
            return "longer than the ring"
        d = desc(position)
        if not _available(d.flags, wrap):
            return "a later descriptor is not available"
        if d.flags & ~KNOWN:
            return "reserved flags"
        if d.flags & INDIRECT:
            if not s.indirect or taken > 1 or d.flags & NEXT or d.flags & WRITE:
                return "indirect not allowed here"
            if d.length == 0 or d.length % 16 or d.length // 16 > MAX_SIZE or not _inside(d.addr, d.length):
                return "bad indirect table"
            for k in range(d.length // 16):
                addr, length, _id, flags = PVIRTQ_DESC.unpack(memory.read(d.addr + 16 * k, 16))
                if flags & INDIRECT:
                    return "nested indirect"
                if not _inside(addr, length):
                    return "buffer outside RAM"
                flat.append((addr, length, bool(flags & WRITE)))
        else:
            if not _inside(d.addr, d.length):
                return "buffer outside RAM"
            flat.append((d.addr, d.length, bool(d.flags & WRITE)))
        position += 1
        if position == s.size:
            position, wrap = 0, wrap ^ 1
        if not d.flags & NEXT:
            buffer_id = d.buffer_id
            break
    if buffer_id >= s.size:
        return "bad id"
    if sum(length for _, length, _ in flat) > VIRTQ_MAX_CHAIN_BYTES:
        return "more than 2^32 bytes"
    writes = [w for _, _, w in flat]
    if writes != sorted(writes):
        return "readable after writable"
    if buffer_id in queue.slots:
        return "id in flight"
    if queue.slots_in_flight + taken > s.size:
        return "more descriptors in flight than the ring"
    return DescriptorChain(
        buffer_id, [(a, n) for a, n, w in flat if not w], [(a, n) for a, n, w in flat if w]
    )


@settings(max_examples=500, deadline=None)
@given(s=scenarios())
def test_pop_returns_a_valid_buffer_or_raises_virtqueue_error(s: Scenario) -> None:
    memory = GuestMemory(MEM_SIZE, BASE, memfd=False)
    try:
        for position, d in enumerate(s.ring):
            memory.write(
                RING + 16 * position,
                PVIRTQ_DESC.pack(d.addr % (1 << 64), d.length % (1 << 32), d.buffer_id % (1 << 16), d.flags),
            )
        for gpa, table in zip(TABLES, s.tables, strict=True):
            for k, d in enumerate(table):
                memory.write(
                    gpa + 16 * k,
                    PVIRTQ_DESC.pack(d.addr % (1 << 64), d.length % (1 << 32), 0, d.flags & 0xFFFF),
                )
        queue = PackedDeviceVirtqueue(memory, 0, MAX_SIZE)
        queue.size = s.size
        queue.desc_addr, queue.driver_addr, queue.device_addr = RING, DRIVER_AREA, DEVICE_AREA
        queue.activate(event_idx=False, indirect=s.indirect)
        queue.last_avail_idx, queue.avail_wrap = s.last_avail, s.avail_wrap
        queue.slots = dict(s.in_flight)
        queue.slots_in_flight = sum(s.in_flight.values())
        queue.inflight = set(s.in_flight)
        for _ in range(s.size + 1):
            state = (queue.last_avail_idx, queue.avail_wrap, dict(queue.slots), queue.slots_in_flight)
            expected = reference_pop(memory, s, queue)
            before = memory.read(BASE, MEM_SIZE)
            try:
                chain = queue.pop()
            except VirtqueueError:
                event(f"refused: {expected}")
                assert isinstance(expected, str), "refused a valid buffer"
                assert (queue.last_avail_idx, queue.avail_wrap, queue.slots, queue.slots_in_flight) == state
                assert memory.read(BASE, MEM_SIZE) == before
                break
            assert not isinstance(expected, str), f"accepted a ring with {expected}"
            assert chain == expected
            event("empty" if chain is None else "buffer")
            if chain is None:
                assert (queue.last_avail_idx, queue.avail_wrap) == state[:2]
                break
            for addr, length in chain.readable + chain.writable:
                assert memory.contains(addr, length)
            assert chain.head in queue.slots and queue.slots_in_flight <= s.size
        else:
            raise AssertionError("pop went on past the queue size")
    finally:
        memory.close()
