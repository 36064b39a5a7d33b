"""An allocation map kept in memory: one byte per block, hole, data or allocated zeroes.

Block layer, a helper of storage nodes whose storage cannot answer "what is allocated here"
cheaply (RBD: the OSDs), so the node keeps the answer itself and updates it with every write,
discard and write-zeroes it completes. Answers NBD BLOCK_STATUS and REST ``/extents``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from mypy_extensions import mypyc_attr

from device.block.node import Extent

# The allocation map's block states.
HOLE: Final = 0  # unallocated: reads zeroes
DATA: Final = 1  # allocated, contents unknown
ZERO: Final = 2  # allocated and known to read zeroes (write-zeroes that kept it allocated)


@mypyc_attr(allow_interpreted_subclasses=True)  # tests inject failures
class AllocationMap:
    """What each block of an image holds: one byte per block, :data:`HOLE`, :data:`DATA` or
    :data:`ZERO` (allocated zeroes).

    Updating costs time in proportion to the range written, never to the size of the map, and a
    query scans only the blocks it asks about, at C speed (``bytearray.find``: memchr). Blocks are
    4 KiB, or larger so that the map stays within 16 MiB (64 KiB blocks for a 1 TiB image). The
    map errs towards data: a block partly written is data, a block becomes a hole only when a
    zeroed range covers it whole, and allocated zeroes that cover part of a block leave it what
    it was (a hole stays zero to read: such a block becomes :data:`ZERO`).
    """

    MAX_BLOCKS = 1 << 24

    def __init__(self, size: int, runs: Sequence[tuple[int, int]] = (), block: int | None = None) -> None:
        if block is None:
            block = 4096
            while -(-size // block) > self.MAX_BLOCKS:
                block *= 2
        self.block = block
        self.size = size
        self._bits = bytearray(-(-size // block))
        for offset, length in runs:
            self.set(offset, offset + length, DATA)

    def set(self, start: int, end: int, state: int) -> None:
        """Mark ``[start, end)``: every block it touches as data, or every block it covers as a
        hole or as allocated zeroes."""
        end = min(end, self.size)
        if end <= start:
            return
        block = self.block
        bits = self._bits
        if state == DATA:
            first, last = start // block, -(-end // block)
            bits[first:last] = b"\x01" * (last - first)
            return
        first, last = -(-start // block), end // block
        if end == self.size:
            last = len(bits)  # the image's last block may be short
        if last > first:
            bits[first:last] = bytes([state]) * (last - first)
        if state == ZERO:  # partly covered blocks: a hole now holds some allocated zeroes
            for edge in {start // block, (end - 1) // block}:
                if not first <= edge < last and bits[edge] == HOLE:
                    bits[edge] = ZERO

    def resize(self, size: int) -> None:
        blocks = -(-size // self.block)
        if blocks < len(self._bits):
            del self._bits[blocks:]
        else:
            self._bits.extend(bytes(blocks - len(self._bits)))
        self.size = size

    def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        end = min(offset + length, self.size)
        bits, block = self._bits, self.block
        pos = offset
        stop_block = min(len(bits), -(-end // block))  # never past the query
        while pos < end:
            i = pos // block
            state = bits[i]
            if state == HOLE:
                j, k = bits.find(b"\x01", i, stop_block), bits.find(b"\x02", i, stop_block)
            elif state == DATA:
                j, k = bits.find(b"\x00", i, stop_block), bits.find(b"\x02", i, stop_block)
            else:
                j, k = bits.find(b"\x00", i, stop_block), bits.find(b"\x01", i, stop_block)
            if j < 0 or 0 <= k < j:
                j = k  # the nearer change, or -1: none before the query's end
            stop = end if j < 0 else min(j * block, end)
            out.append(Extent(pos, stop - pos, hole=state == HOLE, zero=state != DATA))
            pos = stop
        return out

    def runs(self) -> list[tuple[int, int]]:
        """The allocated runs (data or allocated zeroes, merged), as ``(offset, length)``."""
        out: list[tuple[int, int]] = []
        for e in self.extents(0, self.size):
            if e.hole:
                continue
            if out and out[-1][0] + out[-1][1] == e.offset:
                out[-1] = (out[-1][0], out[-1][1] + e.length)
            else:
                out.append((e.offset, e.length))
        return out
