"""The guest's DMA allocator: a buddy allocator over guest RAM for rings and I/O buffers.

Driver layer, under the virtqueues and VirtioBlk. Blocks are naturally aligned to their size
(at least 512 bytes); a full allocator makes ``allocate_wait`` callers wait, never fail.
Guest RAM a burst of I/O touched goes back to the host once no buffer has been allocated for
:data:`TRIM_IDLE` seconds (:meth:`DmaAllocator.trim`), so a service's memory returns to its
resting size after a large copy instead of keeping the burst's high-water mark.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Final

from device.platform import GuestRam

MIN_ORDER: Final = 9  # 512 bytes
QUICK_MAX_ORDER: Final = 16  # blocks up to 64 KiB go back to a per-size list first
QUICK_LENGTH: Final = 64  # blocks kept per size before frees merge with their buddies again
PAGE_ORDER: Final = 12  # free blocks of a page and more give their pages back on a trim
TRIM_IDLE: Final = 1.0  # seconds without an allocation before free guest RAM goes back


class DmaBuffer:
    """``size`` bytes of guest RAM at guest-physical ``gpa``; ``view`` is a zero-copy window."""

    __slots__ = ("_allocator", "_free_pending", "_order", "_pins", "gpa", "size", "view")

    def __init__(self, allocator: DmaAllocator, gpa: int, size: int, order: int) -> None:
        self._allocator = allocator
        self._order = order
        self._pins = 0
        self._free_pending = False
        self.gpa = gpa
        self.size = size
        self.view = allocator.memory.view(gpa, size)

    @property
    def freed(self) -> bool:
        return self._order < 0

    def pin(self) -> None:
        """The device may be using the buffer: a :meth:`free` now waits for :meth:`unpin`."""
        self._pins += 1

    def unpin(self) -> None:
        self._pins -= 1
        if self._pins == 0 and self._free_pending:
            self.free()

    def free(self) -> None:
        """Return the block to the allocator (idempotent; deferred while pinned)."""
        if self._pins:
            self._free_pending = True
            return
        if self._order >= 0:
            self.view.release()
            self._allocator._release(self.gpa, self._order)
            self._order = -1


class DmaAllocator:
    """Buddy allocator over ``[start, start+size)`` of guest RAM (the whole RAM by default)."""

    def __init__(self, memory: GuestRam, start: int | None = None, size: int | None = None) -> None:
        self.memory = memory
        self.start = memory.base if start is None else start
        size = memory.size if size is None else size
        self.max_order = size.bit_length() - 1
        if self.max_order < MIN_ORDER or self.start % (1 << MIN_ORDER):
            raise ValueError("DMA region too small or misaligned")
        self.size = size
        self._free: list[set[int]] = [set() for _ in range(self.max_order + 1)]
        # Carve the region into maximal aligned blocks.
        offset = 0
        for order in range(self.max_order, MIN_ORDER - 1, -1):
            while offset + (1 << order) <= size and offset % (1 << order) == 0:
                self._free[order].add(offset)
                offset += 1 << order
        self.free_bytes = offset
        # Recently freed small blocks, unmerged: the next allocation of that size takes one
        # back without splitting a larger block (and the free without merging it again).
        self._quick: list[list[int]] = [[] for _ in range(QUICK_MAX_ORDER + 1)]
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._allocations = 0  # allocations so far (the idle timer compares it)
        self._allocations_seen = 0
        self._trim_timer: asyncio.TimerHandle | None = None
        #: Bytes given back to the host by trims, over the allocator's life.
        self.trimmed_bytes = 0
        self._trimmable = self.start % (1 << PAGE_ORDER) == 0  # blocks of a page start on one

    @staticmethod
    def _order_for(size: int) -> int:
        return max(MIN_ORDER, (size - 1).bit_length())

    def allocate(self, size: int) -> DmaBuffer | None:
        """A zeroed-on-first-use buffer of at least ``size`` bytes, or None if none is free."""
        if size <= 0:
            raise ValueError("allocation size must be positive")
        order = self._order_for(size)
        if order > self.max_order:
            raise ValueError(f"allocation of {size} bytes exceeds the DMA region")
        if order <= QUICK_MAX_ORDER and self._quick[order]:
            offset = self._quick[order].pop()
        else:
            found = self._find(order)
            if found < 0 and self._merge_quick():
                found = self._find(order)
            if found < 0:
                return None
            offset = self._free[found].pop()
            while found > order:  # split, keeping the lower half
                found -= 1
                self._free[found].add(offset + (1 << found))
        self.free_bytes -= 1 << order
        self._allocations += 1
        if self._trim_timer is None:
            self._arm_trim()
        return DmaBuffer(self, self.start + offset, size, order)

    def _find(self, order: int) -> int:
        """The smallest order at or above ``order`` with a free block, or -1."""
        found = order
        while found <= self.max_order and not self._free[found]:
            found += 1
        return found if found <= self.max_order else -1

    def _merge_quick(self) -> bool:
        """Give the unmerged small blocks back to the buddy lists; True if there were any."""
        merged = False
        for order, quick in enumerate(self._quick):
            while quick:
                self._merge(quick.pop(), order)
                merged = True
        return merged

    def try_allocate(self, size: int) -> DmaBuffer | None:
        """:meth:`allocate`, but None while others wait for memory (they were first)."""
        return None if self._waiters else self.allocate(size)

    async def allocate_wait(self, size: int) -> DmaBuffer:
        """Like :meth:`allocate` but waits for memory to be freed instead of returning None."""
        while True:
            buffer = self.allocate(size)
            if buffer is not None:
                return buffer
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _arm_trim(self) -> None:
        loop = asyncio._get_running_loop()
        if loop is not None:  # without a loop (a tool, a test), nothing trims unasked
            self._allocations_seen = self._allocations
            self._trim_timer = loop.call_later(TRIM_IDLE, self._trim_if_idle)

    def _trim_if_idle(self) -> None:
        self._trim_timer = None
        if self._allocations != self._allocations_seen:
            self._arm_trim()  # still busy: look again later
        else:
            self.trim()

    def trim(self) -> int:
        """Give the pages of every free block of a page or more back to the host; the bytes.

        They read as zeroes when next allocated, as a fresh block does. Blocks in use (rings,
        buffers in flight) are never touched; the unmerged small blocks are merged first.
        """
        if not self._trimmable:
            return 0
        self._merge_quick()
        returned = 0
        for order in range(PAGE_ORDER, self.max_order + 1):
            length = 1 << order
            for offset in self._free[order]:
                self.memory.discard(self.start + offset, length)
                returned += length
        self.trimmed_bytes += returned
        return returned

    def close(self) -> None:
        """Stop the idle timer (the allocator's memory is going away)."""
        if self._trim_timer is not None:
            self._trim_timer.cancel()
            self._trim_timer = None

    def _release(self, gpa: int, order: int) -> None:
        offset = gpa - self.start
        self.free_bytes += 1 << order
        if order <= QUICK_MAX_ORDER and len(self._quick[order]) < QUICK_LENGTH:
            self._quick[order].append(offset)
        else:
            self._merge(offset, order)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _merge(self, offset: int, order: int) -> None:
        """Free the block, merging it with its buddy as far up as they are both free."""
        while order < self.max_order:
            buddy = offset ^ (1 << order)
            if buddy not in self._free[order]:
                break
            self._free[order].remove(buddy)
            offset = min(offset, buddy)
            order += 1
        self._free[order].add(offset)
