"""Fuzzing DeviceVirtqueue with random rings: a valid chain or VirtqueueError, nothing else.

Random descriptor tables, indirect tables, avail entries and indices go into guest RAM;
each pop is checked against a reference walk written from the VIRTIO 1.2 split-ring rules,
and must read a bounded number of descriptors.
"""

from __future__ import annotations

import dataclasses
import struct

from hypothesis import event, given, settings
from hypothesis import strategies as st

from device.memory import GuestMemory
from device.spec.virtio import VIRTQ_DESC, VIRTQ_MAX_CHAIN_BYTES
from device.virtqueue import DescriptorChain, DeviceVirtqueue, VirtqueueError
from tests.device.ring import INDIRECT, NEXT, WRITE, Desc, DescriptorReads, RingWriter, write_table

BASE = 0x4000_0000
MEM_SIZE = 64 * 1024
END = BASE + MEM_SIZE
TABLES = [BASE + 0x1000 + 0x400 * k for k in range(2)]  # where random indirect tables live

DATA = BASE + 0x2000  # where plausible buffers point
HOSTILE_ADDRESSES = (0, BASE - 1, BASE - 16, END - 1, END - 16, (1 << 64) - 1, (1 << 64) - 16, *TABLES)
HOSTILE_LENGTHS = (0, 1, 16, 32, 48, 64, 16 * 17, MEM_SIZE, (1 << 32) - 1)


def shape(raw: bytes, size: int, index: int) -> Desc:
    """Turn 17 random bytes into a descriptor: mostly plausible (so that valid chains occur),
    often an indirect one into a random table, sometimes slightly or wildly wrong."""
    kind = raw[16]
    addr, length, fl, nxt = VIRTQ_DESC.unpack(raw[:16])
    if kind < 150:  # mostly forward links, so that chains end more often than they loop
        forward = min(index + 1 + nxt % 2, size - 1) if nxt % 4 != 3 else nxt % size
        # Writable from a random index on: orderly within a chain unless the thresholds differ.
        write = WRITE if index >= ((fl >> 8) ^ index) % (size + 1) else 0
        last = fl % 4 == 3 or (index == size - 1 and fl % 16 < 12)
        return Desc(DATA + addr % (END - 64 - DATA), length % 65, write | (0 if last else NEXT), forward)
    if kind < 200:
        table = TABLES[addr % 2] if addr % 8 else END - 16 * (1 + addr % 3)
        entries = 16 * (1 + length % (size + 1)) + (8 if length % 16 == 0 else 0)
        return Desc(table, entries, INDIRECT | (fl & (NEXT | WRITE) if fl % 4 == 0 else 0), 0)
    if kind < 216:  # next just past the table
        return Desc(DATA + addr % (END - 64 - DATA), length % 65, NEXT | (fl & WRITE), size)
    if kind < 236:
        addr = HOSTILE_ADDRESSES[addr % len(HOSTILE_ADDRESSES)]
        length = HOSTILE_LENGTHS[length % len(HOSTILE_LENGTHS)]
    return Desc(addr, length, fl if kind & 1 else fl & 7, nxt if kind & 2 else nxt % (size + 2))


def descs(size: int, count: int) -> st.SearchStrategy[list[Desc]]:
    return st.binary(min_size=17 * count, max_size=17 * count).map(
        lambda raw: [shape(raw[17 * k : 17 * k + 17], size, k) for k in range(count)]
    )


@dataclasses.dataclass
class Scenario:
    size: int
    indirect: bool
    table: list[Desc]
    indirect_tables: list[list[Desc]]
    last_avail: int
    pending: int
    heads: list[int]
    inflight: set[int]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    size = draw(st.sampled_from([1, 2, 4, 8]))
    raw = draw(st.binary(min_size=2 * size + 4, max_size=2 * size + 4))
    # Heads: mostly in range, some == size or any 16-bit value; pending: mostly 1..size.
    heads = [
        h if h % 16 == 15 else size if h % 16 == 14 else h % size
        for h in struct.unpack(f"<{size}H", raw[: 2 * size])
    ]
    pick, wild = struct.unpack("<HH", raw[2 * size :])
    pending = 1 + pick % size if pick % 16 < 13 else size + 1 if pick % 16 == 13 else wild
    inflight = {h % size for h in heads[: pick >> 14]} if pick & 0x100 else set()
    return Scenario(
        size=size,
        indirect=draw(st.booleans()),
        table=draw(descs(size, size)),
        indirect_tables=[draw(descs(size, draw(st.integers(0, size + 1)))) for _ in TABLES],
        last_avail=draw(st.integers(0, 0xFFFF)),
        pending=pending,
        heads=heads,
        inflight=inflight,
    )


def _inside(addr: int, length: int) -> bool:
    return addr >= BASE and addr + length <= END


def reference_pop(
    memory: GuestMemory, s: Scenario, ring: RingWriter, last_avail: int, inflight: set[int]
) -> tuple[DescriptorChain | str | None, int]:
    """What pop must do, from the spec's rules: the chain, None (empty ring) or the rule the
    ring breaks; and how many descriptors the walk read (pop may read no more)."""
    pending = (ring.avail_idx - last_avail) & 0xFFFF
    if pending == 0:
        return None, 0
    if pending > s.size:
        return "avail idx too far ahead", 0
    head = memory.read_u16(ring.avail_addr + 4 + 2 * (last_avail % s.size))
    if head >= s.size or head in inflight:
        return "bad head", 0
    flat: list[tuple[int, int, bool]] = []
    table, entries, i, steps, in_indirect = ring.desc_addr, s.size, head, 0, False
    reads = 0
    while True:
        steps += 1
        if steps > entries:
            return "chain longer than its table", reads
        addr, length, fl, nxt = VIRTQ_DESC.unpack(memory.read(table + 16 * i, 16))
        reads += 1
        if fl & INDIRECT:
            if not s.indirect or in_indirect or fl & NEXT:
                return "indirect not allowed here", reads
            if length == 0 or length % 16 or length // 16 > s.size or not _inside(addr, length):
                return "bad indirect table", reads
            table, entries, i, steps, in_indirect = addr, length // 16, 0, 0, True
            continue
        if not _inside(addr, length):
            return "buffer outside RAM", reads
        flat.append((addr, length, bool(fl & WRITE)))
        if not fl & NEXT:
            break
        if nxt >= entries:
            return "next outside the table", reads
        i = nxt
    if sum(length for _, length, _ in flat) > VIRTQ_MAX_CHAIN_BYTES:
        return "more than 2^32 bytes", reads
    writes = [w for _, _, w in flat]
    if writes != sorted(writes):
        return "readable after writable", reads
    return DescriptorChain(
        head, [(a, n) for a, n, w in flat if not w], [(a, n) for a, n, w in flat if w]
    ), reads


@settings(max_examples=500, deadline=None)
@given(s=scenarios())
def test_pop_returns_a_valid_chain_or_raises_virtqueue_error(s: Scenario) -> None:
    memory = GuestMemory(MEM_SIZE, BASE, memfd=False)
    try:
        ring = RingWriter.layout(memory, s.size, BASE)
        ring.write_descs(s.table)
        for gpa, table in zip(TABLES, s.indirect_tables, strict=True):
            write_table(memory, gpa, table)
        for k, head in enumerate(s.heads):
            ring.set_slot(k, head)
        ring.avail_idx = s.last_avail + s.pending
        queue = DeviceVirtqueue(memory, 0, 8)
        ring.configure(queue)
        queue.activate(event_idx=False, indirect=s.indirect)
        queue.last_avail_idx = s.last_avail
        queue.inflight = set(s.inflight)

        with DescriptorReads() as reads:
            for _ in range(s.size + 1):
                last, inflight = queue.last_avail_idx, set(queue.inflight)
                expected, reads.budget = reference_pop(memory, s, ring, last, inflight)
                assert reads.budget <= 2 * s.size  # a chain, then at most one indirect table
                reads.count = 0
                try:
                    chain = queue.pop()
                except VirtqueueError:
                    event(f"refused: {expected}")
                    assert isinstance(expected, str), "refused a valid chain"
                    assert (queue.last_avail_idx, queue.inflight) == (last, inflight)
                    break
                assert not isinstance(expected, str), f"accepted a ring with {expected}"
                assert chain == expected
                event("empty" if chain is None else "chain")
                if chain is None:
                    assert (queue.last_avail_idx, queue.inflight) == (last, inflight)
                    break
                # A returned chain is safe to use as it is.
                for addr, length in chain.readable + chain.writable:
                    assert memory.contains(addr, length)
                assert sum(n for _, n in chain.readable + chain.writable) <= VIRTQ_MAX_CHAIN_BYTES
                assert queue.last_avail_idx == (last + 1) & 0xFFFF
                assert queue.inflight == inflight | {chain.head}
            else:
                raise AssertionError("pop went on past the queue size")
    finally:
        memory.close()


ring_addresses = st.one_of(
    st.integers(BASE - 64, END).map(lambda a: a & ~15),
    st.integers(BASE - 64, END),
    st.integers(0, (1 << 64) - 1),
)


@settings(max_examples=300, deadline=None)
@given(
    size=st.one_of(st.sampled_from([0, 1, 3, 12, 16, 32, 64, 128, 256]), st.integers(0, 0xFFFF)),
    desc=ring_addresses,
    avail=ring_addresses,
    used=ring_addresses,
)
def test_activate_accepts_only_aligned_rings_inside_ram(size: int, desc: int, avail: int, used: int) -> None:
    memory = GuestMemory(MEM_SIZE, BASE, memfd=False)
    try:
        queue = DeviceVirtqueue(memory, 0, 64)
        queue.size, queue.desc_addr, queue.driver_addr, queue.device_addr = size, desc, avail, used
        valid = (
            size in (1, 2, 4, 8, 16, 32, 64)
            and desc % 16 == 0
            and avail % 2 == 0
            and used % 4 == 0
            and _inside(desc, 16 * size)
            and _inside(avail, 6 + 2 * size)
            and _inside(used, 6 + 8 * size)
        )
        try:
            queue.activate(event_idx=True, indirect=True)
        except VirtqueueError:
            assert not valid
            assert not queue.active
        else:
            assert valid
            assert queue.active
    finally:
        memory.close()
