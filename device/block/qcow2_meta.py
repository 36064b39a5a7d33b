"""The qcow2 node's metadata on disk: the host file with its write barrier, and the refcounts.

Block layer, under :mod:`device.block.qcow2` (the format node) and over the host file's node.
:class:`Host` is the image file as the format node uses it: reads and writes of metadata and
data, growth by whole clusters, and :meth:`Host.barrier`, the fdatasync that orders one kind of
metadata write after another (the rule of QEMU's qcow2 caches: what points at a cluster reaches
the disk only after the cluster and its refcount have). :class:`Refcounts` is the refcount table
and its blocks, held in memory once read and written back when the format node says so:
``refcount_order`` 0 to 6 (1- to 64-bit counts, sub-byte ones least significant bit first),
blocks created where a range has none, the table moved to a bigger place when it is full, and
free clusters found by a scan from the lowest one that may be free.

A refcount that would drop below zero or rise past its width, or a table entry that points
outside the file, is corrupt metadata: EIO for the request, never a wrong count.
"""

from __future__ import annotations

import errno
import struct
import sys
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Protocol

from device.block.node import BlockError, Extent
from device.block.qcow2_header import MAX_REFTABLE_BYTES

#: Bits 9-63 of a refcount table entry: the refcount block's offset.
REFTABLE_OFFSET_MASK: Final = 0xFFFFFFFFFFFFFE00

#: Header fields rewritten in place, each group in one 512-byte sector (written atomically).
HEADER_SIZE_AT: Final = 24  # u64 size
HEADER_L1_AT: Final = 36  # u32 l1_size, u64 l1_table_offset
HEADER_REFTABLE_AT: Final = 48  # u64 refcount_table_offset, u32 refcount_table_clusters
HEADER_FEATURES_AT: Final = 72  # u64 incompatible, u64 compatible, u64 autoclear

_HEADER_L1: Final = struct.Struct(">IQ")
_HEADER_REFTABLE: Final = struct.Struct(">QI")
_U64: Final = struct.Struct(">Q")


def corrupt(path: Path, why: str) -> BlockError:
    return BlockError(errno.EIO, f"{path}: corrupt qcow2 metadata: {why}")


def be64(data: bytes) -> array[int]:
    """Big-endian 64-bit words as native integers."""
    table = array("Q")
    table.frombytes(data)
    if sys.byteorder == "little":
        table.byteswap()
    return table


def be64_bytes(table: array[int]) -> bytes:
    """Native words back to big-endian bytes."""
    if sys.byteorder == "little":
        out = array("Q", table)
        out.byteswap()
        return out.tobytes()
    return table.tobytes()


class HostFile(Protocol):
    """What a format node needs of the node holding its image: a file node, or a layer that
    records what is written (the power-loss tests)."""

    path: Path

    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    def read_now(self, offset: int, buffers: Sequence[memoryview]) -> None: ...

    def write_now(self, offset: int, buffers: Sequence[memoryview]) -> None: ...

    def flush_now(self) -> None: ...

    def zero_now(self, offset: int, length: int, may_unmap: bool) -> None: ...

    def resize(self, new_size: int) -> None: ...

    def extents(self, offset: int, length: int) -> list[Extent]: ...

    def close(self) -> None: ...


class Host:
    """The image file under a qcow2 node: bounded reads, writes that grow it, a barrier."""

    def __init__(self, file: HostFile, cluster_size: int) -> None:
        self.file = file
        self.path = file.path
        self.cluster_size = cluster_size
        self.unsynced = False  # written since the last barrier
        self.limit = 1 << 62  # how far the file may grow (the format node sets it)

    @property
    def size(self) -> int:
        return self.file.size

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``, which must lie inside the file (else EIO)."""
        if offset < 0 or length < 0 or offset + length > self.file.size:
            raise corrupt(
                self.path, f"metadata at {offset:#x}+{length} outside the file ({self.file.size} bytes)"
            )
        data = bytearray(length)
        if length:
            self.file.read_now(offset, [memoryview(data)])
        return bytes(data)

    def write(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Write at ``offset``; the file must already reach the end (see :meth:`grow`)."""
        self.unsynced = True
        self.file.write_now(offset, buffers)

    def write_bytes(self, offset: int, data: bytes) -> None:
        self.write(offset, [memoryview(data)])

    def grow(self, end: int) -> None:
        """Make the file at least ``end`` bytes long (new bytes read as zeroes), never past
        :attr:`limit` (damaged refcounts would otherwise send clusters anywhere)."""
        if end > self.file.size:
            if end > self.limit:
                raise corrupt(
                    self.path,
                    f"an allocation would grow the file to {end} bytes, past {self.limit} (twice the "
                    "virtual size and the metadata); its refcounts are likely damaged",
                )
            self.unsynced = True
            self.file.resize(-(-end // 512) * 512)

    def preallocate(self, offset: int, length: int) -> None:
        """Allocate ``[offset, offset+length)`` in the file as zeroes (inside its size)."""
        self.unsynced = True
        self.file.zero_now(offset, length, False)

    def barrier(self) -> None:
        """Everything written so far reaches the disk before anything written after."""
        if self.unsynced:
            self.file.flush_now()
            self.unsynced = False

    def write_header_l1(self, l1_size: int, l1_offset: int) -> None:
        self.write_bytes(HEADER_L1_AT, _HEADER_L1.pack(l1_size, l1_offset))

    def write_header_size(self, size: int) -> None:
        self.write_bytes(HEADER_SIZE_AT, _U64.pack(size))


class Refcounts:
    """The refcount table and blocks of one image, in memory once read; see the module doc."""

    def __init__(
        self, host: Host, cluster_bits: int, order: int, table_offset: int, table_clusters: int
    ) -> None:
        self.host = host
        self.path = host.path
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.order = order
        self.width = 1 << order
        self.max_count = (1 << self.width) - 1
        self.block_bits = cluster_bits + 3 - order  # log2 of the entries in one block
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        if table_clusters <= 0 or table_offset <= 0 or table_offset % self.cluster_size:
            raise corrupt(self.path, f"refcount table at {table_offset:#x} ({table_clusters} clusters)")
        self.table = be64(host.read(table_offset, table_clusters << cluster_bits))
        for index, entry in enumerate(self.table):
            offset = entry & REFTABLE_OFFSET_MASK
            if entry and (entry != offset or offset % self.cluster_size or offset >= host.size):
                raise corrupt(
                    self.path, f"refcount table entry {index} ({entry:#x}) is not a cluster of the file"
                )
        self._blocks: dict[int, array[int] | bytearray] = {}
        self._dirty: set[int] = set()
        self.table_dirty = False
        self.free_hint = 0  # no cluster below this one is free
        #: Clusters of the table and of every block it points at (never data).
        self.metadata: set[int] = set(
            range(table_offset >> cluster_bits, (table_offset >> cluster_bits) + table_clusters)
        )
        self.metadata.update(
            (e & REFTABLE_OFFSET_MASK) >> cluster_bits for e in self.table if e & REFTABLE_OFFSET_MASK
        )
        self._typecode = {3: "B", 4: "H", 5: "I" if array("I").itemsize == 4 else "L", 6: "Q"}.get(order, "")

    # -- reading and changing counts ------------------------------------------------------------

    def get(self, cluster: int) -> int:
        index = cluster >> self.block_bits
        if index >= len(self.table) or self.table[index] & REFTABLE_OFFSET_MASK == 0:
            return 0
        return self._get(self._block(index), cluster & ((1 << self.block_bits) - 1))

    def change(self, cluster: int, count: int, delta: int) -> None:
        """Add ``delta`` (+1 or -1) to the refcounts of ``count`` clusters from ``cluster``."""
        if delta < 0 and (cluster + count - 1) << self.cluster_bits >= self.host.size:
            raise corrupt(
                self.path, f"freeing clusters {cluster}..{cluster + count - 1}, past the file's end"
            )
        mask = (1 << self.block_bits) - 1
        pos = cluster
        end = cluster + count
        while pos < end:
            index = pos >> self.block_bits
            block = self._block_for_change(index)
            stop = min(end, (index + 1) << self.block_bits)
            for entry in range(pos & mask, ((stop - 1) & mask) + 1):
                value = self._get(block, entry) + delta
                if value < 0 or value > self.max_count:
                    raise corrupt(
                        self.path,
                        f"refcount of cluster {(index << self.block_bits) + entry} would be {value}",
                    )
                self._set(block, entry, value)
            self._dirty.add(index)
            pos = stop
        if delta < 0:
            self.free_hint = min(self.free_hint, cluster)

    @property
    def max_run(self) -> int:
        """The most clusters :meth:`allocate` gives at once: a quarter of a block's range, so a
        run always fits in a range beside the block that a new range's first cluster holds."""
        return 1 << max(0, self.block_bits - 2)

    def allocate(self, count: int) -> int:
        """``count`` (at most :attr:`max_run`) contiguous free clusters, counted once each: the
        first one's index."""
        if count <= 0:
            raise ValueError(f"{count} clusters")
        if count > self.max_run:
            return self._allocate_beyond(count)
        while True:
            start = self._find_free(count)
            if self._cover(start, count):
                continue  # new refcount blocks took clusters: look again
            self.change(start, count, +1)
            if start == self.free_hint:
                self.free_hint = start + count
            return start

    def _allocate_beyond(self, count: int) -> int:
        """A long run (a moved L1 table) past the end of the file and of every block's range,
        after the new blocks that count it."""
        while True:
            # Past the file's end and every range that has a block: free, and no block there.
            top = max((i + 1 for i, entry in enumerate(self.table) if entry >> 9), default=0)
            base = max(top << self.block_bits, -(-self.host.size // self.cluster_size))
            blocks = 0
            while True:
                end = base + blocks + count
                want = ((end - 1) >> self.block_bits) - (base >> self.block_bits) + 1
                if want == blocks:
                    break
                blocks = want
            last_index = (end - 1) >> self.block_bits
            if last_index < len(self.table):
                break
            self._grow_table(last_index)
        self.host.grow(end << self.cluster_bits)
        self._counting_blocks(self.table, base, blocks, end)
        self.table_dirty = True
        return base + blocks

    def _counting_blocks(self, table: array[int], base: int, blocks: int, end: int) -> None:
        """New blocks in clusters ``[base, base+blocks)`` for the ranges of ``[base, end)``,
        each counting the clusters of that span in its range; ``table`` points at them."""
        mask = (1 << self.block_bits) - 1
        for n in range(blocks):
            index = (base >> self.block_bits) + n
            block = self._decode(bytes(self.cluster_size))
            for cluster in range(
                max(base, index << self.block_bits), min(end, (index + 1) << self.block_bits)
            ):
                self._set(block, cluster & mask, 1)
            self._blocks[index] = block
            self._dirty.add(index)
            table[index] = (base + n) << self.cluster_bits
        self.metadata.update(range(base, end))

    def _find_free(self, count: int) -> int:
        mask = (1 << self.block_bits) - 1
        run_start = pos = self.free_hint
        seen_free = False  # a free cluster (too few in a row) lies between the hint and pos
        while pos - run_start < count:
            index = pos >> self.block_bits
            if index >= len(self.table) or self.table[index] & REFTABLE_OFFSET_MASK == 0:
                pos = (index + 1) << self.block_bits  # a range without a block is all free
                seen_free = True
                continue
            block = self._block(index)
            entry = pos & mask
            if self._get(block, entry):
                run_start = pos = self._next_zero(block, entry, index)
                if not seen_free:
                    self.free_hint = run_start  # every cluster before it is used
                continue
            seen_free = True
            pos += 1
        return run_start

    def _next_zero(self, block: array[int] | bytearray, entry: int, index: int) -> int:
        """The first free cluster of block ``index`` at or after ``entry`` (or the next block's
        first cluster)."""
        entries = 1 << self.block_bits
        if isinstance(block, array):
            try:
                entry = block.index(0, entry)
            except ValueError:
                entry = entries
        else:
            while entry < entries and self._get(block, entry):
                entry += 1
        return (index << self.block_bits) + entry

    def _cover(self, start: int, count: int) -> bool:
        """Make every cluster of ``[start, start+count)`` have a refcount block; True if that
        took clusters (which may be some of those)."""
        took = False
        first = start >> self.block_bits
        last = (start + count - 1) >> self.block_bits
        for index in range(first, last + 1):
            if index >= len(self.table):
                self._grow_table(last)
                return True
            if self.table[index] & REFTABLE_OFFSET_MASK == 0:
                self._new_block(index)
                took = True
        return took

    # -- blocks -------------------------------------------------------------------------------------

    def _block(self, index: int) -> array[int] | bytearray:
        block = self._blocks.get(index)
        if block is not None:
            return block
        offset = self.table[index] & REFTABLE_OFFSET_MASK
        if offset % self.cluster_size or offset + self.cluster_size > self.host.size:
            raise corrupt(self.path, f"refcount block {index} at {offset:#x} unaligned or outside the file")
        raw = self.host.read(offset, self.cluster_size)
        block = self._decode(raw)
        self._blocks[index] = block
        return block

    def _block_for_change(self, index: int) -> array[int] | bytearray:
        if index >= len(self.table):
            self._grow_table(index)
        if self.table[index] & REFTABLE_OFFSET_MASK == 0:
            self._new_block(index)
        return self._block(index)

    def _new_block(self, index: int) -> None:
        """A refcount block for range ``index``, in that range's first cluster (free: a range
        without a block counts nothing), where it counts itself."""
        place = index << self.block_bits
        self.host.grow((place + 1) << self.cluster_bits)
        block = self._decode(bytes(self.cluster_size))
        self._set(block, 0, 1)
        self._blocks[index] = block
        self.table[index] = place << self.cluster_bits
        self.metadata.add(place)
        self.table_dirty = True
        self._dirty.add(index)

    def _grow_table(self, need_index: int) -> None:
        """Move the table to a bigger place past everything it covers, with the blocks that
        count the new place; the header points there once both are on disk."""
        cluster_size = self.cluster_size
        per_cluster = cluster_size // 8
        covered_end = len(self.table) << self.block_bits
        base = max(covered_end, -(-self.host.size // cluster_size))
        blocks = 0
        table_clusters = self.table_clusters
        while True:
            end = base + blocks + table_clusters  # clusters [base, end) are new metadata
            last_index = (end - 1) >> self.block_bits
            want_entries = max(need_index, last_index, len(self.table) * 2 - 1) + 1
            want_clusters = -(-want_entries // per_cluster)
            want_blocks = last_index - (base >> self.block_bits) + 1
            if want_clusters == table_clusters and want_blocks == blocks:
                break
            table_clusters, blocks = max(want_clusters, table_clusters), max(want_blocks, blocks)
        if table_clusters * cluster_size > MAX_REFTABLE_BYTES:  # before anything changes
            raise corrupt(self.path, f"the refcount table would grow past {MAX_REFTABLE_BYTES} bytes")
        table = array("Q", self.table)
        table.extend([0] * (table_clusters * per_cluster - len(table)))
        end = base + blocks + table_clusters
        self.host.grow(end << self.cluster_bits)
        self._counting_blocks(table, base, blocks, end)
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self.table = table
        self.table_offset = (base + blocks) << self.cluster_bits
        self.table_clusters = table_clusters
        # The blocks, then the table, then the header; the old table's clusters are free after.
        self.write_blocks()
        self.host.barrier()
        self._write_table()
        self.host.barrier()
        self.host.write_bytes(HEADER_REFTABLE_AT, _HEADER_REFTABLE.pack(self.table_offset, table_clusters))
        self.host.barrier()
        self.table_dirty = False
        old_first = old_offset >> self.cluster_bits
        self.metadata.difference_update(range(old_first, old_first + old_clusters))
        self.change(old_first, old_clusters, -1)

    # -- writing back -------------------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return bool(self._dirty) or self.table_dirty

    def write_blocks(self) -> bool:
        """Write every changed block in place; True if there were any."""
        if not self._dirty:
            return False
        for index in sorted(self._dirty):
            offset = self.table[index] & REFTABLE_OFFSET_MASK
            self.host.write_bytes(offset, self._encode(self._blocks[index]))
        self._dirty.clear()
        return True

    def write_table(self) -> bool:
        """Write the table if a block was added to it (after :meth:`write_blocks` and a barrier)."""
        if not self.table_dirty:
            return False
        self._write_table()
        self.table_dirty = False
        return True

    def _write_table(self) -> None:
        self.host.write_bytes(self.table_offset, be64_bytes(self.table))

    # -- the encodings ------------------------------------------------------------------------------

    def _decode(self, raw: bytes) -> array[int] | bytearray:
        if not self._typecode:
            return bytearray(raw)
        block = array(self._typecode)
        block.frombytes(raw)
        if sys.byteorder == "little" and block.itemsize > 1:
            block.byteswap()
        return block

    def _encode(self, block: array[int] | bytearray) -> bytes:
        if isinstance(block, bytearray):
            return bytes(block)
        if sys.byteorder == "little" and block.itemsize > 1:
            out = array(block.typecode, block)
            out.byteswap()
            return out.tobytes()
        return block.tobytes()

    def _get(self, block: array[int] | bytearray, entry: int) -> int:
        if isinstance(block, array):
            return block[entry]
        order = self.order
        return (block[entry >> (3 - order)] >> ((entry << order) & 7)) & self.max_count

    def _set(self, block: array[int] | bytearray, entry: int, value: int) -> None:
        if isinstance(block, array):
            block[entry] = value
            return
        order = self.order
        byte = entry >> (3 - order)
        shift = (entry << order) & 7
        block[byte] = (block[byte] & ~(self.max_count << shift) & 0xFF) | (value << shift)
