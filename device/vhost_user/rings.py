"""The vhost-user rings: device virtqueues on split and packed rings the guest shares from other CPUs.

Device layer, between the protocol (:mod:`device.vhost_user.protocol`, which records what the
front end says about each ring) and the device model (:class:`device.blk.VirtioBlkDevice`,
whose queues these are).

Memory ordering. The guest runs on a QEMU vCPU thread while this process touches the same
rings, so program order alone is not enough. How each ordering is ensured (x86-64, TSO):

* 16-bit ring fields are read and written with one aligned 2-byte access, single-copy
  atomic on x86: loads through ``struct``'s little-endian ``H`` (a native 2-byte memcpy on a
  little-endian host), stores through :func:`device.platform.store_u16` (a memoryview cast
  to ``H``). Not ``struct.pack_into``: it clears the field before writing it, so a reader on
  another CPU can see the used index at 0 in between (tests/device/test_ring_stores.py).
* Avail index, then avail ring entry, then descriptors (load → load): TSO never reorders
  loads with loads, so entries read after the index are at least as new as the index.
* Used element, then used index (store → store): TSO keeps stores in order, so the guest
  never sees the index before the element.
* Used index, then ``used_event`` / ``NO_INTERRUPT`` (store → load) and ``avail_event``, then
  the avail-index re-check (store → load): the only reordering TSO allows. Each such pair has
  a full barrier between them (:func:`device.platform.memory_barrier`, a LOCK-prefixed
  read-modify-write), the device's half of the Dekker handshake whose guest half is Linux's
  ``virtio_mb()``; without it a completion or a kick could be lost and the guest would hang.
* Call and kick eventfd writes are system calls whose wake-up paths take locks, so every
  ring store before them is visible before the other side wakes up.

VIRTIO_F_EVENT_IDX is offered: with the two barriers above its notification suppression is
the same handshake QEMU's own device does (``virtio_split_should_notify``).

Packed rings (VIRTIO_F_RING_PACKED) hand descriptors over by their flags instead of an index:
the guest writes a buffer's head flags last and the device reads them first (load → load, kept
by TSO; the queue still puts a barrier after the read, as Linux's ``virtio_rmb``); the device
writes a batch's ids and lengths, then the flags of all but the first, then the first one's
(store → store, kept by TSO, with barriers between the steps), then a full barrier before it
reads the driver's event suppression area, the same handshake as the split ring's.

With an in-flight region (:mod:`device.vhost_user.inflight`) each queue records what it takes
and completes there, so that a successor process can take up what this one left in flight.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

from device.blk import VirtioBlkDevice
from device.memory import GuestMemory
from device.packed_virtqueue import PackedDeviceVirtqueue
from device.platform import GuestMemoryError, memory_barrier
from device.spec import vhost_user as vu
from device.spec.virtio import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_LEGACY_VRING_ALIGN,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
    vring_used_offset,
)
from device.spec.virtio_packed import PVIRTQ_EVENT_SIZE, desc_ring_size, off_wrap
from device.vhost_user.inflight import InflightError, InflightRegion, PackedTracker, Recovery, SplitTracker
from device.vhost_user.regions import RegionMemory
from device.virtqueue import DescriptorChain, DeviceVirtqueue, VirtqueueError


def _check_regions(memory: GuestMemory, index: int, chain: DescriptorChain) -> None:
    """With holes in guest RAM, every buffer must lie in one region (the queues check the
    outer bounds only)."""
    if isinstance(memory, RegionMemory) and memory.sparse:
        for addr, length in (*chain.readable, *chain.writable):
            if not memory.contains(addr, length):
                raise VirtqueueError(f"queue {index}: buffer [{addr:#x}, +{length:#x}) outside guest RAM")


class _Tracked:
    """What both vhost-user queues add to their ring: the requests a predecessor left in flight
    first, and each push and publish recorded in the in-flight region.

    A mixin before the ring's own class, whose ``pop``, ``push`` and ``publish`` its ``super()``
    calls reach; :meth:`_used` is the used position the region records.
    """

    tracker: SplitTracker | PackedTracker | None
    resubmit: collections.deque[DescriptorChain]
    barrier: Callable[[], None] | None

    def __init__(self, memory: GuestMemory, index: int, max_size: int) -> None:
        super().__init__(memory, index, max_size)  # type: ignore[call-arg]
        self.barrier = memory_barrier

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        self.tracker = None
        self.resubmit = collections.deque()

    def _used(self) -> int:
        raise NotImplementedError

    def has_available(self) -> bool:
        return bool(self.resubmit) or super().has_available()  # type: ignore[misc]

    def push(self, head: int, length: int) -> None:
        super().push(head, length)  # type: ignore[misc]
        if self.tracker is not None:
            self.tracker.pushed(head)

    def publish(self) -> bool:
        tracker = self.tracker
        if tracker is None or not tracker.batch:
            return bool(super().publish())  # type: ignore[misc]
        used = self._used()
        tracker.before_publish(used)
        wanted = bool(super().publish())  # type: ignore[misc]
        tracker.after_publish(used)
        return wanted


class VhostUserVirtqueue(_Tracked, DeviceVirtqueue):
    """A split device virtqueue on rings shared with a guest on other CPUs.

    Adds the full barriers of the store → load handshakes, checks every buffer against the
    regions when guest RAM has holes, and, with an in-flight region, records each request it
    takes and completes there (:mod:`device.vhost_user.inflight`) and first serves the requests a
    predecessor left in flight.
    """

    tracker: SplitTracker | None

    def _used(self) -> int:
        return self.used_idx

    def track(self, area: memoryview) -> Recovery:
        """Keep the in-flight state in ``area``; queue what a predecessor left in flight."""
        tracker = SplitTracker(area, self.size)
        used = self.memory.read_u16(self.device_addr + 2)
        recovery = tracker.recover(used)
        self.tracker = tracker
        if not recovery.fresh:
            self.used_idx = used
            self.last_avail_idx = recovery.last_avail
            for head in recovery.heads:  # each < size: the tracker reads entries 0 .. size-1 only
                chain = self._walk(head)
                _check_regions(self.memory, self.index, chain)
                self.inflight.add(head)
                self.resubmit.append(chain)
        return recovery

    def pop(self) -> DescriptorChain | None:
        if self.resubmit:
            return self.resubmit.popleft()
        chain = super().pop()
        if chain is not None:
            _check_regions(self.memory, self.index, chain)
            if self.tracker is not None:
                self.tracker.popped(chain.head)
        return chain


class VhostUserPackedVirtqueue(_Tracked, PackedDeviceVirtqueue):
    """A packed device virtqueue on rings shared with a guest on other CPUs (VIRTIO_F_RING_PACKED);
    the same additions as :class:`VhostUserVirtqueue`, with the in-flight region holding copies of
    the descriptors (a packed ring's slots are overwritten by used descriptors)."""

    tracker: PackedTracker | None

    def _used(self) -> int:
        return off_wrap(self.used_idx, self.used_wrap)

    @property
    def base(self) -> int:
        """The ring's state as GET_VRING_BASE carries it: avail position and wrap counter in the
        low half, used position and wrap counter in the high half."""
        return off_wrap(self.last_avail_idx, self.avail_wrap) | off_wrap(self.used_idx, self.used_wrap) << 16

    def set_base(self, base: int) -> None:
        """SET_VRING_BASE's packed form (see :attr:`base`)."""
        avail, used = base & 0xFFFF, base >> 16 & 0xFFFF
        self.last_avail_idx, self.avail_wrap = avail & 0x7FFF, avail >> 15
        self.used_idx, self.used_wrap = used & 0x7FFF, used >> 15
        self._published_wrap = self.used_wrap
        if self.last_avail_idx >= self.size or self.used_idx >= self.size:
            raise VirtqueueError(f"queue {self.index}: base {base:#x} outside the ring of {self.size}")

    def _ring_view(self) -> memoryview:
        return self.memory.buffer[self._desc_off : self._desc_off + desc_ring_size(self.size)]

    def track(self, area: memoryview) -> Recovery:
        """Keep the in-flight state in ``area``; queue what a predecessor left in flight."""
        tracker = PackedTracker(area, self.size)
        recovery = tracker.recover(
            self._ring_view(),
            off_wrap(self.used_idx, self.used_wrap),
            off_wrap(self.last_avail_idx, self.avail_wrap),
        )
        self.tracker = tracker
        if not recovery.fresh:
            self.set_base(recovery.last_avail | recovery.used << 16)
            for head in recovery.heads:
                buffer_id, descs = tracker.copies(head)
                chain = self._chain_from_copies(buffer_id, descs)
                _check_regions(self.memory, self.index, chain)
                if buffer_id in self.slots:
                    raise VirtqueueError(f"queue {self.index}: in-flight buffer id {buffer_id} twice")
                self.slots[buffer_id] = len(descs)
                self.slots_in_flight += len(descs)
                self.inflight.add(buffer_id)
                self.resubmit.append(chain)
        return recovery

    def _chain_from_copies(self, buffer_id: int, descs: list[tuple[int, int, int, int]]) -> DescriptorChain:
        """A buffer rebuilt from the descriptors copied when it was first taken, checked again."""
        if buffer_id >= self.size:
            raise VirtqueueError(
                f"queue {self.index}: in-flight buffer id {buffer_id} >= queue size {self.size}"
            )
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        total = 0
        for k, (addr, length, _id, flags) in enumerate(descs):
            if flags & VIRTQ_DESC_F_INDIRECT:
                if len(descs) > 1 or not self.indirect:
                    raise VirtqueueError(
                        f"queue {self.index}: in-flight copy with a misplaced indirect descriptor"
                    )
                total = self._walk_table(addr, length, readable, writable)
            else:
                total = self._take(addr, length, flags, total, readable, writable)
            if bool(flags & VIRTQ_DESC_F_NEXT) != (k < len(descs) - 1):
                raise VirtqueueError(
                    f"queue {self.index}: in-flight copy of buffer {buffer_id} is not one list"
                )
        return DescriptorChain(buffer_id, readable, writable)

    def pop(self) -> DescriptorChain | None:
        if self.resubmit:
            return self.resubmit.popleft()
        position = self.last_avail_idx
        chain = super().pop()
        if chain is not None:
            _check_regions(self.memory, self.index, chain)
            if self.tracker is not None:
                try:
                    self.tracker.popped(self._ring_view(), position, self.slots[chain.head], chain.head)
                except InflightError as exc:  # a driver that made more available than the ring holds
                    raise VirtqueueError(f"queue {self.index}: {exc}") from exc
        return chain


class VhostUserBlkDevice(VirtioBlkDevice):
    """The virtio-blk device model on vhost-user virtqueues."""

    queue_type = VhostUserVirtqueue
    packed_queue_type = VhostUserPackedVirtqueue


@dataclasses.dataclass(slots=True)
class Ring:
    """What the front end told us about one virtqueue (kept across device starts)."""

    index: int
    num: int = 0
    base: int = 0
    addr: vu.VringAddr | None = None
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    enabled: bool = False
    started: bool = False
    kicks: int = 0
    calls: int = 0
    # Started on a predecessor's in-flight state: interrupt once when the call fd comes.
    recovered: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class RingStart:
    """One ring start, as the device saw it (for logs and tests)."""

    index: int
    features: int
    legacy: bool
    legacy_layout: bool  # desc page aligned, avail right after it, used on the next 4 KiB
    size: int
    base: int
    desc: int  # guest-physical
    avail: int  # the driver area of a packed ring
    used: int  # the device area of a packed ring
    packed: bool = False
    recovery: Recovery | None = None  # what the in-flight region said (None: no region)

    @property
    def resubmitted(self) -> int:
        return len(self.recovery.heads) if self.recovery is not None else 0


def configure_queue(
    device: VhostUserBlkDevice, memory: RegionMemory, ring: Ring, inflight: InflightRegion | None = None
) -> RingStart | None:
    """Point the device's queue at the ring (translating its addresses) and activate it; with an
    in-flight region, a fresh queue takes up what a predecessor left in flight there."""
    queue = device.queues[ring.index]
    addr = ring.addr
    assert addr is not None
    num = ring.num
    fresh = not queue.active
    packed = device.packed
    if packed:
        sizes = (desc_ring_size(num), PVIRTQ_EVENT_SIZE, PVIRTQ_EVENT_SIZE)
    else:
        sizes = (desc_table_size(num), avail_ring_size(num), used_ring_size(num))
    recovery: Recovery | None = None
    try:
        desc = memory.uva_to_gpa(addr.desc, sizes[0])
        avail = memory.uva_to_gpa(addr.avail, sizes[1])
        used = memory.uva_to_gpa(addr.used, sizes[2])
        if fresh:
            queue.reset()
            queue.size = num
        queue.desc_addr, queue.driver_addr, queue.device_addr = desc, avail, used
        queue.enabled = True
        queue.activate(
            event_idx=device.has_feature(VIRTIO_F_EVENT_IDX),
            indirect=device.has_feature(VIRTIO_F_INDIRECT_DESC),
        )
        if fresh:
            if isinstance(queue, VhostUserPackedVirtqueue):
                queue.set_base(ring.base)
            else:
                queue.last_avail_idx = ring.base & 0xFFFF
                queue.used_idx = memory.read_u16(used + 2)
            if inflight is not None and isinstance(queue, VhostUserVirtqueue | VhostUserPackedVirtqueue):
                recovery = queue.track(inflight.area(ring.index, num))
    except (GuestMemoryError, VirtqueueError, InflightError) as exc:
        device.device_error(f"ring {ring.index}: {exc}")
        return None
    legacy_layout = (
        not packed
        and desc % VIRTIO_LEGACY_VRING_ALIGN == 0
        and avail == desc + desc_table_size(num)
        and used == desc + vring_used_offset(num)
    )
    return RingStart(
        ring.index,
        device.driver_features,
        device.legacy,
        legacy_layout,
        num,
        ring.base,
        desc,
        avail,
        used,
        packed,
        recovery,
    )
