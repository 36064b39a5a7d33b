"""Device side of a VIRTIO 1.2 packed virtqueue: pop validated buffers, write used descriptors.

Device layer, beside :mod:`device.virtqueue` (the split ring), with the same interface, so the
request executor above serves either: :meth:`pop` gives a :class:`DescriptorChain` whose
``head`` is the buffer id, :meth:`push` returns it, :meth:`publish` makes the used descriptors
visible and says whether the driver wants an interrupt. The ring is one array of descriptors
that the driver makes available and the device overwrites with used ones; each side tracks its
position and a wrap counter (packed-ring.tex 2.8.1). Everything read from the ring is untrusted:
any violation raises :class:`~device.virtqueue.VirtqueueError` (the device then needs a reset)
before anything of the buffer is used, and nothing outside the ring's areas and guest RAM is
ever touched.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from mypy_extensions import mypyc_attr

from device.memory import GuestMemory
from device.platform import store_u16
from device.spec.virtio import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_MAX_CHAIN_BYTES,
)
from device.spec.virtio_packed import (
    PVIRTQ_DESC,
    PVIRTQ_DESC_ALIGN,
    PVIRTQ_DESC_SIZE,
    PVIRTQ_EVENT_ALIGN,
    PVIRTQ_EVENT_SIZE,
    PVIRTQ_MAX_SIZE,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
    desc_ring_size,
    off_wrap,
    packed_need_event,
    used_flags,
)
from device.virtqueue import BATCH_BUCKETS, DescriptorChain, DeviceVirtqueue, VirtqueueError

_desc_unpack: Final[Callable[[memoryview, int], tuple[int, int, int, int]]] = PVIRTQ_DESC.unpack_from
_u16: Final = struct.Struct("<H")
_u16_unpack: Final[Callable[[memoryview, int], tuple[int]]] = _u16.unpack_from
_u32: Final = struct.Struct("<I")
_u32_pack: Final = _u32.pack_into
_u32_unpack: Final[Callable[[memoryview, int], tuple[int]]] = _u32.unpack_from
_u16_pack: Final = _u16.pack_into

_AVAIL_USED: Final = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED
# Flags a ring descriptor may carry besides AVAIL/USED; the rest are reserved.
_KNOWN: Final = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_INDIRECT | _AVAIL_USED


@mypyc_attr(allow_interpreted_subclasses=True)  # device.vhost_user subclasses it
class PackedDeviceVirtqueue(DeviceVirtqueue):
    """One packed virtqueue as the device sees it. ``desc_addr`` is the descriptor ring,
    ``driver_addr`` the Driver Event Suppression area, ``device_addr`` the Device one."""

    def __init__(self, memory: GuestMemory, index: int, max_size: int) -> None:
        super().__init__(memory, index, max_size)

    def reset(self) -> None:
        super().reset()
        self.avail_wrap = 1  # the driver's wrap counter as the device tracks it (starts at 1)
        self.used_wrap = 1  # the device's own
        #: Buffers popped and not yet pushed: id -> the ring descriptors they took.
        self.slots: dict[int, int] = {}
        self.slots_in_flight = 0
        self._pending: list[tuple[int, int]] = []  # (ring offset, flags) of used descriptors not published
        self._published_wrap = 1

    # -- configuration ---------------------------------------------------------------------

    def activate(self, *, event_idx: bool, indirect: bool) -> None:
        size = self.size
        if not 1 <= size <= min(self.max_size, PVIRTQ_MAX_SIZE):
            raise VirtqueueError(f"queue {self.index}: size {size} is not in 1..{self.max_size}")
        self._map_areas(
            ("descriptor ring", self.desc_addr, desc_ring_size(size), PVIRTQ_DESC_ALIGN),
            ("driver event suppression area", self.driver_addr, PVIRTQ_EVENT_SIZE, PVIRTQ_EVENT_ALIGN),
            ("device event suppression area", self.device_addr, PVIRTQ_EVENT_SIZE, PVIRTQ_EVENT_ALIGN),
        )
        self.event_idx = event_idx
        self.indirect = indirect
        self.active = True

    # -- what the ring view and the vhost-user state read ------------------------------------

    @property
    def avail_idx(self) -> int:
        """The device's next avail position with its wrap counter in bit 15 (vhost-user's form)."""
        return off_wrap(self.last_avail_idx, self.avail_wrap)

    @property
    def avail_flags(self) -> int:
        """The Driver Event Suppression flags (ENABLE, DISABLE or DESC)."""
        return int(_u16_unpack(self.memory.buffer, self._avail_off + 2)[0])

    @property
    def used_event(self) -> int:
        """The Driver Event Suppression ``off_wrap``: where the driver wants an interrupt."""
        return int(_u16_unpack(self.memory.buffer, self._avail_off)[0])

    @property
    def avail_event(self) -> int:
        """The Device Event Suppression ``off_wrap`` the device last wrote."""
        return int(_u16_unpack(self.memory.buffer, self._used_off)[0])

    # -- available descriptors ---------------------------------------------------------------

    def _flags_at(self, position: int) -> int:
        return int(_u16_unpack(self.memory.buffer, self._desc_off + PVIRTQ_DESC_SIZE * position + 14)[0])

    def has_available(self) -> bool:
        flags = self._flags_at(self.last_avail_idx)
        wrap = self.avail_wrap
        return bool(flags & VRING_PACKED_DESC_F_AVAIL) == bool(wrap) and bool(
            flags & VRING_PACKED_DESC_F_USED
        ) != bool(wrap)

    def pop(self) -> DescriptorChain | None:
        """The next available buffer, validated; None when the next descriptor is not available."""
        if not self.has_available():
            run = self._run
            if run:
                self.pop_batches[min(run.bit_length(), BATCH_BUCKETS - 1)].count += 1
                self._run = 0
            return None
        if self.barrier is not None:
            self.barrier()  # the head's flags before the rest of the chain (the driver wrote them last)
        chain, taken = self._walk_ring()
        buffer_id = chain.head
        if buffer_id in self.slots:
            raise VirtqueueError(f"queue {self.index}: buffer id {buffer_id} made available while in flight")
        if self.slots_in_flight + taken > self.size:
            raise VirtqueueError(
                f"queue {self.index}: {self.slots_in_flight + taken} descriptors in flight, more than "
                f"the {self.size} of the ring"
            )
        self.slots[buffer_id] = taken
        self.slots_in_flight += taken
        self.inflight.add(buffer_id)
        position = self.last_avail_idx + taken
        if position >= self.size:
            position -= self.size
            self.avail_wrap ^= 1
        self.last_avail_idx = position
        self._run += 1
        return chain

    def _walk_ring(self) -> tuple[DescriptorChain, int]:
        """The buffer starting at the device's avail position: (chain, ring descriptors taken)."""
        buf = self.memory.buffer
        size = self.size
        position = self.last_avail_idx
        wrap = self.avail_wrap
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        total = 0
        taken = 0
        while True:
            taken += 1
            if taken > size:
                raise VirtqueueError(f"queue {self.index}: a buffer's list is longer than the ring of {size}")
            addr, length, buffer_id, flags = _desc_unpack(buf, self._desc_off + PVIRTQ_DESC_SIZE * position)
            if bool(flags & VRING_PACKED_DESC_F_AVAIL) != bool(wrap) or bool(
                flags & VRING_PACKED_DESC_F_USED
            ) == bool(wrap):
                raise VirtqueueError(
                    f"queue {self.index}: descriptor {position} of a buffer's list is not available "
                    "(AVAIL/USED do not match the wrap counter)"
                )
            if flags & ~_KNOWN:
                raise VirtqueueError(
                    f"queue {self.index}: descriptor {position} has reserved flags {flags:#x}"
                )
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError(f"queue {self.index}: indirect descriptor not negotiated")
                if taken > 1 or flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError(f"queue {self.index}: indirect descriptor in a list of several")
                if flags & VIRTQ_DESC_F_WRITE:
                    raise VirtqueueError(f"queue {self.index}: WRITE on an indirect descriptor (reserved)")
                total = self._walk_table(addr, length, readable, writable)
            else:
                total = self._take(addr, length, flags, total, readable, writable)
            position += 1
            if position == size:
                position = 0
                wrap ^= 1  # the driver's counter flipped inside the list: the rest carry the new bits
            if not flags & VIRTQ_DESC_F_NEXT:
                if buffer_id >= size:
                    raise VirtqueueError(f"queue {self.index}: buffer id {buffer_id} >= queue size {size}")
                return DescriptorChain(buffer_id, readable, writable), taken

    def _walk_table(
        self, addr: int, length: int, readable: list[tuple[int, int]], writable: list[tuple[int, int]]
    ) -> int:
        """An indirect table's buffers, in order; returns their total length."""
        mem_base = self.memory.base
        mem_end = self.memory.end
        if length == 0 or length % PVIRTQ_DESC_SIZE:
            raise VirtqueueError(
                f"queue {self.index}: indirect table length {length} is not a non-zero multiple of "
                f"{PVIRTQ_DESC_SIZE}"
            )
        entries = length // PVIRTQ_DESC_SIZE
        if entries > self.max_size:
            raise VirtqueueError(
                f"queue {self.index}: indirect table of {entries} entries exceeds the device's "
                f"limit of {self.max_size}"
            )
        if addr < mem_base or addr + length > mem_end:
            raise VirtqueueError(f"queue {self.index}: indirect table outside guest RAM")
        buf = self.memory.buffer
        table = addr - mem_base
        total = 0
        for k in range(entries):
            entry_addr, entry_length, _id, flags = _desc_unpack(buf, table + PVIRTQ_DESC_SIZE * k)
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise VirtqueueError(f"queue {self.index}: nested indirect descriptor")
            total = self._take(entry_addr, entry_length, flags, total, readable, writable)
        return total

    def _take(
        self,
        addr: int,
        length: int,
        flags: int,
        total: int,
        readable: list[tuple[int, int]],
        writable: list[tuple[int, int]],
    ) -> int:
        """One element of a buffer, checked (inside guest RAM, readable ones first, at most 2^32
        bytes in all) and added to its side; returns the buffer's length so far."""
        if addr < self.memory.base or addr + length > self.memory.end:
            raise VirtqueueError(f"queue {self.index}: buffer [{addr:#x}, +{length:#x}) outside guest RAM")
        total += length
        if total > VIRTQ_MAX_CHAIN_BYTES:
            raise VirtqueueError(f"queue {self.index}: buffer longer than 2^32 bytes")
        if flags & VIRTQ_DESC_F_WRITE:
            writable.append((addr, length))
        elif writable:
            raise VirtqueueError(f"queue {self.index}: readable descriptor after a writable one")
        else:
            readable.append((addr, length))
        return total

    # -- used descriptors ----------------------------------------------------------------------

    def push(self, head: int, length: int) -> None:
        """Return buffer ``head`` with ``length`` bytes written: its used descriptor is written at
        the device's used position (id and len now, flags at :meth:`publish`)."""
        taken = self.slots.pop(head)
        self.inflight.discard(head)
        self.slots_in_flight -= taken
        off = self._desc_off + PVIRTQ_DESC_SIZE * self.used_idx
        buf = self.memory.buffer
        _u32_pack(buf, off + 8, length)
        _u16_pack(buf, off + 12, head)
        self._pending.append((off + 14, used_flags(self.used_wrap)))
        position = self.used_idx + taken
        if position >= self.size:
            position -= self.size
            self.used_wrap ^= 1
        self.used_idx = position

    def publish(self) -> bool:
        """Make the pushed used descriptors visible (the first one's flags last, so the driver sees
        the batch whole), then read the Driver Event Suppression area: True if the driver wants an
        interrupt for them."""
        pending = self._pending
        if not pending:
            return False
        buf = self.memory.buffer
        if self.barrier is not None:
            self.barrier()  # ids and lengths before the flags that hand them over
        for off, flags in pending[1:]:
            store_u16(buf, off, flags)
        if len(pending) > 1 and self.barrier is not None:
            self.barrier()
        off, flags = pending[0]
        store_u16(buf, off, flags)
        pending.clear()
        if self.barrier is not None:
            self.barrier()  # the used flags before reading what the driver asked for
        old = self.signalled_used
        new = self.used_idx
        # A batch that wrapped forces a notification, as QEMU's: positions restart at 0, so old and
        # new no longer compare.
        valid = self.signalled_used_valid and self._published_wrap == self.used_wrap
        self.signalled_used = new
        self.signalled_used_valid = True
        self._published_wrap = self.used_wrap
        word = int(_u32_unpack(buf, self._avail_off)[0])  # off_wrap and flags in one read, never torn
        event_off_wrap = word & 0xFFFF
        event_flags = word >> 16
        if event_flags == VRING_PACKED_EVENT_FLAG_DISABLE:
            return False
        if event_flags != VRING_PACKED_EVENT_FLAG_DESC or not self.event_idx:
            return True  # ENABLE (and a reserved value, or DESC without EVENT_IDX: notify, as QEMU)
        return not valid or packed_need_event(event_off_wrap, self.used_wrap, new, old, self.size)

    def enable_notification(self) -> bool:
        """Ask for a kick on the next buffer; True if one arrived meanwhile (process again)."""
        buf = self.memory.buffer
        if self.event_idx:
            store_u16(buf, self._used_off, off_wrap(self.last_avail_idx, self.avail_wrap))
            store_u16(buf, self._used_off + 2, VRING_PACKED_EVENT_FLAG_DESC)
        else:
            store_u16(buf, self._used_off + 2, VRING_PACKED_EVENT_FLAG_ENABLE)
        if self.barrier is not None:
            self.barrier()  # the event area visible before the re-check of the ring
        return self.has_available()

    def disable_notification(self) -> None:
        """No kicks while the device drains the ring (Device Event Suppression DISABLE)."""
        store_u16(self.memory.buffer, self._used_off + 2, VRING_PACKED_EVENT_FLAG_DISABLE)
