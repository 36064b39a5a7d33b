"""In-flight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): a back end dies anywhere, its
successor resubmits exactly what the guest has not seen completed, in the order it was taken.

The queues are vblk's vhost-user ones on hand-driven rings (split and packed); a "crash" is the
old queue simply never touching memory again, at one of the points a SIGKILL can land: between
two requests, after the region marks a batch but before its used index or flags are stored, or
after they are stored but before the region says so. The successor is a new queue on the same
guest memory and region, started the way QEMU restarts a ring (split: from the used index;
packed: from the base of the ring's last start, which QEMU cannot update without the back end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.memory import GuestMemory
from device.packed_virtqueue import PackedDeviceVirtqueue
from device.spec.virtio_packed import off_wrap
from device.vhost_user.inflight import (
    InflightError,
    InflightMessage,
    InflightRegion,
    queue_area_size,
)
from device.vhost_user.rings import VhostUserPackedVirtqueue, VhostUserVirtqueue
from device.virtqueue import DescriptorChain, DeviceVirtqueue, VirtqueueError
from tests.device.packed_ring import Buffer, PackedRing
from tests.device.ring import WRITE, RingWriter, link

MiB = 1 << 20
SIZE = 16


class SplitDriver:
    """A split ring's driver: buffers of one to three descriptors at fixed table slots."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.writer = RingWriter.layout(memory, SIZE, memory.base)
        self.data = memory.base + MiB
        self.free = list(range(0, SIZE, 4))  # heads; a buffer uses head .. head + 3 at most
        self.last_used = 0
        self.queue: VhostUserVirtqueue = self.new_queue()

    def new_queue(self) -> VhostUserVirtqueue:
        queue = VhostUserVirtqueue(self.memory, 0, 256)
        self.writer.configure(queue)
        queue.activate(event_idx=False, indirect=True)
        return queue

    def restart(self) -> VhostUserVirtqueue:
        queue = self.new_queue()
        queue.last_avail_idx = queue.used_idx = self.writer.used_idx  # QEMU: last_avail = used->idx
        return queue

    def add(self, parts: int) -> int | None:
        if not self.free:
            return None
        head = self.free.pop(0)
        buffers = [(self.data + 512 * k, 64, WRITE if k == parts - 1 else 0) for k in range(parts)]
        self.data += 512 * parts
        self.writer.write_chain(link(buffers), head)
        self.writer.publish(head)
        return head

    def used(self) -> list[int]:
        out = []
        while self.last_used != self.writer.used_idx:
            head, _length = self.writer.used(self.last_used)
            out.append(head)
            self.free.append(head)
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


class PackedDriver:
    """A packed ring's driver (:class:`PackedRing`): lists of one to three descriptors, or indirect."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.ring = PackedRing(memory, SIZE, queue_type=VhostUserPackedVirtqueue, max_size=256)
        queue = self.ring.queue
        assert isinstance(queue, VhostUserPackedVirtqueue)
        self.queue = queue
        self.start_base = 1 << 15 | 1 << 31  # the base of the ring's start: position 0, wrap counters 1

    def restart(self) -> VhostUserPackedVirtqueue:
        old = self.ring.queue
        queue = VhostUserPackedVirtqueue(self.memory, 0, 256)
        queue.size = SIZE
        queue.desc_addr, queue.driver_addr, queue.device_addr = (
            old.desc_addr,
            old.driver_addr,
            old.device_addr,
        )
        queue.activate(event_idx=False, indirect=True)
        queue.set_base(self.start_base)
        return queue

    def add(self, parts: int) -> int | None:
        need = 1 if parts > 3 else parts
        if self.ring.free_slots < need or not self.ring.free_ids:
            return None
        parts = min(parts, 4)
        count = 3 if parts == 4 else parts
        buffers = [Buffer(self.ring.buffer(64), 64, write=k == count - 1) for k in range(count)]
        return self.ring.add(buffers, indirect=parts == 4)

    def used(self) -> list[int]:
        out = []
        while (used := self.ring.used()) is not None:
            out.append(used[0])
        return out


Driver = SplitDriver | PackedDriver


def chains_equal(a: DescriptorChain, b: DescriptorChain) -> bool:
    return (a.head, a.readable, a.writable) == (b.head, b.readable, b.writable)


@dataclasses.dataclass
class Run:
    driver: Driver
    queue: VhostUserVirtqueue | VhostUserPackedVirtqueue
    popped: dict[int, DescriptorChain] = dataclasses.field(default_factory=dict)
    taken_at: dict[int, int] = dataclasses.field(default_factory=dict)  # head -> when last taken
    clock: Iterator[int] = dataclasses.field(default_factory=itertools.count)
    order: list[int] = dataclasses.field(default_factory=list)  # in flight
    pushed: list[int] = dataclasses.field(default_factory=list)  # pushed, not yet published
    seen: list[int] = dataclasses.field(default_factory=list)  # completions the driver saw

    def step(self, op: str, arg: int) -> None:
        queue = self.queue
        if op == "add":
            self.driver.add(arg)
        elif op == "pop":
            chain = queue.pop()
            if chain is not None:
                self.popped[chain.head] = chain
                self.taken_at[chain.head] = next(self.clock)
                self.order.append(chain.head)
        elif op == "push" and self.order:
            head = self.order.pop(arg % len(self.order))
            queue.push(head, 1)
            self.pushed.append(head)
        elif op == "publish":
            queue.publish()
            self.pushed.clear()
            self.seen += self.driver.used()

    def crash(self, where: str) -> None:
        """Stop as a SIGKILL would at ``where`` in a publish of what was pushed."""
        queue = self.queue
        if where == "between" or not self.pushed:
            return
        if isinstance(queue, VhostUserPackedVirtqueue):
            assert queue.tracker is not None
            queue.tracker.before_publish(off_wrap(queue.used_idx, queue.used_wrap))
            if where == "stored":
                PackedDeviceVirtqueue.publish(queue)
        else:
            assert queue.tracker is not None
            queue.tracker.before_publish(queue.used_idx)
            if where == "stored":
                DeviceVirtqueue.publish(queue)
        self.seen += self.driver.used()


def tracked(queue: DeviceVirtqueue, region: InflightRegion) -> bool:
    assert isinstance(queue, VhostUserVirtqueue | VhostUserPackedVirtqueue)
    return queue.track(region.area(0, SIZE)).fresh


OPS = st.lists(
    st.tuples(st.sampled_from(["add", "add", "pop", "pop", "push", "publish"]), st.integers(1, 4)),
    max_size=60,
)


@contextlib.contextmanager
def inflight_region() -> Iterator[InflightRegion]:
    region, fd = InflightRegion.allocate(1, SIZE)
    try:
        yield region
    finally:
        region.close()
        os.close(fd)


def make_driver(layout: str) -> Driver:
    memory = GuestMemory(8 * MiB, memfd=False)
    return SplitDriver(memory) if layout == "split" else PackedDriver(memory)


@pytest.mark.parametrize("layout", ["split", "packed"])
@settings(max_examples=300, deadline=None)
@given(ops=OPS, crash=st.sampled_from(["between", "marked", "stored"]), after=OPS)
def test_a_successor_resubmits_exactly_what_the_guest_did_not_see_completed(
    layout: str, ops: list[tuple[str, int]], crash: str, after: list[tuple[str, int]]
) -> None:
    driver = make_driver(layout)
    with inflight_region() as region:
        queue = driver.queue
        assert isinstance(queue, VhostUserVirtqueue | VhostUserPackedVirtqueue)
        run = Run(driver, queue)
        assert tracked(queue, region)  # a new region: nothing to resubmit
        for op, arg in ops:
            run.step(op, arg)
        run.crash(crash)
        # What the driver has not seen completed, in the order it was taken: the buffers still in
        # flight and, unless their completion landed, the ones pushed in the interrupted batch.
        unseen = set(run.order) | (set(run.pushed) if crash != "stored" else set())
        want = sorted(unseen, key=run.taken_at.__getitem__)

        successor = driver.restart()
        assert not tracked(successor, region)
        resubmitted = []
        while successor.resubmit:
            chain = successor.pop()
            assert chain is not None
            resubmitted.append(chain)
        assert [chain.head for chain in resubmitted] == want
        for chain in resubmitted:
            assert chains_equal(chain, run.popped[chain.head])

        # The successor goes on: every buffer the driver made available completes exactly once.
        run = Run(driver, successor, seen=run.seen, order=[chain.head for chain in resubmitted])
        for op, arg in after:
            run.step(op, arg)
        while (chain := successor.pop()) is not None:
            run.order.append(chain.head)
        for head in run.order:
            successor.push(head, 1)
        successor.publish()
        run.seen += driver.used()
        if isinstance(driver, SplitDriver):
            assert len(driver.free) == SIZE // 4, "a buffer the driver made available never completed"
        else:
            assert not driver.ring.taken, "a buffer the driver made available never completed"
            assert isinstance(successor, VhostUserPackedVirtqueue)
            assert successor.slots_in_flight == 0 and not successor.slots


def test_the_region_is_sized_for_either_ring_and_checked_when_adopted() -> None:
    assert queue_area_size(128) % 64 == 0 and queue_area_size(128) >= 32 + 32 * 128
    region, fd = InflightRegion.allocate(2, 128)
    try:
        assert region.message == InflightMessage(2 * queue_area_size(128), 0, 2, 128)
        with pytest.raises(InflightError, match="need"):
            InflightRegion(fd, InflightMessage(queue_area_size(128), 0, 2, 128))
        with pytest.raises(InflightError, match="no area"):
            region.area(2, 128)
        with pytest.raises(InflightError, match="room for 128"):
            region.area(0, 256)
        with pytest.raises(InflightError, match="payload of 20 bytes"):
            InflightMessage.decode(bytes(20), "SET_INFLIGHT_FD")
        round_trip = InflightMessage.decode(region.message.encode(), "GET_INFLIGHT_FD")
        assert round_trip == region.message and len(region.message.encode()) == 24
    finally:
        region.close()
        os.close(fd)


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_a_corrupt_region_stops_the_ring_instead_of_resubmitting_garbage(layout: str) -> None:
    driver = make_driver(layout)
    with inflight_region() as region:
        assert tracked(driver.queue, region)
        driver.add(2)
        assert driver.queue.pop() is not None
        area = region.area(0, SIZE)
        if isinstance(driver, SplitDriver):
            area[16 + 16 * 4] = 1  # head 4 "in flight", and its descriptor points outside guest RAM
            driver.memory.write(driver.writer.desc_addr + 16 * 4, bytes(16))
            with pytest.raises(VirtqueueError, match="outside guest RAM"):
                tracked(driver.restart(), region)
        else:
            area[32 + 6] = 200  # the head's count of descriptors: more than the ring has
            with pytest.raises(InflightError, match="200 descriptors"):
                tracked(driver.restart(), region)
