"""Driver side of a VIRTIO 1.2 split virtqueue: free list, batched kicks, interrupt-driven reaping.

Driver layer, under VirtioBlk and over the virtio-pci transport. Mirrors Linux's
virtio_ring.c: descriptors are chained through a free list, each head maps to a token
(the request waiting on it), many chains are published per kick, and ``need_event``
decides whether a kick is needed at all. It counts what the rings see (chains per head,
chains per kick, used entries per interrupt) with a few integer updates per chain or batch.
"""

from __future__ import annotations

import asyncio
import collections
import struct
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from device.platform import GuestRam, RunningLoop, Tally, store_u16_word
from device.spec.virtio import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_ELEM,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_ring_size,
    desc_table_size,
    need_event,
    used_ring_size,
)
from driver.dma import DmaAllocator, DmaBuffer

_U16: Final = struct.Struct("<H")
_u16_pack: Final = _U16.pack_into
# The unpackers typed with what they return (struct says Any), so compiled code uses the fields
# as machine integers.
_u16_unpack: Final[Callable[[memoryview, int], tuple[int]]] = _U16.unpack_from
_desc_pack: Final = VIRTQ_DESC.pack_into
_used_unpack: Final[Callable[[memoryview, int], tuple[int, int]]] = VIRTQ_USED_ELEM.unpack_from

#: Buckets of the batch-size histograms: bucket 0 counts empty batches, bucket k sizes
#: 2**(k-1) .. 2**k - 1; sizes are bounded by the 16-bit ring indices (the last bucket holds the rest).
BATCH_BUCKETS: Final = 17


class Completion(Protocol):
    """A request waiting on a chain: told once how many bytes the device wrote, or that it failed."""

    def complete(self, written: int) -> None: ...

    def fail(self, exc: BaseException) -> None: ...


class QueueBrokenError(Exception):
    """The queue is unusable (device reset or a bad used ring); submitters should retry elsewhere."""


class DriverVirtqueue:
    """One split virtqueue, driver side, laid out in DMA memory from ``allocator``."""

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
        if not self._size_ok(size):
            raise ValueError(f"queue size {size} is not one this ring takes")
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.indirect_max = indirect_max  # 0: no indirect descriptors
        self._notify = notify
        self._on_broken = on_broken
        #: A full memory barrier between a ring store and a later ring load, for a device on
        #: other CPUs (vhost-user); None when the device runs on this thread.
        self.barrier = barrier
        self.memory: GuestRam = allocator.memory
        total, avail_off, used_off = self._layout(size)
        ring = allocator.allocate(total)
        if ring is None:
            raise MemoryError("no DMA memory for a virtqueue")
        self._ring: DmaBuffer = ring
        ring.view[:] = bytes(total)
        self.desc_addr = ring.gpa
        self.avail_addr = ring.gpa + avail_off
        self.used_addr = ring.gpa + used_off
        self._buf = ring.view
        self._words = ring.view.cast("H")  # the 16-bit fields the device reads, stored whole
        self._avail_off = avail_off
        self._used_off = used_off
        self._indirect: DmaBuffer | None = None
        if indirect_max:
            self._indirect = allocator.allocate(size * indirect_max * 16)
            if self._indirect is None:
                ring.free()
                raise MemoryError("no DMA memory for indirect tables")
        # Free list through shadow ``next`` fields, like Linux's desc_extra.
        self._desc_next = [(i + 1) % size for i in range(size)]
        self._free_head = 0
        self.num_free = size
        self._tokens: list[Completion | None] = [None] * size
        self._chain_tail = [0] * size
        self._chain_len = [0] * size
        self._avail_idx = 0
        self._num_added = 0
        self._last_used_idx = 0
        self._kick_scheduled = False
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.broken = False
        self._running = RunningLoop()
        # Statistics: integers bumped once per chain or once per batch; the ring view derives
        # rates, means and shares from them when it looks.
        self.kicks = 0
        self.kicks_suppressed = 0
        self.interrupts = 0
        self.completed = 0
        #: Chains published with each descriptor as their head (their sum: avail.idx, unwrapped).
        self.chains_by_head = [Tally() for _ in range(size)]
        #: Chains published as one ring descriptor pointing at an indirect table.
        self.indirect_chains = 0
        #: Chains published between two kick decisions (one batch on the avail ring), by size.
        self.publish_batches = [Tally() for _ in range(BATCH_BUCKETS)]
        #: Used entries one interrupt reaped (0: it found none), by size.
        self.reap_batches = [Tally() for _ in range(BATCH_BUCKETS)]
        #: The most chains in flight at once, met by a reap, since :meth:`take_peak_in_flight`.
        self.peak_in_flight = 0

    # -- layout (the packed ring overrides these) --------------------------------------------

    def _size_ok(self, size: int) -> bool:
        """A split ring's size is a power of two (2.7)."""
        return size >= 1 and not size & (size - 1)

    def _layout(self, size: int) -> tuple[int, int, int]:
        """Bytes of ring memory, and the offsets of the driver area (the available ring) and the
        device area (the used ring) in it; the descriptors come first."""
        avail_off = desc_table_size(size)
        used_off = (avail_off + avail_ring_size(size) + 3) & ~3
        return used_off + used_ring_size(size), avail_off, used_off

    # -- capacity --------------------------------------------------------------------------

    def descriptors_for(self, segments: int) -> int:
        """Ring descriptors a chain of ``segments`` buffers uses."""
        if self.indirect_max and 1 < segments <= self.indirect_max:
            return 1
        return segments

    @property
    def next_head(self) -> int:
        """The head the next :meth:`add` will use (for per-head request slots)."""
        return self._free_head

    @property
    def inflight(self) -> int:
        return sum(1 for token in self._tokens if token is not None)

    async def reserve(self, descriptors: int) -> None:
        """Wait (first come, first served) until ``descriptors`` are free.

        Raises QueueBrokenError if the queue dies meanwhile; the caller then retries on the
        queue that replaces it. Nothing is ever dropped for lack of space.
        """
        if descriptors > self.size:
            raise ValueError(f"a chain of {descriptors} descriptors cannot fit a ring of {self.size}")
        if self.broken:
            raise QueueBrokenError(f"queue {self.index} is broken")
        if self.num_free >= descriptors and not self._waiters:
            return
        waiter: asyncio.Future[None] = self._running.loop().create_future()
        self._waiters.append(waiter)
        try:
            while True:
                await waiter
                if self.broken:
                    raise QueueBrokenError(f"queue {self.index} is broken")
                if self.num_free >= descriptors:
                    return
                fresh: asyncio.Future[None] = self._running.loop().create_future()
                self._waiters[self._waiters.index(waiter)] = fresh  # keep our place in line
                waiter = fresh
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if waiter.done() and not waiter.cancelled():
                self._wake()  # pass the wake-up on if we leave without using it

    def can_add(self, descriptors: int) -> bool:
        """Whether a chain of ``descriptors`` may be added now without :meth:`reserve`.

        Not while others wait for descriptors: they were first.
        """
        return not self.broken and self.num_free >= descriptors and not self._waiters

    def _wake(self) -> None:
        if self._waiters and self.num_free:
            waiter = self._waiters[0]
            if not waiter.done():
                waiter.set_result(None)

    # -- submission ------------------------------------------------------------------------

    def add(
        self,
        out_bufs: Sequence[tuple[int, int]],
        in_bufs: Sequence[tuple[int, int]],
        token: Completion,
    ) -> int:
        """Publish a chain (readable ``out_bufs`` then writable ``in_bufs``); kick is deferred.

        The caller has reserved the descriptors; returns the head.
        """
        total = len(out_bufs) + len(in_bufs)
        needed = self.descriptors_for(total)
        if self.broken:
            raise QueueBrokenError(f"queue {self.index} is broken")
        if needed > self.num_free:
            raise RuntimeError("descriptors were not reserved")
        buf = self._buf
        head = self._free_head
        if needed == 1 and total > 1:
            # One ring descriptor pointing at this head's indirect table, written in place.
            assert self._indirect is not None
            table = self._indirect.view
            base = head * self.indirect_max * 16
            table_gpa = self._indirect.gpa + base
            last = total - 1
            i = 0
            for addr, length in out_bufs:
                if i < last:
                    _desc_pack(table, base + 16 * i, addr, length, VIRTQ_DESC_F_NEXT, i + 1)
                else:
                    _desc_pack(table, base + 16 * i, addr, length, 0, 0)
                i += 1
            for addr, length in in_bufs:
                if i < last:
                    _desc_pack(
                        table, base + 16 * i, addr, length, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, i + 1
                    )
                else:
                    _desc_pack(table, base + 16 * i, addr, length, VIRTQ_DESC_F_WRITE, 0)
                i += 1
            _desc_pack(buf, 16 * head, table_gpa, total * 16, VIRTQ_DESC_F_INDIRECT, 0)
            tail = head
            self.indirect_chains += 1
        else:
            desc_next = self._desc_next
            i = head
            tail = head
            n = 0
            for addr, length in out_bufs:
                n += 1
                flags = VIRTQ_DESC_F_NEXT if n < total else 0
                _desc_pack(buf, 16 * i, addr, length, flags, desc_next[i])
                tail = i
                i = desc_next[i]
            for addr, length in in_bufs:
                n += 1
                flags = VIRTQ_DESC_F_WRITE | (VIRTQ_DESC_F_NEXT if n < total else 0)
                _desc_pack(buf, 16 * i, addr, length, flags, desc_next[i])
                tail = i
                i = desc_next[i]
        self._free_head = self._desc_next[tail]
        self.num_free -= needed
        self._tokens[head] = token
        self.chains_by_head[head].count += 1
        self._chain_tail[head] = tail
        self._chain_len[head] = needed
        # Publish: ring entry, then the index (single-threaded loop: program order is enough).
        avail_off = self._avail_off
        _u16_pack(buf, avail_off + 4 + 2 * (self._avail_idx & (self.size - 1)), head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        # Never torn: the device may be reading it.
        store_u16_word(self._words, avail_off + 2, self._avail_idx)
        self._num_added += 1
        if self._waiters:
            self._wake()
        if self._num_added == 0xFFFF:
            self.kick()  # the event index window would otherwise wrap
        elif not self._kick_scheduled:
            self._kick_scheduled = True
            self._running.work().defer(self.kick)
        return head

    def kick(self) -> None:
        """Notify the device of everything published since the last kick, if it wants to know."""
        self._kick_scheduled = False
        added = self._num_added
        if not added or self.broken:
            return
        self._num_added = 0
        self.publish_batches[added.bit_length()].count += 1  # added < 2**16: see add()
        new = self._avail_idx
        old = (new - added) & 0xFFFF
        buf = self._buf
        if self.barrier is not None:
            self.barrier()  # the new avail index visible before avail_event / flags are read
        if self.event_idx:
            avail_event = _u16_unpack(buf, self._used_off + 4 + 8 * self.size)[0]
            needed = need_event(avail_event, new, old)
        else:
            needed = not (_u16_unpack(buf, self._used_off)[0] & VIRTQ_USED_F_NO_NOTIFY)
        if needed:
            self.kicks += 1
            self._notify()
        else:
            self.kicks_suppressed += 1

    # -- completion ------------------------------------------------------------------------

    def interrupt(self) -> None:
        """The queue's interrupt handler: disable, drain, re-enable, re-check."""
        self.interrupts += 1
        if self.broken:
            return
        buf = self._buf
        words = self._words
        used_off = self._used_off
        avail_off = self._avail_off
        size_mask = self.size - 1
        tokens = self._tokens
        first = self._last_used_idx
        # In flight only grows between reaps: its peak is what a reap finds (or the ring view now).
        depth = (self._avail_idx - first) & 0xFFFF
        self.peak_in_flight = max(self.peak_in_flight, depth)
        while True:
            if not self.event_idx:
                store_u16_word(words, avail_off, VIRTQ_AVAIL_F_NO_INTERRUPT)
            used_idx = _u16_unpack(buf, used_off + 2)[0]
            last = self._last_used_idx
            if ((used_idx - last) & 0xFFFF) > self.size:
                self._break(f"queue {self.index}: used index {used_idx} jumped past {last}")
                return
            while last != used_idx:
                head, written = _used_unpack(buf, used_off + 4 + 8 * (last & size_mask))
                if head >= self.size or tokens[head] is None:
                    self._break(f"queue {self.index}: device returned id {head}, not a head in flight")
                    return
                token = tokens[head]
                tokens[head] = None
                self._detach(head)
                last = (last + 1) & 0xFFFF
                self.completed += 1
                assert token is not None
                token.complete(written)
            self._last_used_idx = last
            # Re-enable, then re-check: a completion published meanwhile would raise no interrupt.
            if self.event_idx:
                store_u16_word(words, avail_off + 4 + 2 * self.size, last)
            else:
                store_u16_word(words, avail_off, 0)
            if self.barrier is not None:
                self.barrier()  # used_event / flags visible before the used index is re-read
            if _u16_unpack(buf, used_off + 2)[0] == last:
                break
        self.reap_batches[min(((last - first) & 0xFFFF).bit_length(), BATCH_BUCKETS - 1)].count += 1
        self._wake()

    def _detach(self, head: int) -> None:
        tail = self._chain_tail[head]
        self._desc_next[tail] = self._free_head
        self._free_head = head
        self.num_free += self._chain_len[head]

    def _break(self, reason: str) -> None:
        self.broken = True
        self._on_broken(reason)

    def fail_all(self, exc: BaseException) -> None:
        """The device was reset: fail every chain in flight and every waiter."""
        self.broken = True
        for head, token in enumerate(self._tokens):
            if token is not None:
                self._tokens[head] = None
                token.fail(exc)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # they see ``broken`` and retry on the new queue

    # -- observation (read-only: for the ring view and tests) --------------------------------

    @property
    def shadow_avail_idx(self) -> int:
        """The driver's avail.idx (published to the ring with every :meth:`add`)."""
        return self._avail_idx

    @property
    def last_used_idx(self) -> int:
        """How far the driver has reaped the used ring."""
        return self._last_used_idx

    def take_peak_in_flight(self) -> int:
        """The most chains in flight at once since the previous call; the watermark restarts now."""
        now = (self._avail_idx - self._last_used_idx) & 0xFFFF
        peak = max(self.peak_in_flight, now)
        self.peak_in_flight = now
        return peak

    def free_list(self) -> list[int]:
        """The free descriptors, in the order :meth:`add` will take them."""
        free = []
        i = self._free_head
        for _ in range(self.num_free):
            free.append(i)
            i = self._desc_next[i]
        return free

    def chains_in_flight(self) -> list[tuple[int, list[int]]]:
        """``(head, ring descriptors of its chain)`` for every chain in flight, by head.

        An indirect chain occupies its head only; its entries are in the indirect table.
        """
        chains = []
        for head, token in enumerate(self._tokens):
            if token is not None:
                chain = [head]
                i = head
                for _ in range(self._chain_len[head] - 1):
                    i = self._desc_next[i]
                    chain.append(i)
                chains.append((head, chain))
        return chains

    def free(self) -> None:
        """Release the ring memory (only after the device is reset)."""
        self._words.release()
        self._buf.release()
        self._ring.free()
        if self._indirect is not None:
            self._indirect.free()
