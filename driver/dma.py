"""The guest's DMA allocator: a buddy allocator over guest RAM for rings and I/O buffers.

Driver layer, under the virtqueues and VirtioBlk. Blocks are naturally aligned to their size
(at least 512 bytes); a full allocator makes ``allocate_wait`` callers wait, never fail.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Final

from device.platform import GuestRam

MIN_ORDER: Final = 9  # 512 bytes
QUICK_MAX_ORDER: Final = 16  # blocks up to 64 KiB go back to a per-size list first
QUICK_LENGTH: Final = 64  # blocks kept per size before frees merge with their buddies again


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
