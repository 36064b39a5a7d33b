"""The vhost-user rings: device virtqueues on split rings the guest shares from other CPUs.

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
"""

from __future__ import annotations

import dataclasses

from device.blk import VirtioBlkDevice
from device.memory import GuestMemory
from device.platform import GuestMemoryError, memory_barrier
from device.spec import vhost_user as vu
from device.spec.virtio import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_LEGACY_VRING_ALIGN,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
    vring_used_offset,
)
from device.vhost_user.regions import RegionMemory
from device.virtqueue import DescriptorChain, DeviceVirtqueue, VirtqueueError


class VhostUserVirtqueue(DeviceVirtqueue):
    """A device virtqueue on rings shared with a guest on other CPUs.

    Adds the full barriers of the store → load handshakes, and, when guest RAM has holes,
    checks every buffer against the regions (the base class checks the outer bounds only).
    """

    def __init__(self, memory: GuestMemory, index: int, max_size: int) -> None:
        super().__init__(memory, index, max_size)
        self.barrier = memory_barrier

    def pop(self) -> DescriptorChain | None:
        chain = super().pop()
        memory = self.memory
        if chain is not None and isinstance(memory, RegionMemory) and memory.sparse:
            for addr, length in (*chain.readable, *chain.writable):
                if not memory.contains(addr, length):
                    raise VirtqueueError(
                        f"queue {self.index}: buffer [{addr:#x}, +{length:#x}) outside guest RAM"
                    )
        return chain


class VhostUserBlkDevice(VirtioBlkDevice):
    """The virtio-blk device model on vhost-user virtqueues."""

    queue_type = VhostUserVirtqueue
    packed_queue_type = None  # packed rings over vhost-user: not yet (their state in VRING_BASE)


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
    avail: int
    used: int


def configure_queue(device: VhostUserBlkDevice, memory: RegionMemory, ring: Ring) -> RingStart | None:
    """Point the device's queue at the ring (translating its addresses) and activate it."""
    queue = device.queues[ring.index]
    addr = ring.addr
    assert addr is not None
    num = ring.num
    fresh = not queue.active
    try:
        desc = memory.uva_to_gpa(addr.desc, desc_table_size(num))
        avail = memory.uva_to_gpa(addr.avail, avail_ring_size(num))
        used = memory.uva_to_gpa(addr.used, used_ring_size(num))
        if fresh:
            queue.reset()
            queue.size = num
        queue.desc_addr, queue.driver_addr, queue.device_addr = desc, avail, used
        queue.enabled = True
        queue.activate(
            event_idx=device.has_feature(VIRTIO_F_EVENT_IDX),
            indirect=device.has_feature(VIRTIO_F_INDIRECT_DESC),
        )
    except (GuestMemoryError, VirtqueueError) as exc:
        device.device_error(f"ring {ring.index}: {exc}")
        return None
    if fresh:
        queue.last_avail_idx = ring.base
        queue.used_idx = memory.read_u16(used + 2)
    legacy_layout = (
        desc % VIRTIO_LEGACY_VRING_ALIGN == 0
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
    )
