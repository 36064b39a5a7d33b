"""Persistent dirty bitmaps in a qcow2 image: the bitmaps extension, as QEMU reads and writes it.

Block layer, beside :mod:`device.block.qcow2`: :class:`Qcow2BitmapStore` is the
:class:`~device.block.dirty.BitmapStore` of a qcow2 node, the one the dirty layer above the node
(:class:`~device.block.dirty.DirtyLayer`) loads its persistent bitmaps from and saves them to at a
clean close. The format is ``docs/interop/qcow2.txt`` ("Bitmaps extension", "Bitmaps"): a
directory of entries (name, granularity, flags ``in_use`` and ``auto``), each pointing at a
one-level bitmap table whose entries point at data clusters (0: an all-zero cluster, bit 0 alone:
all ones). The node itself parses and checks the directory at open and, on a writable open,
marks every bitmap in use before any data write (:meth:`Qcow2Node._open_for_writing`), so a
process that never saves leaves them inconsistent, for QEMU and vblk alike.

:meth:`Qcow2BitmapStore.save` never writes over what the header points at: the data clusters,
tables and a new directory go to fresh clusters (counted), then the header's extension points at
them, then the old ones are freed, each step durable before the next. A crash leaves the old
bitmaps or the new ones (a few clusters leaked at worst). When the rewrite of cluster 0 spans
more than one sector (the extension added or dropped, the backing file name moved), autoclear
bit 0 is cleared while it is written, so a torn write leaves no bitmaps rather than wrong ones.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Sequence
from typing import Final

from device.block.dirty import BitmapRecord, bitmap_bytes
from device.block.node import BlockError
from device.block.qcow2 import Qcow2Node, _host_errors
from device.block.qcow2_header import (
    AUTOCLEAR_BITMAPS,
    BME_AUTO,
    BME_EXTRA_DATA_COMPATIBLE,
    BME_IN_USE,
    BMT_ALL_ONES,
    BMT_OFFSET_MASK,
    MAX_BITMAP_DIRECTORY,
    MAX_BITMAP_NAME,
    MAX_BITMAPS,
    MAX_GRANULARITY_BITS,
    MIN_GRANULARITY_BITS,
    BitmapEntry,
    bitmap_name_bytes,
    bitmaps_extension,
    encode_directory,
    parse_header,
    rewrite_cluster0,
    table_entries,
)
from device.block.qcow2_meta import HEADER_FEATURES_AT, be64_bytes

SECTOR: Final = 512  # what a disk writes whole


class Qcow2BitmapStore:
    """The persistent bitmaps of one qcow2 node, kept in its image."""

    def __init__(self, node: Qcow2Node) -> None:
        self.node = node

    @property
    def where(self) -> str:
        return f"qcow2 image {self.node.path}"

    def refusal(self) -> str | None:
        node = self.node
        if node.read_only:
            return "the disk is read-only"
        if node.version < 3:
            return (
                "Cannot store dirty bitmaps in qcow2 v2 files; upgrade the image first "
                f"(qemu-img amend -o compat=1.1 {node.path}, while nothing has it open)"
            )
        if node.broken is not None:
            return f"the image is marked corrupt ({node.broken})"
        if node.bitmaps_damage:
            return f"its bitmap directory is damaged ({node.bitmaps_damage})"
        return None

    # -- loading ------------------------------------------------------------------------------------

    def load(self) -> list[BitmapRecord]:
        """The bitmaps in the image, ``in_use`` as found before this process opened it."""
        node = self.node
        records: list[BitmapRecord] = []
        with node.metadata_lock, _host_errors(node.path):
            for found, entry, table in zip(
                node.bitmaps_found, node.bitmap_entries, node.bitmap_tables, strict=True
            ):
                granularity = 1 << entry.granularity_bits
                data = self._read_data(table, granularity)
                records.append(
                    BitmapRecord(
                        name=entry.name,
                        granularity=granularity,
                        enabled=bool(found.flags & BME_AUTO),
                        in_use=bool(found.flags & BME_IN_USE),
                        data=data,
                    )
                )
        return records

    def _read_data(self, table: array[int], granularity: int) -> bytes:
        """``length`` bytes of bitmap data from its table (zeroes where the table is short: an
        inconsistent bitmap of a disk resized since), tail bits beyond the disk cleared."""
        node = self.node
        host = node.host
        cluster_size = node.cluster_size
        length = bitmap_bytes(node.size, granularity)
        out = bytearray()
        for value in table[: -(-length // cluster_size)]:
            offset = value & BMT_OFFSET_MASK
            if offset:
                out += host.read(offset, cluster_size)
            elif value & BMT_ALL_ONES:
                out += b"\xff" * cluster_size
            else:
                out += bytes(cluster_size)
        if len(out) < length:
            out += bytes(length - len(out))
        del out[length:]
        tail = -(-node.size // granularity) & 7
        if tail and out:
            out[-1] &= (1 << tail) - 1
        return bytes(out)

    # -- saving -------------------------------------------------------------------------------------

    def save(self, records: Sequence[BitmapRecord]) -> None:
        """Store exactly ``records`` (see the module doc for the order of the writes)."""
        node = self.node
        if not records and not node.bitmap_entries and not node.bitmaps_damage:
            return  # nothing stored, nothing to store
        refusal = self.refusal()
        if refusal is not None:
            raise BlockError(
                errno.EROFS if node.read_only else errno.ENOTSUP,
                f"{node.path}: cannot store persistent bitmaps: {refusal}",
            )
        self._check(records)
        with node.metadata_lock, _host_errors(node.path):
            if records:  # the extension must fit in cluster 0 before anything is written
                head = node.host.read(0, min(node.host.size, node.cluster_size))
                header = parse_header(node.path, head, node.host.size, True)
                rewrite_cluster0(node.path, head, header, bitmaps_extension(1, 0, 0), AUTOCLEAR_BITMAPS)
            self._save(records)

    def _check(self, records: Sequence[BitmapRecord]) -> None:
        node = self.node
        if len(records) > MAX_BITMAPS:
            raise BlockError(errno.EINVAL, f"{node.path}: {len(records)} bitmaps (at most {MAX_BITMAPS})")
        names: set[bytes] = set()
        for record in records:
            name = bitmap_name_bytes(record.name)
            if not 1 <= len(name) <= MAX_BITMAP_NAME or name in names:
                raise BlockError(
                    errno.EINVAL, f"{node.path}: bitmap name {record.name!r} is empty, long or taken"
                )
            names.add(name)
            granularity = record.granularity
            bits = granularity.bit_length() - 1
            if granularity & (granularity - 1) or not MIN_GRANULARITY_BITS <= bits <= MAX_GRANULARITY_BITS:
                raise BlockError(
                    errno.EINVAL, f"{node.path}: bitmap {record.name!r}: granularity {granularity}"
                )
            want = bitmap_bytes(node.size, granularity)
            if len(record.data) != want:
                raise BlockError(
                    errno.EINVAL,
                    f"{node.path}: bitmap {record.name!r} has {len(record.data)} bytes of data; "
                    f"a disk of {node.size} bytes needs {want}",
                )

    def _save(self, records: Sequence[BitmapRecord]) -> None:
        node = self.node
        host = node.host
        refcounts = node.writable_refcounts()
        node.flush_metadata()  # the node's own changes first, in their order
        cluster_size = node.cluster_size
        bits = node.cluster_bits
        old_extra = {e.name: e for e in node.bitmap_entries if e.extra_data}
        entries: list[BitmapEntry] = []
        tables: list[array[int]] = []
        taken: list[tuple[int, int]] = []
        try:
            for record in records:
                granularity_bits = record.granularity.bit_length() - 1
                count = table_entries(node.size, granularity_bits, cluster_size)
                table = array("Q", bytes(8 * count))
                data = record.data
                for index in range(count):
                    chunk = data[index * cluster_size : (index + 1) * cluster_size]
                    if chunk.count(0) == len(chunk):
                        continue  # an all-zero cluster: entry 0, no cluster (as QEMU)
                    cluster = node.allocate_metadata(1)
                    taken.append((cluster, 1))
                    host.write_bytes(cluster << bits, chunk + bytes(cluster_size - len(chunk)))
                    table[index] = cluster << bits
                raw_table = be64_bytes(table)
                clusters = -(-len(raw_table) // cluster_size)
                start = node.allocate_metadata(clusters)
                taken.append((start, clusters))
                host.write_bytes(start << bits, raw_table + bytes((clusters << bits) - len(raw_table)))
                flags = (BME_AUTO if record.enabled else 0) | (BME_IN_USE if record.in_use else 0)
                extra = b""
                kept = old_extra.get(record.name)
                if kept is not None and kept.granularity_bits == granularity_bits:
                    extra = kept.extra_data  # left as it was, as the format asks
                    flags |= BME_EXTRA_DATA_COMPATIBLE
                entries.append(BitmapEntry(record.name, start << bits, count, flags, granularity_bits, extra))
                tables.append(table)
            directory = encode_directory(entries)
            if len(directory) > MAX_BITMAP_DIRECTORY:
                raise BlockError(errno.EINVAL, f"{node.path}: a bitmap directory of {len(directory)} bytes")
            directory_at = 0
            if entries:
                clusters = -(-len(directory) // cluster_size)
                start = node.allocate_metadata(clusters)
                taken.append((start, clusters))
                directory_at = start << bits
                host.write_bytes(directory_at, directory + bytes((clusters << bits) - len(directory)))
            node.refcounts_down()  # the new clusters and their refcounts on disk, then the header
            self._write_header(entries, len(directory), directory_at)
        except BaseException:
            # Nothing points at the new clusters: give them back (in memory; on disk they leak).
            for cluster, count in taken:
                refcounts.change(cluster, count, -1)
                node.forget_metadata(cluster, count)
            raise
        old = node.bitmap_clusters()
        node.bitmap_entries = entries
        node.bitmap_tables = tables
        node.bitmap_directory = (directory_at, len(directory))
        node.bitmaps_found = [
            BitmapEntry(e.name, e.table_offset, e.table_size, e.flags, e.granularity_bits) for e in entries
        ]
        node.bitmaps_damage = ""
        new = node.bitmap_clusters()
        for cluster in sorted(old - new):
            refcounts.change(cluster, 1, -1)
            node.forget_metadata(cluster, 1)
        node.refcounts_down()
        node.bitmaps_clean = any(not e.flags & BME_IN_USE for e in entries)

    def _write_header(self, entries: list[BitmapEntry], directory_size: int, directory_at: int) -> None:
        """Point the header at the new directory (or drop the extension), durably."""
        node = self.node
        host = node.host
        head = host.read(0, min(host.size, node.cluster_size))
        header = parse_header(node.path, head, host.size, True)
        if entries:
            extension: bytes | None = bitmaps_extension(len(entries), directory_size, directory_at)
            autoclear = header.autoclear | AUTOCLEAR_BITMAPS
        else:
            extension = None
            autoclear = header.autoclear & ~AUTOCLEAR_BITMAPS
        new = rewrite_cluster0(node.path, head, header, extension, autoclear)
        first, end = _changed(head, new)
        if first == end:
            return
        if first // SECTOR == (end - 1) // SECTOR:  # one sector: written whole, or not at all
            host.write_bytes(first, new[first:end])
            host.barrier()
            return
        # More than one sector: the bitmaps bit clear while they are written.
        cleared = header.autoclear & ~AUTOCLEAR_BITMAPS
        features = HEADER_FEATURES_AT + 16
        if cleared != header.autoclear:
            host.write_bytes(features, cleared.to_bytes(8, "big"))
            host.barrier()
        body = bytearray(new)
        body[features : features + 8] = cleared.to_bytes(8, "big")
        now = bytearray(head)
        now[features : features + 8] = cleared.to_bytes(8, "big")
        first, end = _changed(bytes(now), bytes(body))
        if first != end:
            host.write_bytes(first, bytes(body[first:end]))
            host.barrier()
        if autoclear != cleared:
            host.write_bytes(features, autoclear.to_bytes(8, "big"))
            host.barrier()


def _changed(old: bytes, new: bytes) -> tuple[int, int]:
    """The range ``[first, end)`` of ``new`` that differs from ``old`` (empty: equal)."""
    limit = min(len(old), len(new))
    first = 0
    while first < limit and old[first] == new[first]:
        first += 1
    if first == len(new):
        return first, first
    end = len(new)
    while end > first and end <= limit and old[end - 1] == new[end - 1]:
        end -= 1
    return first, end
