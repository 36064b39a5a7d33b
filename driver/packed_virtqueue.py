"""Driver side of a VIRTIO 1.2 packed virtqueue, beside the split one it shares its interface with.

Driver layer, under VirtioBlk and over the transports, after Linux's virtio_ring.c (the packed
half). Buffer ids come from a free list (not ring slots); a buffer's descriptors go at the
driver's next positions with the AVAIL/USED bits of its wrap counter, the id in each of them (the
spec reads it from the last; QEMU up to 9.0 from the first), and the first one's flags written
last, when the device may take the whole buffer. Used descriptors are read at the driver's own
used position, which advances by the count of descriptors each buffer took. Kicks and interrupts
are suppressed through the two event suppression areas as the split ring does through
``avail_event`` and ``used_event``: batched kicks and the decision ``need_event`` makes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Final

from device.platform import store_u16_word
from device.spec.virtio import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from device.spec.virtio_packed import (
    PVIRTQ_DESC,
    PVIRTQ_MAX_SIZE,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
    desc_ring_size,
    off_wrap,
    packed_need_event,
)
from driver.dma import DmaAllocator
from driver.virtqueue import BATCH_BUCKETS, Completion, DriverVirtqueue, QueueBrokenError

_desc_pack: Final = PVIRTQ_DESC.pack_into  # addr, len, id, flags
_desc_unpack: Final[Callable[[memoryview, int], tuple[int, int, int, int]]] = PVIRTQ_DESC.unpack_from
_u16_unpack: Final[Callable[[memoryview, int], tuple[int]]] = struct.Struct("<H").unpack_from
_u32_unpack: Final[Callable[[memoryview, int], tuple[int]]] = struct.Struct("<I").unpack_from

AVAIL: Final = VRING_PACKED_DESC_F_AVAIL
USED: Final = VRING_PACKED_DESC_F_USED


class PackedDriverVirtqueue(DriverVirtqueue):
    """One packed virtqueue, driver side: ``desc_addr`` is the descriptor ring, ``avail_addr``
    the Driver Event Suppression area, ``used_addr`` the Device one (the transport's registers)."""

    def __init__(
        self,
        *,
        index: int,
        size: int,
        allocator: DmaAllocator,
        notify: Callable[[], None],
        event_idx: bool,
        indirect_max: int,
        on_broken: Callable[[str], None],
        barrier: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            index=index,
            size=size,
            allocator=allocator,
            notify=notify,
            event_idx=event_idx,
            indirect_max=indirect_max,
            on_broken=on_broken,
            barrier=barrier,
        )
        self._next_avail = 0  # ring position of the next descriptor to make available
        self._avail_wrap = 1
        self._next_used = 0  # ring position of the next used descriptor to read
        self._used_wrap = 1
        self._chains_added = 0  # buffers made available since the last kick
        self._in_flight_chains = 0
        self._chain_pos = [0] * size  # id -> ring position of its first descriptor
        # Interrupts: with EVENT_IDX, at the first used descriptor; else always (ENABLE).
        self._arm_interrupt()

    def _size_ok(self, size: int) -> bool:
        """A packed ring's size need not be a power of two (2.8), at most 2^15."""
        return 1 <= size <= PVIRTQ_MAX_SIZE

    def _layout(self, size: int) -> tuple[int, int, int]:
        ring = desc_ring_size(size)
        return ring + 8, ring, ring + 4  # the two 4-byte event suppression areas after the ring

    # -- submission ------------------------------------------------------------------------

    @property
    def next_head(self) -> int:
        """The buffer id the next :meth:`add` will use."""
        return self._free_head

    def add(
        self,
        out_bufs: Sequence[tuple[int, int]],
        in_bufs: Sequence[tuple[int, int]],
        token: Completion,
    ) -> int:
        """Make one buffer available (readable ``out_bufs`` then writable ``in_bufs``); the kick
        is deferred. The caller has reserved the descriptors; returns the buffer id."""
        total = len(out_bufs) + len(in_bufs)
        needed = self.descriptors_for(total)
        if self.broken:
            raise QueueBrokenError(f"queue {self.index} is broken")
        if needed > self.num_free:
            raise RuntimeError("descriptors were not reserved")
        buf = self._buf
        size = self.size
        buffer_id = self._free_head
        self._free_head = self._desc_next[buffer_id]
        position = self._next_avail
        wrap = self._avail_wrap
        head = position
        bits = AVAIL if wrap else USED
        head_flags = 0
        if needed == 1 and total > 1:
            # One ring descriptor pointing at this id's indirect table (only WRITE is valid there).
            assert self._indirect is not None
            table = self._indirect.view
            base = buffer_id * self.indirect_max * 16
            i = 0
            for addr, length in out_bufs:
                _desc_pack(table, base + 16 * i, addr, length, 0, 0)
                i += 1
            for addr, length in in_bufs:
                _desc_pack(table, base + 16 * i, addr, length, 0, VIRTQ_DESC_F_WRITE)
                i += 1
            head_flags = VIRTQ_DESC_F_INDIRECT | bits
            _desc_pack(
                buf, 16 * position, self._indirect.gpa + base, total * 16, buffer_id, bits ^ (AVAIL | USED)
            )
            position += 1
            if position == size:
                position = 0
                wrap ^= 1
            self.indirect_chains += 1
        else:
            n = 0
            for addr, length in out_bufs:
                n += 1
                flags = (VIRTQ_DESC_F_NEXT if n < total else 0) | bits
                if n == 1:  # the head: not available until its flags are written, last
                    head_flags = flags
                    flags = bits ^ (AVAIL | USED)
                _desc_pack(buf, 16 * position, addr, length, buffer_id, flags)
                position += 1
                if position == size:
                    position = 0
                    wrap ^= 1
                    bits = AVAIL if wrap else USED
            for addr, length in in_bufs:
                n += 1
                flags = VIRTQ_DESC_F_WRITE | (VIRTQ_DESC_F_NEXT if n < total else 0) | bits
                if n == 1:
                    head_flags = flags
                    flags = bits ^ (AVAIL | USED)
                _desc_pack(buf, 16 * position, addr, length, buffer_id, flags)
                position += 1
                if position == size:
                    position = 0
                    wrap ^= 1
                    bits = AVAIL if wrap else USED
        if self.barrier is not None:
            self.barrier()  # the whole list before the head's flags hand it over
        store_u16_word(self._words, 16 * head + 14, head_flags)  # never torn: the device polls it
        self._next_avail = position
        self._avail_wrap = wrap
        self.num_free -= needed
        self._tokens[buffer_id] = token
        self.chains_by_head[buffer_id].count += 1
        self._chain_len[buffer_id] = needed
        self._chain_pos[buffer_id] = head
        self._num_added += needed
        self._chains_added += 1
        self._in_flight_chains += 1
        if self._waiters:
            self._wake()
        if self._num_added >= 0xFFFF - size:
            self.kick()  # the 16-bit event arithmetic would otherwise wrap
        elif not self._kick_scheduled:
            self._kick_scheduled = True
            self._running.work().defer(self.kick)
        return buffer_id

    def kick(self) -> None:
        """Notify the device of everything made available since the last kick, if it wants to
        know (Device Event Suppression: DISABLE, ENABLE, or DESC at a ring position)."""
        self._kick_scheduled = False
        added = self._num_added
        if not added or self.broken:
            return
        self._num_added = 0
        chains = self._chains_added
        self._chains_added = 0
        self.publish_batches[min(chains.bit_length(), BATCH_BUCKETS - 1)].count += 1
        if self.barrier is not None:
            self.barrier()  # the new descriptors visible before the device's area is read
        word = _u32_unpack(self._buf, self._used_off)[0]  # off_wrap and flags in one read
        flags = word >> 16
        if flags == VRING_PACKED_EVENT_FLAG_DESC and self.event_idx:
            new = self._next_avail
            needed = packed_need_event(word & 0xFFFF, self._avail_wrap, new, new - added, self.size)
        else:
            needed = flags != VRING_PACKED_EVENT_FLAG_DISABLE
        if needed:
            self.kicks += 1
            self._notify()
        else:
            self.kicks_suppressed += 1

    # -- completion ------------------------------------------------------------------------

    def _arm_interrupt(self) -> None:
        """Driver Event Suppression: an interrupt for the next used descriptor (DESC at the used
        position with EVENT_IDX; ENABLE without)."""
        words = self._words
        if self.event_idx:
            store_u16_word(words, self._avail_off, off_wrap(self._next_used, self._used_wrap))
            store_u16_word(words, self._avail_off + 2, VRING_PACKED_EVENT_FLAG_DESC)
        else:
            store_u16_word(words, self._avail_off + 2, VRING_PACKED_EVENT_FLAG_ENABLE)

    def _used_ready(self) -> bool:
        flags = _u16_unpack(self._buf, 16 * self._next_used + 14)[0]
        wrap = self._used_wrap
        return bool(flags & AVAIL) == bool(wrap) and bool(flags & USED) == bool(wrap)

    def interrupt(self) -> None:
        """The queue's interrupt handler: reap every used descriptor, re-arm, re-check."""
        self.interrupts += 1
        if self.broken:
            return
        buf = self._buf
        tokens = self._tokens
        size = self.size
        first = self.completed
        self.peak_in_flight = max(self.peak_in_flight, self._in_flight_chains)
        while True:
            if not self.event_idx:
                store_u16_word(self._words, self._avail_off + 2, VRING_PACKED_EVENT_FLAG_DISABLE)
            while self._used_ready():
                if self.barrier is not None:
                    self.barrier()  # the flags before the id and length they hand over
                _addr, written, buffer_id, _flags = _desc_unpack(buf, 16 * self._next_used)
                if buffer_id >= size or tokens[buffer_id] is None:
                    self._break(f"queue {self.index}: device returned id {buffer_id}, not a buffer in flight")
                    return
                token = tokens[buffer_id]
                tokens[buffer_id] = None
                position = self._next_used + self._chain_len[buffer_id]
                if position >= size:
                    position -= size
                    self._used_wrap ^= 1
                self._next_used = position
                self._detach(buffer_id)
                self._in_flight_chains -= 1
                self.completed += 1
                assert token is not None
                token.complete(written)
            self._arm_interrupt()  # then re-check: a used descriptor written meanwhile raised none
            if self.barrier is not None:
                self.barrier()
            if not self._used_ready():
                break
        self.reap_batches[min((self.completed - first).bit_length(), BATCH_BUCKETS - 1)].count += 1
        self._wake()

    def _detach(self, head: int) -> None:
        self._desc_next[head] = self._free_head
        self._free_head = head
        self.num_free += self._chain_len[head]

    # -- observation (read-only: for the ring view and tests) --------------------------------

    @property
    def shadow_avail_idx(self) -> int:
        """The driver's next avail position, its wrap counter in bit 15."""
        return off_wrap(self._next_avail, self._avail_wrap)

    @property
    def last_used_idx(self) -> int:
        """The driver's next used position, its wrap counter in bit 15."""
        return off_wrap(self._next_used, self._used_wrap)

    def take_peak_in_flight(self) -> int:
        now = self._in_flight_chains
        peak = max(self.peak_in_flight, now)
        self.peak_in_flight = now
        return peak

    def free_list(self) -> list[int]:
        """The free buffer ids, in the order :meth:`add` will take them."""
        free = []
        i = self._free_head
        for _ in range(self.size - self._in_flight_chains):
            free.append(i)
            i = self._desc_next[i]
        return free

    def chains_in_flight(self) -> list[tuple[int, list[int]]]:
        """``(buffer id, ring positions of its descriptors)`` for every buffer in flight, by id."""
        chains = []
        for buffer_id, token in enumerate(self._tokens):
            if token is not None:
                start = self._chain_pos[buffer_id]
                positions = [(start + k) % self.size for k in range(self._chain_len[buffer_id])]
                chains.append((buffer_id, positions))
        return chains
