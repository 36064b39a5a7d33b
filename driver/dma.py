"""The guest's DMA allocator: a buddy allocator over guest RAM for rings and I/O buffers.

Driver layer, under the virtqueues and VirtioBlk. Blocks are naturally aligned to their size
(at least 512 bytes); a full allocator makes ``allocate_wait`` callers wait, never fail.
"""

from __future__ import annotations

import asyncio
import collections

from device.platform import GuestRam

MIN_ORDER = 9  # 512 bytes


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
        found = order
        while found <= self.max_order and not self._free[found]:
            found += 1
        if found > self.max_order:
            return None
        offset = self._free[found].pop()
        while found > order:  # split, keeping the lower half
            found -= 1
            self._free[found].add(offset + (1 << found))
        self.free_bytes -= 1 << order
        return DmaBuffer(self, self.start + offset, size, order)

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
        while order < self.max_order:
            buddy = offset ^ (1 << order)
            if buddy not in self._free[order]:
                break
            self._free[order].remove(buddy)
            offset = min(offset, buddy)
            order += 1
        self._free[order].add(offset)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
