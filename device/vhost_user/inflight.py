"""In-flight I/O tracking: what a vhost-user back end took from the rings, kept where its successor finds it.

Device layer, under the vhost-user rings (:mod:`device.vhost_user.rings`), which call in here on
every pop, push and publish once the front end handed over a region; the protocol
(:mod:`device.vhost_user.protocol`) allocates and adopts the region
(``VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD``, GET/SET_INFLIGHT_FD). QEMU keeps the memfd across a
back-end restart and hands it to the next process, which resubmits every request the dead one
had taken and not completed, in the order it took them, and goes on from the ring position the
region records. The guest sees a pause, not an error.

The region holds one area per queue, back to back, each :func:`queue_area_size` bytes. Only the
back end reads it (QEMU treats it as opaque bytes), so its layout is the back end's contract with
its own successor:

* **split rings** use the layout of the vhost-user specification and libvhost-user: a 16-byte
  header ``u64 features, u16 version, u16 desc_num, u16 last_batch_head, u16 used_idx`` and one
  16-byte ``{u8 inflight, u8 pad[5], u16 next, u64 counter}`` per head descriptor index.
  A batch of completions is linked through ``next`` from ``last_batch_head`` before the used
  index is stored; a successor that finds the region's ``used_idx`` behind the ring's knows the
  batch landed and clears it.
* **packed rings** keep the specification's 32-byte descriptor copies ``{u8 inflight, u8 pad,
  u16 next, u16 last, u16 num, u64 counter, u16 id, u16 flags, u32 len, u64 addr}``, taken from
  a free list: a buffer's entries are linked through ``next``, its head entry holds ``num`` (the
  descriptors it took) and the ``inflight`` flag, and ``last`` links the head entries of a batch
  being published. The header is vblk's (libvhost-user has no packed rings to be compatible
  with): ``u64 features, u16 version, u16 desc_num, u16 batch_head, u16 batch_len, u32 used,
  u32 batch_end``, ``used`` and ``batch_end`` being ring positions with the wrap counter in
  bit 15. ``batch_len`` marks a batch being published; a successor that finds it set looks at
  the descriptor at ``used``: in used form with the used wrap counter, the batch landed. The
  free list is not stored: a successor rebuilds it from the entries the in-flight heads hold.

Copies are kept because a packed ring's slots are overwritten by used descriptors; a split ring's
descriptor table stays the driver's until the buffer is used, so a successor walks it again.

A SIGKILL stops this process between two instructions, never inside one store, and the region
is shared memory: each step below is ordered by program order alone, against a successor that
runs only after this process is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import mmap
import os
import struct
from collections.abc import Callable
from typing import Final

from device.spec.virtio_packed import (
    PVIRTQ_DESC,
    PVIRTQ_DESC_SIZE,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
)

#: GET/SET_INFLIGHT_FD's payload: mmap_size, mmap_offset, num_queues, queue_size (C padding: 24 bytes).
INFLIGHT_MESSAGE: Final = struct.Struct("<QQHH4x")
AREA_ALIGN: Final = 64
SPLIT_HEADER: Final = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
SPLIT_DESC: Final = struct.Struct("<B5xHQ")  # inflight, next, counter
PACKED_HEADER: Final = struct.Struct(
    "<QHHHHII8x"
)  # features, version, desc_num, batch_head, batch_len, used, batch_end
PACKED_ENTRY: Final = struct.Struct("<BxHHHQHHIQ")  # inflight, next, last, num, counter, id, flags, len, addr
VERSION: Final = 1

_u16: Final = struct.Struct("<H")
_u32: Final = struct.Struct("<I")
_u64: Final = struct.Struct("<Q")
_entry_unpack: Final[Callable[[memoryview, int], tuple[int, int, int, int, int, int, int, int, int]]] = (
    PACKED_ENTRY.unpack_from
)
_desc_unpack: Final[Callable[[memoryview, int], tuple[int, int, int, int]]] = PVIRTQ_DESC.unpack_from

# Field offsets.
_SPLIT_VERSION, _SPLIT_DESC_NUM, _SPLIT_BATCH_HEAD, _SPLIT_USED = 8, 10, 12, 14
_PACKED_VERSION, _PACKED_DESC_NUM, _PACKED_BATCH_HEAD, _PACKED_BATCH_LEN, _PACKED_USED, _PACKED_BATCH_END = (
    8,
    10,
    12,
    14,
    16,
    20,
)


class InflightError(ValueError):
    """A region that does not fit the rings it is for."""


def queue_area_size(queue_size: int) -> int:
    """One queue's area (room for either ring layout), aligned as libvhost-user aligns it."""
    need = max(
        SPLIT_HEADER.size + SPLIT_DESC.size * queue_size, PACKED_HEADER.size + PACKED_ENTRY.size * queue_size
    )
    return -(-need // AREA_ALIGN) * AREA_ALIGN


@dataclasses.dataclass(frozen=True, slots=True)
class InflightMessage:
    """The payload of GET_INFLIGHT_FD (and of its reply) and of SET_INFLIGHT_FD."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    def encode(self) -> bytes:
        return INFLIGHT_MESSAGE.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    @classmethod
    def decode(cls, payload: bytes, what: str) -> InflightMessage:
        if len(payload) != INFLIGHT_MESSAGE.size:
            raise InflightError(f"{what}: payload of {len(payload)} bytes, need {INFLIGHT_MESSAGE.size}")
        return cls(*INFLIGHT_MESSAGE.unpack(payload))


class InflightRegion:
    """The shared region, mapped: one area per queue."""

    def __init__(self, fd: int, message: InflightMessage) -> None:
        if message.num_queues < 1 or message.queue_size < 1:
            raise InflightError(f"in-flight region for {message.num_queues} queues of {message.queue_size}")
        need = message.num_queues * queue_area_size(message.queue_size)
        if message.mmap_size < need:
            raise InflightError(
                f"in-flight region of {message.mmap_size} bytes, {message.num_queues} queues of "
                f"{message.queue_size} need {need}"
            )
        if message.mmap_offset % mmap.ALLOCATIONGRANULARITY:
            raise InflightError(f"in-flight region offset {message.mmap_offset:#x} is not page-aligned")
        try:
            self._mmap = mmap.mmap(fd, message.mmap_size, mmap.MAP_SHARED, offset=message.mmap_offset)
        except (OSError, ValueError) as exc:
            raise InflightError(f"cannot map the in-flight region: {exc}") from exc
        self.message = message
        self.buffer = memoryview(self._mmap)

    @classmethod
    def allocate(cls, num_queues: int, queue_size: int) -> tuple[InflightRegion, int]:
        """A new zeroed region in a sealed memfd (GET_INFLIGHT_FD): the region and the fd to send."""
        size = num_queues * queue_area_size(queue_size)
        fd = os.memfd_create("vblk-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            return cls(fd, InflightMessage(size, 0, num_queues, queue_size)), fd
        except BaseException:
            os.close(fd)
            raise

    def area(self, index: int, ring_size: int) -> memoryview:
        """Queue ``index``'s area, for a ring of ``ring_size`` descriptors."""
        size = queue_area_size(self.message.queue_size)
        if not 0 <= index < self.message.num_queues:
            raise InflightError(f"the in-flight region has no area for queue {index}")
        if ring_size > self.message.queue_size:
            raise InflightError(
                f"queue {index} has {ring_size} descriptors, the in-flight region room for "
                f"{self.message.queue_size}"
            )
        return self.buffer[index * size : (index + 1) * size]

    def close(self) -> None:
        self.buffer.release()
        with contextlib.suppress(BufferError):  # a queue still holds a view: unmapped at collection
            self._mmap.close()


@dataclasses.dataclass(frozen=True, slots=True)
class Recovery:
    """What a queue's area says when a ring starts on it."""

    fresh: bool  # an empty area (now initialised): nothing to resubmit, the ring's base stands
    heads: list[int]  # split: head indices; packed: head entries, in the order first taken
    last_avail: int  # split: the free-running index; packed: position | wrap << 15
    used: int  # packed only: position | wrap << 15 (split: the ring's used index)
    landed: int  # completions of an interrupted batch found to have landed


class SplitTracker:
    """The split-ring area of one queue."""

    def __init__(self, area: memoryview, size: int) -> None:
        self.area = area
        self.size = size
        self.counter = 1
        self.batch: list[int] = []

    def _entry(self, head: int) -> int:
        return SPLIT_HEADER.size + SPLIT_DESC.size * head

    def recover(self, ring_used: int) -> Recovery:
        """Read (or initialise) the area; ``ring_used`` is the used index in guest memory."""
        area, size = self.area, self.size
        _features, version, desc_num, batch_head, used = SPLIT_HEADER.unpack_from(area, 0)
        if version != VERSION or desc_num != size:
            area[: self._entry(size)] = bytes(self._entry(size))
            SPLIT_HEADER.pack_into(area, 0, 0, VERSION, size, 0, ring_used)
            return Recovery(True, [], ring_used, ring_used, 0)
        landed = (ring_used - used) & 0xFFFF
        if landed > size:
            raise InflightError(
                f"in-flight area: used index {ring_used} is {landed} past the region's {used}"
            )
        head = batch_head
        for _ in range(landed):  # the last batch's used index was stored: it completed
            if head >= size:
                raise InflightError(f"in-flight area: batch head {head} >= queue size {size}")
            offset = self._entry(head)
            area[offset] = 0
            head = _u16.unpack_from(area, offset + 6)[0]
        _u16.pack_into(area, _SPLIT_USED, ring_used)
        found = []
        for index in range(size):
            flag, _next, counter = SPLIT_DESC.unpack_from(area, self._entry(index))
            if flag:
                found.append((counter, index))
        found.sort()
        self.counter = (found[-1][0] + 1) if found else 1
        heads = [index for _counter, index in found]
        return Recovery(False, heads, (ring_used + len(heads)) & 0xFFFF, ring_used, landed)

    def popped(self, head: int) -> None:
        offset = self._entry(head)
        _u64.pack_into(self.area, offset + 8, self.counter)
        self.counter += 1
        self.area[offset] = 1

    def pushed(self, head: int) -> None:
        self.batch.append(head)

    def before_publish(self, used_idx: int) -> None:
        """Link the batch (from ``last_batch_head``) before its used index is stored."""
        del used_idx  # the ring's used index itself marks whether the batch landed
        batch, area = self.batch, self.area
        for k in range(len(batch) - 1):
            _u16.pack_into(area, self._entry(batch[k]) + 6, batch[k + 1])
        _u16.pack_into(area, _SPLIT_BATCH_HEAD, batch[0])

    def after_publish(self, used_idx: int) -> None:
        """The used index is stored: the batch is no longer in flight."""
        area = self.area
        for head in self.batch:
            area[self._entry(head)] = 0
        _u16.pack_into(area, _SPLIT_USED, used_idx)
        self.batch.clear()


class PackedTracker:
    """The packed-ring area of one queue: copies of the descriptors of every buffer in flight.

    Entries are taken from a free list (rebuilt from the in-flight heads when a ring starts), not
    indexed by ring position: the driver reuses a slot as soon as it has read the used descriptor
    written there, which may be long before the buffer first read from that slot completes.
    """

    def __init__(self, area: memoryview, size: int) -> None:
        self.area = area
        self.size = size
        self.counter = 1
        self.free = list(range(size - 1, -1, -1))  # entries not holding a buffer in flight
        self.batch: list[int] = []  # head entries of the buffers pushed since the last publish
        self.releasing: list[int] = []  # their entries, free once the batch is published
        self.entries: dict[int, list[int]] = {}  # buffer id -> its entries (head first)

    def _entry(self, index: int) -> int:
        return PACKED_HEADER.size + PACKED_ENTRY.size * index

    def recover(self, ring: memoryview, used: int, avail: int) -> Recovery:
        """Read (or initialise) the area. ``ring`` is the descriptor ring; ``used`` and ``avail``
        (position | wrap << 15) are what the front end's SET_VRING_BASE said."""
        area, size = self.area, self.size
        _features, version, desc_num, batch_head, batch_len, region_used, batch_end = (
            PACKED_HEADER.unpack_from(area, 0)
        )
        if version != VERSION or desc_num != size:
            area[: self._entry(size)] = bytes(self._entry(size))
            PACKED_HEADER.pack_into(area, 0, 0, VERSION, size, 0, 0, used, used)
            return Recovery(True, [], avail, used, 0)
        landed = 0
        if batch_len:
            position, wrap = region_used & 0x7FFF, region_used >> 15 & 1
            if region_used != batch_end and position < size:
                flags = _desc_unpack(ring, PVIRTQ_DESC_SIZE * position)[3]
                avail_bit = bool(flags & VRING_PACKED_DESC_F_AVAIL)
                if avail_bit == bool(flags & VRING_PACKED_DESC_F_USED) == bool(wrap):  # the batch landed
                    self._clear_batch(batch_head, batch_len)
                    landed = batch_len
                    _u32.pack_into(area, _PACKED_USED, batch_end)
            elif region_used == batch_end:  # landed and recorded; only the marker was left
                self._clear_batch(batch_head, batch_len)
            _u16.pack_into(area, _PACKED_BATCH_LEN, 0)
        region_used = _u32.unpack_from(area, _PACKED_USED)[0]
        found = []
        taken: set[int] = set()
        for index in range(size):
            flag, _next, _link, num, counter, buffer_id, *_ = _entry_unpack(area, self._entry(index))
            if flag:
                chain = self._chain(index, num)
                if taken.intersection(chain):
                    raise InflightError(f"in-flight area: entry {index}'s buffer shares entries with another")
                taken.update(chain)
                found.append((counter, index, num, buffer_id, chain))
        found.sort()
        self.counter = (found[-1][0] + 1) if found else 1
        total = sum(num for _c, _i, num, _b, _chain in found)
        position, wrap = region_used & 0x7FFF, region_used >> 15 & 1
        if position >= size:
            raise InflightError(f"in-flight area: used position {position} >= queue size {size}")
        position += total
        if position >= size:
            position -= size
            wrap ^= 1
        self.free = [index for index in range(size - 1, -1, -1) if index not in taken]
        self.entries = {buffer_id: chain for _c, _i, _n, buffer_id, chain in found}
        return Recovery(
            False, [i for _c, i, _n, _b, _chain in found], position | wrap << 15, region_used, landed
        )

    def _chain(self, head: int, num: int) -> list[int]:
        """The entries of the buffer whose head entry is ``head``, checked."""
        size = self.size
        if not 1 <= num <= size:
            raise InflightError(f"in-flight area: a buffer of {num} descriptors at entry {head}")
        chain = [head]
        index = head
        for _ in range(num - 1):
            index = _u16.unpack_from(self.area, self._entry(index) + 2)[0]
            if index >= size or index in chain:
                raise InflightError(f"in-flight area: entry {head}'s buffer links to entry {index}")
            chain.append(index)
        return chain

    def _clear_batch(self, head: int, count: int) -> None:
        area, size = self.area, self.size
        for _ in range(count):
            if head >= size:
                raise InflightError(f"in-flight area: batch entry {head} >= queue size {size}")
            offset = self._entry(head)
            area[offset] = 0
            head = _u16.unpack_from(area, offset + 4)[0]

    def copies(self, head: int) -> tuple[int, list[tuple[int, int, int, int]]]:
        """The buffer whose head entry is ``head``: (id, [(addr, len, id, flags)...])."""
        area = self.area
        entry = _entry_unpack(area, self._entry(head))
        descs = []
        for index in self._chain(head, entry[3]):
            copy = _entry_unpack(area, self._entry(index))
            descs.append((copy[8], copy[7], copy[5], copy[6]))
        return entry[5], descs

    def popped(self, ring: memoryview, position: int, taken: int, buffer_id: int) -> None:
        """Copy the buffer's ring descriptors to free entries, then mark it in flight (its head
        entry's flag last)."""
        area, size, free = self.area, self.size, self.free
        if len(free) < taken:
            raise InflightError(f"in-flight area: more than the ring's {size} descriptors in flight")
        chain = [free.pop() for _ in range(taken)]
        for k in range(taken - 1, -1, -1):
            p = position + k
            if p >= size:
                p -= size
            addr, length, desc_id, flags = _desc_unpack(ring, PVIRTQ_DESC_SIZE * p)
            PACKED_ENTRY.pack_into(
                area,
                self._entry(chain[k]),
                0,
                chain[k + 1] if k + 1 < taken else 0,
                0,
                taken if k == 0 else 0,
                self.counter if k == 0 else 0,
                desc_id,
                flags,
                length,
                addr,
            )
        self.counter += 1
        self.entries[buffer_id] = chain
        area[self._entry(chain[0])] = 1

    def pushed(self, buffer_id: int) -> None:
        chain = self.entries.pop(buffer_id)
        self.batch.append(chain[0])
        self.releasing += chain

    def before_publish(self, batch_end: int) -> None:
        """Link the batch (through the head entries' ``last`` field) and set its marker before
        the used descriptors' flags are stored."""
        batch, area = self.batch, self.area
        for k in range(len(batch) - 1):
            _u16.pack_into(area, self._entry(batch[k]) + 4, batch[k + 1])
        _u16.pack_into(area, _PACKED_BATCH_HEAD, batch[0])
        _u32.pack_into(area, _PACKED_BATCH_END, batch_end)
        _u16.pack_into(area, _PACKED_BATCH_LEN, len(batch))

    def after_publish(self, used: int) -> None:
        """The flags are stored: the batch is no longer in flight; then the marker goes."""
        area = self.area
        for head in self.batch:
            area[self._entry(head)] = 0
        _u32.pack_into(area, _PACKED_USED, used)
        _u16.pack_into(area, _PACKED_BATCH_LEN, 0)
        self.batch.clear()
        self.free += self.releasing
        self.releasing.clear()
