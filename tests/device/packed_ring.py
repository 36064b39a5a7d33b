"""A packed ring driven by hand for device tests: a spec-following driver, and raw access for
hostile ones.

Test helper playing the driver of packed-ring.tex 2.8 below any validation: it writes
descriptors with the AVAIL/USED bits of its wrap counter (the head's flags last), takes buffer
ids from a free list as Linux does, and reads used descriptors at its own used position,
advancing by the count of descriptors each buffer took. :meth:`PackedRing.raw` writes any
descriptor at all, for the tests of what the device refuses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from device.memory import GuestMemory
from device.packed_virtqueue import PackedDeviceVirtqueue
from device.spec.virtio import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from device.spec.virtio_packed import (
    PVIRTQ_DESC,
    PVIRTQ_EVENT,
    avail_flags,
    desc_ring_size,
    is_used,
)

NEXT = VIRTQ_DESC_F_NEXT
WRITE = VIRTQ_DESC_F_WRITE
INDIRECT = VIRTQ_DESC_F_INDIRECT
MiB = 1 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class Buffer:
    """One element of a buffer: guest address, length, device-writable."""

    addr: int
    length: int
    write: bool = False


class PackedRing:
    """A packed queue of ``size`` descriptors in ``memory`` and its device, activated."""

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        *,
        event_idx: bool = False,
        indirect: bool = True,
        max_size: int = 1024,
        queue_type: type[PackedDeviceVirtqueue] = PackedDeviceVirtqueue,
    ) -> None:
        self.memory = memory
        self.size = size
        base = memory.base
        self.ring = base
        self.driver_area = base + desc_ring_size(max_size)
        self.device_area = self.driver_area + 16
        self.tables = self.device_area + 16  # indirect tables
        self.data = base + 4 * MiB  # data buffers from here
        self.queue = queue_type(memory, 0, max_size)
        self.queue.size = size
        self.queue.desc_addr = self.ring
        self.queue.driver_addr = self.driver_area
        self.queue.device_addr = self.device_area
        self.queue.activate(event_idx=event_idx, indirect=indirect)
        self.next_avail = 0
        self.avail_wrap = 1
        self.next_used = 0
        self.used_wrap = 1
        self.free_ids = list(range(size))
        self.taken: dict[int, int] = {}  # id -> ring descriptors
        self.free_slots = size
        self._table_next = self.tables

    # -- the driver's side ------------------------------------------------------------------

    def desc_at(self, position: int) -> tuple[int, int, int, int]:
        addr, length, buffer_id, flags = PVIRTQ_DESC.unpack(self.memory.read(self.ring + 16 * position, 16))
        return addr, length, buffer_id, flags

    def write_desc(self, position: int, addr: int, length: int, buffer_id: int, flags: int) -> None:
        self.memory.write(self.ring + 16 * position, PVIRTQ_DESC.pack(addr, length, buffer_id, flags))

    def add(self, buffers: Sequence[Buffer], *, indirect: bool = False) -> int:
        """Make one buffer available (a list of descriptors, or one indirect table); its id."""
        buffer_id = self.free_ids.pop(0)
        if indirect:
            table = self._table_next
            self._table_next += 16 * len(buffers)
            for k, b in enumerate(buffers):
                self.memory.write(
                    table + 16 * k, PVIRTQ_DESC.pack(b.addr, b.length, 0, WRITE if b.write else 0)
                )
            ring_descs = [(table, 16 * len(buffers), INDIRECT)]
        else:
            ring_descs = [
                (b.addr, b.length, (WRITE if b.write else 0) | (NEXT if k < len(buffers) - 1 else 0))
                for k, b in enumerate(buffers)
            ]
        assert len(ring_descs) <= self.free_slots, "the test asked for more than the ring holds"
        head_position, head_flags = self.next_avail, 0
        for k, (addr, length, list_flags) in enumerate(ring_descs):
            flags = list_flags | avail_flags(self.avail_wrap)
            if k == 0:  # the head's flags are written last, below: until then it is not available
                head_position, head_flags = self.next_avail, flags
                self.write_desc(self.next_avail, addr, length, buffer_id, self._not_available())
            else:
                self.write_desc(self.next_avail, addr, length, buffer_id, flags)
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail = 0
                self.avail_wrap ^= 1
        self.memory.write_u16(self.ring + 16 * head_position + 14, head_flags)
        self.taken[buffer_id] = len(ring_descs)
        self.free_slots -= len(ring_descs)
        return buffer_id

    def _not_available(self) -> int:
        return avail_flags(self.avail_wrap ^ 1)  # the bits of the lap before: not available now

    def used(self) -> tuple[int, int] | None:
        """The next used buffer ``(id, len)``, or None."""
        _addr, length, buffer_id, flags = self.desc_at(self.next_used)
        if not is_used(flags, self.used_wrap):
            return None
        taken = self.taken.pop(buffer_id)
        self.free_slots += taken
        self.free_ids.append(buffer_id)
        self.next_used += taken
        if self.next_used >= self.size:
            self.next_used -= self.size
            self.used_wrap ^= 1
        return buffer_id, length

    def set_driver_event(self, off_wrap: int, flags: int) -> None:
        self.memory.write(self.driver_area, PVIRTQ_EVENT.pack(off_wrap, flags))

    def device_event(self) -> tuple[int, int]:
        off_wrap, flags = PVIRTQ_EVENT.unpack(self.memory.read(self.device_area, 4))
        return off_wrap, flags

    def buffer(self, length: int) -> int:
        """A data buffer's guest address (never reused: tests can check what was written)."""
        addr = self.data
        self.data += (length + 15) & ~15
        return addr
