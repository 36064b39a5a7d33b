"""Device side of a VIRTIO 1.2 split virtqueue: pop validated chains, push used entries.

Device layer, below the virtio-blk request executor. Everything read from the rings is
untrusted: any violation raises :class:`VirtqueueError`, and the device then marks itself
DEVICE_NEEDS_RESET. Nothing here ever touches memory outside guest RAM.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import Final

from mypy_extensions import mypyc_attr

from device.memory import GuestMemory
from device.platform import GuestMemoryError, Tally, store_u16
from device.spec.virtio import (
    VIRTIO_MSI_NO_VECTOR,
    VIRTQ_AVAIL_ALIGN,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC,
    VIRTQ_DESC_ALIGN,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_SIZE,
    VIRTQ_MAX_CHAIN_BYTES,
    VIRTQ_USED_ALIGN,
    VIRTQ_USED_ELEM,
    avail_ring_size,
    desc_table_size,
    need_event,
    used_ring_size,
)

_U16: Final = struct.Struct("<H")
# The unpackers typed with what they return (struct says Any): compiled code then compares and
# adds the fields as machine integers instead of through generic number objects.
_desc_unpack: Callable[[memoryview, int], tuple[int, int, int, int]] = VIRTQ_DESC.unpack_from
# (not Final: tests/device/ring.py counts the reads through it)
_u16_unpack: Final[Callable[[memoryview, int], tuple[int]]] = _U16.unpack_from
_u16_pack: Final = _U16.pack_into
_used_pack: Final = VIRTQ_USED_ELEM.pack_into

#: Buckets of :attr:`DeviceVirtqueue.pop_batches`: bucket k counts runs of 2**(k-1) .. 2**k - 1
#: chains (bucket 0 stays empty); runs are bounded by the 16-bit ring indices.
BATCH_BUCKETS: Final = 17


class VirtqueueError(Exception):
    """The driver broke a rule of the split virtqueue; the device must stop and need a reset."""


@dataclasses.dataclass(slots=True, init=False)  # one per request: a compiled __init__
class DescriptorChain:
    """A validated chain: its head and its readable then writable ``(gpa, length)`` buffers."""

    head: int
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]

    def __init__(self, head: int, readable: list[tuple[int, int]], writable: list[tuple[int, int]]) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable


@mypyc_attr(allow_interpreted_subclasses=True)  # device.vhost_user subclasses it
class DeviceVirtqueue:
    """One split virtqueue as the device sees it, configured through the transport registers."""

    def __init__(self, memory: GuestMemory, index: int, max_size: int) -> None:
        self.memory = memory
        self.index = index
        self.max_size = max_size
        #: A full memory barrier between a ring store and a later ring load, for drivers on
        #: other CPUs (vhost-user); None in process, where program order is enough.
        self.barrier: Callable[[], None] | None = None
        self.reset()

    def reset(self) -> None:
        """Back to the reset state (4.1.4.3: queue_size reads the maximum, queue disabled)."""
        self.size = self.max_size
        self.desc_addr = 0
        self.driver_addr = 0  # available ring
        self.device_addr = 0  # used ring
        self.enabled = False
        self.msix_vector = VIRTIO_MSI_NO_VECTOR
        self.active = False
        self.event_idx = False
        self.indirect = False
        self.last_avail_idx = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.signalled_used_valid = False
        self.inflight: set[int] = set()
        self._desc_off = self._avail_off = self._used_off = 0
        # Statistics: chains popped in a run until the ring was found empty (the device's
        # batches), by size; the ring view reads them.
        self.pop_batches = [Tally() for _ in range(BATCH_BUCKETS)]
        self._run = 0

    # -- configuration ---------------------------------------------------------------------

    def activate(self, *, event_idx: bool, indirect: bool) -> None:
        """Validate the driver's configuration at DRIVER_OK and start using the rings."""
        size = self.size
        if size == 0 or size & (size - 1) or size > self.max_size:
            raise VirtqueueError(
                f"queue {self.index}: size {size} is not a power of two in 1..{self.max_size}"
            )
        self._map_areas(
            ("descriptor table", self.desc_addr, desc_table_size(size), VIRTQ_DESC_ALIGN),
            ("available ring", self.driver_addr, avail_ring_size(size), VIRTQ_AVAIL_ALIGN),
            ("used ring", self.device_addr, used_ring_size(size), VIRTQ_USED_ALIGN),
        )
        self.event_idx = event_idx
        self.indirect = indirect
        self.active = True

    def _map_areas(self, *areas: tuple[str, int, int, int]) -> None:
        """The descriptor, driver and device areas ``(name, address, length, alignment)``, each
        aligned and inside guest RAM, as offsets into it."""
        offsets = []
        for name, addr, length, align in areas:
            if addr % align:
                raise VirtqueueError(f"queue {self.index}: {name} at {addr:#x} not {align}-aligned")
            try:
                offsets.append(self.memory.offset(addr, length))
            except GuestMemoryError as exc:
                raise VirtqueueError(f"queue {self.index}: {name} outside guest RAM") from exc
        self._desc_off, self._avail_off, self._used_off = offsets

    # -- available ring --------------------------------------------------------------------

    @property
    def avail_idx(self) -> int:
        return int(_u16_unpack(self.memory.buffer, self._avail_off + 2)[0])

    @property
    def avail_flags(self) -> int:
        return int(_u16_unpack(self.memory.buffer, self._avail_off)[0])

    @property
    def used_event(self) -> int:
        return int(_u16_unpack(self.memory.buffer, self._avail_off + 4 + 2 * self.size)[0])

    def has_available(self) -> bool:
        return self.avail_idx != self.last_avail_idx

    def pop(self) -> DescriptorChain | None:
        """The next available chain, validated; None when the ring is empty."""
        buf = self.memory.buffer
        size = self.size
        avail_off = self._avail_off
        last = self.last_avail_idx
        avail_idx = _u16_unpack(buf, avail_off + 2)[0]
        pending = (avail_idx - last) & 0xFFFF
        if pending == 0:
            run = self._run
            if run:
                self.pop_batches[min(run.bit_length(), BATCH_BUCKETS - 1)].count += 1
                self._run = 0
            return None
        if pending > size:
            raise VirtqueueError(
                f"queue {self.index}: available index {avail_idx} is {pending} ahead of "
                f"{last}, more than the {size} entries of the ring"
            )
        head = _u16_unpack(buf, avail_off + 4 + 2 * (last & (size - 1)))[0]
        if head >= size:
            raise VirtqueueError(f"queue {self.index}: available head {head} >= queue size {size}")
        inflight = self.inflight
        if head in inflight:
            raise VirtqueueError(f"queue {self.index}: head {head} made available while in flight")
        if len(inflight) >= size:
            raise VirtqueueError(f"queue {self.index}: more than {size} chains in flight")
        chain = self._walk(head)
        self.last_avail_idx = (last + 1) & 0xFFFF
        inflight.add(head)
        self._run += 1
        return chain

    def _walk(self, head: int) -> DescriptorChain:
        buf = self.memory.buffer
        mem_base = self.memory.base
        mem_end = self.memory.end
        table_off = self._desc_off
        table_len = self.size
        in_indirect = False
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        count = 0
        total = 0
        i = head
        while True:
            count += 1
            if count > table_len:
                raise VirtqueueError(
                    f"queue {self.index}: chain at head {head} is longer than its table "
                    f"of {table_len} (a loop?)"
                )
            addr, length, flags, nxt = _desc_unpack(buf, table_off + VIRTQ_DESC_SIZE * i)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError(f"queue {self.index}: indirect descriptor not negotiated")
                if in_indirect:
                    raise VirtqueueError(f"queue {self.index}: nested indirect descriptor")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError(f"queue {self.index}: indirect descriptor with NEXT set")
                if length == 0 or length % VIRTQ_DESC_SIZE:
                    raise VirtqueueError(
                        f"queue {self.index}: indirect table length {length} is not a "
                        f"non-zero multiple of {VIRTQ_DESC_SIZE}"
                    )
                if length // VIRTQ_DESC_SIZE > self.size:
                    raise VirtqueueError(
                        f"queue {self.index}: indirect table of {length // VIRTQ_DESC_SIZE} "
                        f"entries exceeds the queue size {self.size}"
                    )
                if addr < mem_base or addr + length > mem_end:
                    raise VirtqueueError(f"queue {self.index}: indirect table outside guest RAM")
                table_off = addr - mem_base
                table_len = length // VIRTQ_DESC_SIZE
                in_indirect = True
                count = 0
                i = 0
                continue
            if addr < mem_base or addr + length > mem_end:
                raise VirtqueueError(
                    f"queue {self.index}: buffer [{addr:#x}, +{length:#x}) outside guest RAM"
                )
            total += length
            if total > VIRTQ_MAX_CHAIN_BYTES:
                raise VirtqueueError(f"queue {self.index}: chain longer than 2^32 bytes")
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise VirtqueueError(f"queue {self.index}: readable descriptor after a writable one")
            else:
                readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head, readable, writable)
            if nxt >= table_len:
                raise VirtqueueError(f"queue {self.index}: next {nxt} outside the table of {table_len}")
            i = nxt

    # -- used ring -------------------------------------------------------------------------

    def push(self, head: int, length: int) -> None:
        """Return ``head`` with ``length`` bytes written; becomes visible at :meth:`publish`."""
        self.inflight.discard(head)
        off = self._used_off + 4 + 8 * (self.used_idx & (self.size - 1))
        _used_pack(self.memory.buffer, off, head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def publish(self) -> bool:
        """Write the used index; returns True if the driver wants an interrupt for it."""
        buf = self.memory.buffer
        new = self.used_idx
        store_u16(buf, self._used_off + 2, new)  # never torn: the driver may be reading it
        if self.barrier is not None:
            self.barrier()  # publish the index before reading what the driver asked for
        if not self.event_idx:
            return not (_u16_unpack(buf, self._avail_off)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT)
        old = self.signalled_used
        valid = self.signalled_used_valid
        self.signalled_used = new
        self.signalled_used_valid = True
        if valid and old == new:
            return False
        used_event = _u16_unpack(buf, self._avail_off + 4 + 2 * self.size)[0]
        return not valid or need_event(used_event, new, old)

    def enable_notification(self) -> bool:
        """Ask for a kick on the next buffer; True if one arrived meanwhile (process again)."""
        if self.event_idx:
            store_u16(self.memory.buffer, self._used_off + 4 + 8 * self.size, self.last_avail_idx)
            if self.barrier is not None:
                self.barrier()  # avail_event visible before the re-check of the available index
        return self.has_available()

    @property
    def avail_event(self) -> int:
        return int(_u16_unpack(self.memory.buffer, self._used_off + 4 + 8 * self.size)[0])
