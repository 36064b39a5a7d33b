"""The qcow2 node: a qcow2 image (version 2 or 3), read and written, over the file node holding it.

Block layer, a format node: it sits above a storage node (its ``inner``, the
:class:`~device.block.file.FileNode` of the image file, which takes QEMU's image locks) and turns
the guest offsets it is asked for into the clusters the image's L1 and L2 tables point at. Layers
(``fault=``) go above it. Unallocated clusters read from the backing file named in the header
(raw or qcow2, itself a chain, always read-only), or as zeroes. The header is
:mod:`device.block.qcow2_header`; the refcounts and the write barrier are
:mod:`device.block.qcow2_meta`.

Reading: standard L2 entries (unallocated, normal, the v3 zero flag), compressed clusters (zlib,
and zstd when the ``zstandard`` module is importable). Refused at open, with one sentence:
encryption, an external data file, extended L2 entries, unknown incompatible features, the
corrupt bit, a backing file of unrecorded format, a backing loop.

Writing, as QEMU's qcow2 driver orders it: a write to a cluster this image owns alone (COPIED)
goes in place; any other allocates clusters (contiguous for a run of them), fills what the write
does not cover from what the guest saw there (the backing file, a compressed or shared cluster,
zeroes), and links them in the L2 table. L2 tables and refcount blocks are write-back caches;
:meth:`flush_now` writes them in the order that keeps a crash safe (refcount blocks, barrier,
the refcount table, barrier, L2 tables, barrier, L1 entries, barrier): whatever points at a
cluster reaches the disk after the cluster and its refcount, so a crash can leak clusters (a
refcount above its references) but never leave a referenced cluster free. Clusters that a write,
discard or zeroing unlinks are freed only once the unlinking L2 tables are on disk. Zeroing uses
the v3 zero flag; ``resize`` grows (zeroing what the old tail or a longer backing file would show)
and shrinks. An image vblk must not write (lazy refcounts left dirty, internal snapshots) is
refused writable with the reason; a data write that would land on metadata marks the image
corrupt (as QEMU's overlap check) and fails. A writable open clears the autoclear bits vblk does
not keep, as the format asks of such a writer; the bitmaps bit stays while its extension is valid.

Persistent bitmaps: the node parses and checks the bitmap directory at open (a damaged one
refuses a writable open; a read-only one serves the data without them) and, on a writable
open, sets every bitmap's in_use flag on disk before any data write, as QEMU does, so that a
process that never stores them back leaves them inconsistent. Storing them is
:mod:`device.block.qcow2_bitmaps`'s; after a store, the next change marks them in use again.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import os
import struct
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, cast

import structlog

from device.block.file import FileNode
from device.block.node import BlockError, BlockingNode, BlockNode, Capabilities, Extent, check_access
from device.block.qcow2_header import (
    AUTOCLEAR_BITMAPS,
    BME_IN_USE,
    BMT_ALL_ONES,
    BMT_OFFSET_MASK,
    BMT_RESERVED_MASK,
    HEADER_V3_LENGTH,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    BitmapEntry,
    Header,
    Snapshot,
    create_image,
    directory_flag_offsets,
    find_snapshot,
    invalid,
    parse_directory,
    parse_header,
    parse_snapshots,
    rewrite_cluster0,
    unsupported,
    writable_refusal,
)
from device.block.qcow2_meta import (
    HEADER_FEATURES_AT,
    Host,
    HostFile,
    Refcounts,
    be64,
    be64_bytes,
    corrupt,
)

__all__ = ["DEFAULT_L2_CACHE", "HEADER_V3_LENGTH", "Qcow2Node", "create_image"]

log = structlog.get_logger("vblk.device.qcow2")

MAX_CHAIN: Final = 64  # backing files below one image

OFFSET_MASK: Final = 0x00FFFFFFFFFFFE00  # bits 9-55: a host offset in an L1 or standard L2 entry
COPIED: Final = 1 << 63  # the cluster (or L2 table) is this image's alone: write it in place
L2_COMPRESSED: Final = 1 << 62
L2_ZERO: Final = 1 << 0

#: The L2 cache's largest default size, as QEMU's on Linux: by default the cache holds every
#: table of the image up to this many bytes (32 MiB of 64 KiB-cluster tables map 256 GiB).
DEFAULT_L2_CACHE: Final = 32 << 20

# Kinds of runs of guest bytes.
DATA: Final = 0  # a normal cluster: host bytes at ``host``
ZERO: Final = 1  # reads as zeroes (the zero flag)
UNALLOCATED: Final = 2  # not in this image: the backing file's, or zeroes
COMPRESSED: Final = 3  # one compressed cluster: ``host`` is its L2 entry


def _zstd_module() -> Any:
    """The ``zstandard`` module for zstd-compressed clusters, or None when it is not installed."""
    try:
        return importlib.import_module("zstandard")
    except ImportError:
        return None


_zstd: Final[Any] = _zstd_module()


class Qcow2Node(BlockingNode):
    """A qcow2 image; ``open`` it (the constructor takes what ``open`` found)."""

    kind = "qcow2"

    def __init__(
        self,
        file: HostFile,
        header: Header,
        l1: array[int],
        backing: FileNode | Qcow2Node | None,
        *,
        read_only: bool,
        l2_cache_bytes: int,
    ) -> None:
        super().__init__(header.size, read_only)
        self.path = file.path
        self._file = file
        bits = header.cluster_bits
        self._host = Host(file, 1 << bits)
        self.version = header.version
        self.cluster_bits = bits
        self.cluster_size = 1 << bits
        self._l2_bits = bits - 3
        self._l2_entries = 1 << self._l2_bits
        self._l1_shift = bits + self._l2_bits  # log2 of the bytes one L2 table maps
        self._cluster_mask = (1 << bits) - 1
        self._l1 = l1
        self._l1_offset = header.l1_offset
        self._l1_dirty: set[int] = set()
        self.compression = header.compression
        self.refcount_bits = 1 << header.refcount_order
        self.backing = backing
        self.backing_name = header.backing_name
        self.backing_format = header.backing_format
        #: The image's internal snapshots, and the one served (read-only), if any.
        self.snapshots: list[Snapshot] = []
        self.snapshot: str | None = None
        self.dirty = bool(header.incompatible & INCOMPAT_DIRTY)
        self._incompatible = header.incompatible
        # As QEMU's l2-cache-size: at most this many bytes, never more than the image has tables.
        self._cache_tables = max(1, min(l2_cache_bytes >> bits, len(l1)))
        self._l2_cache: OrderedDict[int, array[int]] = OrderedDict()
        self._l2_dirty: set[int] = set()
        self._lock = threading.RLock()  # metadata: the L2 cache, the refcounts, the L1 table
        # The last cluster decompressed: its L2 entry and bytes (sequential reads hit it).
        self._inflated: tuple[int, bytes] = (0, b"")
        # Compressed descriptor: bits 0..x-1 host byte offset, x..61 additional 512-byte sectors.
        self._csize_shift = 62 - (bits - 8)
        self._coffset_mask = (1 << self._csize_shift) - 1
        self._csize_mask = (1 << (bits - 8)) - 1
        self._refcounts: Refcounts | None = None
        self._set_host_limit(header.size)
        if not read_only:
            self._refcounts = Refcounts(
                self._host,
                bits,
                header.refcount_order,
                header.refcount_table_offset,
                header.refcount_table_clusters,
            )
        # Clusters that hold metadata (the header, the L1 and L2 tables); the refcounts keep theirs.
        self._metadata: set[int] = {0}
        first = header.l1_offset >> bits
        self._metadata.update(range(first, first + max(1, -(-len(l1) * 8 >> bits))))
        self._metadata.update((e & OFFSET_MASK) >> bits for e in l1 if e & OFFSET_MASK)
        self._pending_free: list[tuple[int, int]] = []  # (cluster, count) unlinked, not yet on disk
        self._inflight = 0  # writes in place outside the lock
        self._broken: str | None = None  # why writing stopped (metadata found corrupt)
        self._closed = False
        # Persistent bitmaps (device.block.qcow2_bitmaps): the directory as found at open (flags
        # before this open set in_use), each entry's bitmap table, and where the directory is.
        self.bitmaps_found: list[BitmapEntry] = []
        self.bitmap_entries: list[BitmapEntry] = []  # as on disk now
        self.bitmap_tables: list[array[int]] = []
        self.bitmap_directory: tuple[int, int] = (0, 0)  # offset, size
        self.bitmaps_damage = ""  # why the bitmaps cannot be used (a read-only open serves the data)
        # Bitmaps stored consistent while the node stays open: the next change marks them in use.
        self.bitmaps_clean = False

    def _set_host_limit(self, size: int) -> None:
        """The file may grow to what it is, plus twice the virtual size and its tables."""
        tables = (-(-size // (1 << self._l1_shift)) + 1024) << self.cluster_bits
        self._host.limit = self._host.size + 2 * size + 2 * tables

    # -- opening ------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        read_only: bool = True,
        force_share: bool = False,
        l2_cache_bytes: int = DEFAULT_L2_CACHE,
        file: HostFile | None = None,
        snapshot: str | None = None,
        _below: tuple[str, ...] = (),
    ) -> Qcow2Node:
        """Open the qcow2 image at ``path`` with its backing chain (always read-only).

        ``file``: the opened host file to use (a layer over the file node); by default it is
        opened here. Raises :class:`BlockError` with one sentence when it cannot (missing,
        locked, not qcow2, a feature this node does not read, or for writing, does not write).
        """
        path = Path(path)
        if l2_cache_bytes <= 0:
            raise ValueError("the L2 cache needs a positive size")
        if file is None:
            try:
                file = FileNode.open(
                    path, read_only=read_only, create=False, force_share=force_share, any_size=True
                )
            except BlockError:
                raise
            except OSError as failed:
                raise BlockError(
                    failed.errno or errno.EIO, f"{path}: {failed.strerror or failed}"
                ) from failed
            except ValueError as bad:  # an empty file
                raise invalid(path, str(bad)) from bad
        try:
            with _host_errors(path):
                return cls._open_file(
                    file, read_only, force_share, l2_cache_bytes, (*_below, os.path.realpath(path)), snapshot
                )
        except BaseException:
            file.close()
            raise

    @classmethod
    def _open_file(
        cls,
        file: HostFile,
        read_only: bool,
        force_share: bool,
        l2_cache_bytes: int,
        chain: tuple[str, ...],
        snapshot: str | None = None,
    ) -> Qcow2Node:
        path = file.path
        host = Host(file, 512)
        head = host.read(0, min(file.size, 1 << MAX_CLUSTER_BITS))
        header = parse_header(path, head, file.size, _zstd is not None)
        try:
            snapshots = parse_snapshots(path, header, host.read, file.size)
        except BlockError as damaged:  # as QEMU: the image itself is served; only its snapshots fail
            if snapshot is not None:
                raise
            log.warning("qcow2_snapshot_table_damaged", path=str(path), why=str(damaged))
            snapshots = []
        if snapshot is not None:  # serve the snapshot's tables, at its size (qemu-nbd -l)
            if not read_only:
                raise BlockError(errno.EROFS, f"{path}: an internal snapshot is served read-only")
            # at the image's current size, as qemu-nbd -l and qemu-img convert -l serve it (past
            # what the snapshot's L1 table maps: zeroes)
            taken = find_snapshot(path, snapshots, snapshot)
            header = dataclasses.replace(
                header, l1_offset=taken.l1_offset, l1_size=taken.l1_size, bitmaps=None
            )
        if not read_only:
            refusal = writable_refusal(header)
            if refusal is not None:
                raise BlockError(errno.EROFS, f"{path} cannot be written: {refusal}")
        needed = header.l1_needed()
        entries = needed
        if not read_only and header.l1_offset + header.l1_size * 8 <= file.size:
            entries = header.l1_size  # all of it: a grown disk uses the entries past ``needed``
        if snapshot is not None:
            entries = min(entries, header.l1_size)
        l1 = be64(host.read(header.l1_offset, entries * 8)) if entries else array("Q")
        if len(l1) < needed:
            l1.extend([0] * (needed - len(l1)))
        backing: FileNode | Qcow2Node | None = None
        if header.backing_name:
            backing = _open_backing(
                path, header.backing_name, header.backing_format, force_share, l2_cache_bytes, chain
            )
        found, tables, damage = _bitmap_directory(host, header, file.size)
        if damage and not read_only:
            raise BlockError(
                errno.EROFS,
                f"{path} cannot be written: its persistent bitmaps are damaged ({damage}); serve it "
                "read-only (the data is intact, QEMU does not open it at all) and copy the data out",
            )
        try:
            node = cls(file, header, l1, backing, read_only=read_only, l2_cache_bytes=l2_cache_bytes)
            node.snapshots = snapshots
            node.snapshot = snapshot
            node._take_bitmaps(header, found, tables, damage)
            if not read_only:
                node._open_for_writing(header, head)
            return node
        except BaseException:
            if backing is not None:
                backing.close()
            raise

    def _take_bitmaps(
        self, header: Header, entries: list[BitmapEntry], tables: list[array[int]], damage: str
    ) -> None:
        self.bitmaps_damage = damage
        if damage:
            log.warning("qcow2_bitmaps_damaged", path=str(self.path), why=damage)
            return
        ext = header.bitmaps
        if ext is None:
            return
        self.bitmaps_found = [dataclasses.replace(e) for e in entries]
        self.bitmap_entries = entries
        self.bitmap_tables = tables
        self.bitmap_directory = (ext.directory_offset, ext.directory_size)
        self._metadata.update(self.bitmap_clusters())

    # -- for the bitmap store (device.block.qcow2_bitmaps), under metadata_lock ------------------

    @property
    def metadata_lock(self) -> threading.RLock:
        return self._lock

    @property
    def host(self) -> Host:
        return self._host

    @property
    def broken(self) -> str | None:
        """Why writing stopped (the image is marked corrupt), or None."""
        return self._broken

    def writable_refcounts(self) -> Refcounts:
        return self._writable()

    def flush_metadata(self) -> None:
        self._flush_metadata()

    def refcounts_down(self) -> None:
        """The refcount blocks and table on disk, then a barrier."""
        self._refcounts_down()

    def allocate_metadata(self, count: int) -> int:
        """``count`` contiguous new clusters for metadata (counted, inside the file): the first."""
        start = self._writable().allocate(count)
        for cluster in range(start, start + count):
            if self._is_metadata(cluster):
                self._mark_corrupt(f"cluster {cluster} is allocated but holds metadata (its refcount is 0)")
        self._host.grow((start + count) << self.cluster_bits)
        self._metadata.update(range(start, start + count))
        return start

    def forget_metadata(self, cluster: int, count: int) -> None:
        self._metadata.difference_update(range(cluster, cluster + count))

    def bitmap_clusters(self) -> set[int]:
        """The clusters the persistent bitmaps hold: the directory, the tables, the data."""
        bits = self.cluster_bits
        offset, size = self.bitmap_directory
        out: set[int] = set()
        if size:
            out.update(range(offset >> bits, ((offset + size - 1) >> bits) + 1))
        for entry, table in zip(self.bitmap_entries, self.bitmap_tables, strict=True):
            first = entry.table_offset >> bits
            out.update(range(first, ((entry.table_offset + entry.table_size * 8 - 1) >> bits) + 1))
            out.update((e & BMT_OFFSET_MASK) >> bits for e in table if e & BMT_OFFSET_MASK)
        return out

    def _open_for_writing(self, header: Header, head: bytes) -> None:
        """What a writer does first, durably, before any data write: clear the autoclear bits it
        does not keep (all but the bitmaps bit, which stays while its extension is valid), drop
        a bitmaps extension no bit vouches for, and mark every bitmap in use (as QEMU does: a
        crash from now on leaves them inconsistent)."""
        keep = header.autoclear & AUTOCLEAR_BITMAPS if header.bitmaps is not None else 0
        if header.bitmaps_stale:
            log.warning(
                "qcow2_bitmaps_dropped",
                path=str(self.path),
                why="a program without bitmap support wrote the image since they were stored",
            )
            self._host.write_bytes(0, rewrite_cluster0(self.path, head, header, None, keep))
        elif header.autoclear != keep:
            self._host.write_bytes(HEADER_FEATURES_AT + 16, struct.pack(">Q", keep))
        self._mark_bitmaps_in_use()
        self._host.barrier()

    def _mark_bitmaps_in_use(self) -> None:
        """Set in_use in the directory's entries in place (each flags word in one sector)."""
        offset = self.bitmap_directory[0]
        for entry, at in zip(self.bitmap_entries, directory_flag_offsets(self.bitmap_entries), strict=True):
            if not entry.flags & BME_IN_USE:
                entry.flags |= BME_IN_USE
                self._host.write_bytes(offset + at, struct.pack(">I", entry.flags))
        self.bitmaps_clean = False

    # -- the node -----------------------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        if self._read_only:
            return _CAPABILITIES_RO
        return _CAPABILITIES_V3 if self.version == 3 else _CAPABILITIES_V2

    @property
    def inner(self) -> BlockNode:
        return cast(BlockNode, self._file)  # a file node, or a layer over one

    @property
    def host_fd(self) -> int:
        """The image file's descriptor (its locks say who else has it open), or -1."""
        return self._file.fd if isinstance(self._file, FileNode) else -1

    def describe(self) -> dict[str, Any]:
        chain: list[dict[str, Any]] = []
        below = self.backing
        while below is not None:
            if isinstance(below, Qcow2Node):
                chain.append({"path": str(below.path), "format": "qcow2", "size": below.size})
                below = below.backing
            else:
                path = below.path if isinstance(below, FileNode) else ""
                chain.append({"path": str(path), "format": "raw", "size": below.size})
                below = None
        return {
            "node": self.kind,
            "path": str(self.path),
            "format": "qcow2",
            "version": self.version,
            "cluster_size": self.cluster_size,
            "refcount_bits": self.refcount_bits,
            "size": self._size,
            "read_only": self._read_only,
            "compression": self.compression,
            "dirty": self.dirty,
            "backing": chain,
            **({"snapshot": self.snapshot} if self.snapshot is not None else {}),
        }

    def read_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        if len(buffers) == 1:  # the hot path: one buffer in one allocated, cached cluster
            length = buffers[0].nbytes
            within = offset & self._cluster_mask
            if offset >= 0 and offset + length <= self._size and within + length <= self.cluster_size:
                entry = self._cached_entry(offset, False)
                host = entry & OFFSET_MASK
                if (
                    entry > 0
                    and not entry & (L2_COMPRESSED | L2_ZERO)
                    and host
                    and not host & self._cluster_mask
                    and host + self.cluster_size <= self._host.size
                ):
                    self._file.read_now(host + within, buffers)
                    return
        total = sum(b.nbytes for b in buffers)
        check_access(self.path, self._size, True, offset, total, False)
        with _host_errors(self.path):
            for buffer in buffers:
                view = buffer if buffer.format == "B" and buffer.ndim == 1 else buffer.cast("B")
                self._read_into(offset, view)
                offset += view.nbytes

    def _cached_entry(self, offset: int, own_table: bool) -> int:
        """The L2 entry of ``offset`` if its table is cached (and, with ``own_table``, the
        image's alone), else -1: what the hot paths look at, without a metadata read."""
        l1_index = offset >> self._l1_shift
        if l1_index >= len(self._l1):
            return -1
        l1_entry = self._l1[l1_index]
        if own_table and not l1_entry & COPIED:
            return -1
        table = self._l2_cache.get(l1_entry & OFFSET_MASK)
        if table is None:
            return -1
        return table[(offset >> self.cluster_bits) & (self._l2_entries - 1)]

    def advise_willneed(self, offset: int, length: int) -> None:
        """Nothing: the image's clusters are not where the guest's bytes are."""

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._refcounts is not None and self._broken is None:
                with self._lock, _host_errors(self.path):
                    self._flush_metadata()
                    self._host.barrier()
        except OSError as failed:
            log.error("qcow2_close_failed", path=str(self.path), error=str(failed))
        finally:
            self._closed = True
            self._l2_cache.clear()
            if self.backing is not None:
                self.backing.close()
            self._file.close()

    # -- mapping ------------------------------------------------------------------------------------

    def runs(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """``(offset, length, kind, host)`` runs of ``[offset, offset+length)``, merged.

        ``kind`` is DATA (``host``: the host offset of ``offset``), ZERO, UNALLOCATED or
        COMPRESSED (one cluster's part; ``host``: its L2 entry). Raises BlockError(EIO) on
        metadata that points outside the file or is misaligned.
        """
        end = offset + length
        bits = self.cluster_bits
        cluster_mask = self.cluster_size - 1
        pending: list[int] | None = None  # [offset, length, kind, host]
        pos = offset
        while pos < end:
            guest_cluster = pos >> bits
            l1_index = guest_cluster >> self._l2_bits
            within = pos & cluster_mask
            table = self._l2_table(l1_index)
            # Walk the clusters of this L2 table that fall in the range.
            table_end = min(end, (l1_index + 1) << self._l1_shift)
            index = guest_cluster & (self._l2_entries - 1)
            while pos < table_end:
                take = min(table_end - pos, self.cluster_size - within)
                entry = table[index] if table is not None else 0
                kind, host = self._classify(entry, pos)
                if kind == DATA:
                    host += within
                if (
                    pending is not None
                    and pending[2] == kind
                    and kind != COMPRESSED
                    and (kind != DATA or pending[3] + pending[1] == host)
                ):
                    pending[1] += take
                else:
                    if pending is not None:
                        yield pending[0], pending[1], pending[2], pending[3]
                    pending = [pos, take, kind, host]
                pos += take
                within = 0
                index += 1
        if pending is not None:
            yield pending[0], pending[1], pending[2], pending[3]

    def _classify(self, entry: int, pos: int) -> tuple[int, int]:
        if entry & L2_COMPRESSED:
            return COMPRESSED, entry
        if entry & L2_ZERO:
            if self.version < 3:
                raise corrupt(self.path, f"a zero cluster in a version 2 image (guest offset {pos:#x})")
            return ZERO, 0
        host = entry & OFFSET_MASK
        if host == 0:
            return UNALLOCATED, 0
        if host & (self.cluster_size - 1):
            raise corrupt(self.path, f"data cluster offset {host:#x} unaligned (guest offset {pos:#x})")
        if host >= self._host.size:
            raise corrupt(self.path, f"data cluster offset {host:#x} past the end of the file")
        return DATA, host

    def _l2_table(self, l1_index: int) -> array[int] | None:
        """The L2 table of one L1 entry (cached), or None when it is unallocated."""
        if l1_index >= len(self._l1):
            return None  # the tail of the last table, past the virtual size
        l2_offset = self._l1[l1_index] & OFFSET_MASK
        if l2_offset == 0:
            return None
        with self._lock:
            table = self._l2_cache.get(l2_offset)
            if table is not None:
                self._l2_cache.move_to_end(l2_offset)
                return table
            if l2_offset & (self.cluster_size - 1):
                raise corrupt(self.path, f"L2 table offset {l2_offset:#x} unaligned (L1 index {l1_index})")
            if l2_offset + self.cluster_size > self._host.size:
                raise corrupt(self.path, f"L2 table offset {l2_offset:#x} past the end of the file")
            table = be64(self._host.read(l2_offset, self.cluster_size))
            self._cache_insert(l2_offset, table)
            return table

    def _cache_insert(self, l2_offset: int, table: array[int]) -> None:
        cache = self._l2_cache
        cache[l2_offset] = table
        cache.move_to_end(l2_offset)
        while len(cache) > self._cache_tables:
            victim = next(iter(cache))
            if victim in self._l2_dirty:
                # It reaches the disk after what it points at (and stays cached if it cannot).
                self._refcounts_down()
                self._host.write_bytes(victim, be64_bytes(cache[victim]))
                self._l2_dirty.discard(victim)
            del cache[victim]

    @property
    def l2_cache_tables(self) -> int:
        """How many L2 tables the cache holds at most."""
        return self._cache_tables

    @property
    def l2_cached(self) -> int:
        """How many L2 tables the cache holds now."""
        return len(self._l2_cache)

    # -- reading ------------------------------------------------------------------------------------

    def _read_into(self, offset: int, view: memoryview) -> None:
        done = 0
        for start, length, kind, host in self.runs(offset, view.nbytes):
            out = view[done : done + length]
            if kind == DATA:
                if host + length > self._host.size:
                    raise corrupt(self.path, f"data at {host:#x}+{length} runs past the end of the file")
                self._file.read_now(host, [out])
            elif kind == ZERO:
                out[:] = bytes(length)
            elif kind == UNALLOCATED:
                self._read_backing(start, out)
            else:
                cluster = self._inflate(host)
                within = start & (self.cluster_size - 1)
                out[:] = cluster[within : within + length]
            done += length

    def _read_backing(self, offset: int, out: memoryview) -> None:
        backing = self.backing
        length = out.nbytes
        have = 0 if backing is None else max(0, min(length, backing.size - offset))
        if backing is not None and have:
            backing.read_now(offset, [out[:have]])
        if have < length:
            out[have:] = bytes(length - have)  # past a smaller backing file's end

    def _inflate(self, entry: int) -> bytes:
        """The bytes of the compressed cluster ``entry`` describes (the last one is kept)."""
        last_entry, last = self._inflated
        if last_entry == entry and last:
            return last
        host = entry & self._coffset_mask
        sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
        length = sectors * 512 - (host & 511)
        file_size = self._host.size
        if host == 0 or host >= file_size:
            raise corrupt(self.path, f"compressed cluster at {host:#x} outside the file")
        length = min(length, file_size - host)  # the last one may end mid-sector, at the file's end
        compressed = self._host.read(host, length)
        cluster = self._decompress(compressed)
        if len(cluster) != self.cluster_size:
            raise corrupt(self.path, f"the compressed cluster at {host:#x} does not inflate to a cluster")
        self._inflated = (entry, cluster)
        return cluster

    def _decompress(self, compressed: bytes) -> bytes:
        try:
            if self.compression == "zlib":
                return zlib.decompressobj(-12).decompress(compressed, self.cluster_size)
            return self._unzstd(compressed)
        except Exception as bad:  # zlib.error, zstandard.ZstdError and their kin
            raise corrupt(self.path, f"a compressed cluster does not inflate: {bad}") from bad

    def _unzstd(self, compressed: bytes) -> bytes:
        """zstd frames, one after another, until they fill a cluster; what follows is ignored
        (the rest of the last sector, or the next compressed cluster)."""
        out = bytearray()
        rest = compressed
        while len(out) < self.cluster_size and rest:
            frame = _zstd.ZstdDecompressor().decompressobj()
            out += frame.decompress(rest)
            if not frame.eof:
                break  # cut short: fewer bytes than a cluster
            rest = frame.unused_data
        return bytes(out[: self.cluster_size])

    # -- writing ------------------------------------------------------------------------------------

    def write_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        if len(buffers) == 1 and self._fast_write(offset, buffers):
            return
        total = sum(b.nbytes for b in buffers)
        check_access(self.path, self._size, self._read_only, offset, total, True)
        if not total:
            return
        views = [b if b.format == "B" and b.ndim == 1 else b.cast("B") for b in buffers]
        with _host_errors(self.path):
            if self._write_in_place(offset, total, views):
                return
            with self._lock:
                self._writable()
                self._write(offset, total, views)

    def _fast_write(self, offset: int, buffers: Sequence[memoryview]) -> bool:
        """The hot write: one buffer in one cluster this image owns alone, its table cached."""
        length = buffers[0].nbytes
        within = offset & self._cluster_mask
        if not (offset >= 0 and offset + length <= self._size and 0 < within + length <= self.cluster_size):
            return False
        with self._lock:
            if self._refcounts is None or self._broken is not None or self.bitmaps_clean:
                return False
            entry = self._cached_entry(offset, True)
            host = self._owned_host(entry) if entry >= 0 else 0
            if not host:
                return False
            self._inflight += 1
        try:
            self._host.write(host + within, buffers)
            self._host.unsynced = True  # again: a barrier may have run while this was written
        finally:
            with self._lock:
                self._inflight -= 1
        return True

    def _owned_host(self, entry: int) -> int:
        """The host cluster of an L2 entry a write may go to in place (this image's alone, not
        compressed or zero, inside the file, not metadata), else 0: the slow path then says what
        is wrong, or allocates."""
        host = entry & OFFSET_MASK
        if (
            entry & (COPIED | L2_COMPRESSED | L2_ZERO) != COPIED
            or not host
            or host & self._cluster_mask
            or host + self.cluster_size > self._host.size
            or self._is_metadata(host >> self.cluster_bits)
        ):
            return 0
        return host

    def _writable(self) -> Refcounts:
        if self._broken is not None:
            raise BlockError(
                errno.EIO, f"{self.path} is marked corrupt and no longer written: {self._broken}"
            )
        refcounts = self._refcounts
        if refcounts is None:
            raise BlockError(errno.EROFS, f"{self.path} is read-only")
        if self.bitmaps_clean:  # stored consistent, and about to change: in use again first
            self._mark_bitmaps_in_use()
            self._host.barrier()
        return refcounts

    def _write_in_place(self, offset: int, total: int, views: list[memoryview]) -> bool:
        """The common write: every cluster it touches is this image's alone. False if not."""
        bits = self.cluster_bits
        mask = self.cluster_size - 1
        spans: list[tuple[int, int]] = []  # host offset, length
        with self._lock:
            if self._broken is not None or self._refcounts is None or self.bitmaps_clean:
                return False
            pos = offset
            end = offset + total
            while pos < end:
                l1_index = pos >> self._l1_shift
                if not self._l1[l1_index] & COPIED:
                    return False
                table = self._l2_table(l1_index)
                if table is None:
                    return False
                host = self._owned_host(table[(pos >> bits) & (self._l2_entries - 1)])
                if not host:
                    return False
                take = min(end - pos, self.cluster_size - (pos & mask))
                at = host + (pos & mask)
                if spans and spans[-1][0] + spans[-1][1] == at:
                    spans[-1] = (spans[-1][0], spans[-1][1] + take)
                else:
                    spans.append((at, take))
                pos += take
            self._inflight += 1
        try:
            done = 0
            for at, length in spans:
                self._host.write(at, _slice(views, done, length))
                done += length
            self._host.unsynced = True  # again: a barrier may have run while this was written
        finally:
            with self._lock:
                self._inflight -= 1
        return True

    def _write(self, offset: int, total: int, views: list[memoryview]) -> None:
        """Any write, under the lock: in place where it can, allocating where it must."""
        bits = self.cluster_bits
        size = self.cluster_size
        mask = size - 1
        end = offset + total
        pos = offset
        while pos < end:
            l1_index = pos >> self._l1_shift
            table, l2_offset = self._l2_for_write(l1_index)
            index = (pos >> bits) & (self._l2_entries - 1)
            entry = table[index]
            host = entry & OFFSET_MASK
            if entry & (COPIED | L2_COMPRESSED | L2_ZERO) == COPIED and host:
                self._check_data_cluster(host, pos)
                take = min(end - pos, size - (pos & mask))
                self._host.write(host + (pos & mask), _slice(views, pos - offset, take))
                pos += take
                continue
            # A run of clusters of this table that need new ones.
            table_end = (l1_index + 1) << self._l1_shift
            count = 1
            most = self._writable().max_run
            while count < most:
                nxt = ((pos >> bits) + count) << bits
                if nxt >= end or nxt >= table_end:
                    break
                following = table[index + count]
                if following & (COPIED | L2_COMPRESSED | L2_ZERO) == COPIED and following & OFFSET_MASK:
                    break
                count += 1
            run_end = min(end, ((pos >> bits) + count) << bits)
            self._allocate_and_write(table, l2_offset, index, count, pos, run_end, views, offset)
            pos = run_end

    def _allocate_and_write(
        self,
        table: array[int],
        l2_offset: int,
        index: int,
        count: int,
        pos: int,
        run_end: int,
        views: list[memoryview],
        offset: int,
    ) -> None:
        """New clusters for ``count`` entries from ``index``: the write's bytes from ``pos`` to
        ``run_end``, what the guest saw in the rest of the first and last cluster."""
        refcounts = self._writable()
        bits = self.cluster_bits
        first_guest = (pos >> bits) << bits
        last_guest_end = first_guest + (count << bits)
        head = pos - first_guest
        tail = last_guest_end - run_end
        # What the head and tail hold now (read before the entries change).
        head_fill = self._current(first_guest, head)
        tail_fill = self._current(run_end, tail)
        start = refcounts.allocate(count)
        for cluster in range(start, start + count):
            if self._is_metadata(cluster):
                self._mark_corrupt(f"cluster {cluster} is allocated but holds metadata (its refcount is 0)")
        host = start << bits
        fresh = host >= self._host.size  # past the end of the file
        self._host.grow(host + (count << bits))
        iov: list[memoryview] = []
        at = host
        if fresh and (head_fill is None or tail_fill is None):
            # Zeroes allocated in the file (as QEMU's zero copy-on-write): only the rest is written.
            self._host.preallocate(host, count << bits)
            at += head if head_fill is None else 0
            head = 0 if head_fill is None else head
            tail = 0 if tail_fill is None else tail
        if head:
            iov.append(memoryview(head_fill if head_fill is not None else bytes(head)))
        iov += _slice(views, pos - offset, run_end - pos)
        if tail:
            iov.append(memoryview(tail_fill if tail_fill is not None else bytes(tail)))
        self._host.write(at, iov)
        for n in range(count):
            self._unlink(table[index + n])
            table[index + n] = ((start + n) << bits) | COPIED
        self._l2_dirty.add(l2_offset)

    def _current(self, offset: int, length: int) -> bytes | None:
        """What the guest reads at ``[offset, offset+length)`` now; None for zeroes (or nothing)."""
        visible = max(0, min(length, self._size - offset))
        if visible == 0:
            return None
        backing = self.backing
        beneath = 0 if backing is None else backing.size
        if all(
            kind == ZERO or (kind == UNALLOCATED and start >= beneath)
            for start, _, kind, _ in self.runs(offset, visible)
        ):
            return None  # zeroes, known from the tables alone
        out = bytearray(length)
        self._read_into(offset, memoryview(out)[:visible])
        if out.count(0) == length:
            return None
        return bytes(out)

    def _l2_for_write(self, l1_index: int) -> tuple[array[int], int]:
        """The L2 table of ``l1_index`` to change, and its offset: a new one (zeroed, or copied
        from a table this image shares) when it has none of its own."""
        refcounts = self._writable()
        entry = self._l1[l1_index]
        old = entry & OFFSET_MASK
        if old and entry & COPIED:
            table = self._l2_table(l1_index)
            assert table is not None
            return table, old
        source = self._l2_table(l1_index) if old else None
        cluster = refcounts.allocate(1)
        if self._is_metadata(cluster):
            self._mark_corrupt(f"cluster {cluster} is allocated but holds metadata (its refcount is 0)")
        offset = cluster << self.cluster_bits
        self._host.grow(offset + self.cluster_size)
        table = array("Q", source) if source is not None else array("Q", bytes(self.cluster_size))
        self._metadata.add(cluster)
        self._l2_dirty.add(offset)
        self._cache_insert(offset, table)
        if old:
            self._free_later(old >> self.cluster_bits, 1)
            self._l2_dirty.discard(old)
            self._l2_cache.pop(old, None)
        self._l1[l1_index] = offset | COPIED
        self._l1_dirty.add(l1_index)
        return table, offset

    def _unlink(self, entry: int) -> None:
        """The host clusters an L2 entry held are freed once its replacement is on disk."""
        if entry & L2_COMPRESSED:
            start = (entry & self._coffset_mask) & ~511
            sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
            first = start >> self.cluster_bits
            count = ((start + sectors * 512 - 1) >> self.cluster_bits) - first + 1
        elif entry & OFFSET_MASK:
            first, count = (entry & OFFSET_MASK) >> self.cluster_bits, 1
        else:
            return
        if first == 0 or (first + count - 1) << self.cluster_bits >= self._host.size:
            raise corrupt(self.path, f"an L2 entry ({entry:#x}) points outside the file")
        self._free_later(first, count)

    def _free_later(self, cluster: int, count: int) -> None:
        self._pending_free.append((cluster, count))

    def _is_metadata(self, cluster: int) -> bool:
        refcounts = self._refcounts
        return cluster in self._metadata or (refcounts is not None and cluster in refcounts.metadata)

    def _check_data_cluster(self, host: int, pos: int) -> None:
        if host & (self.cluster_size - 1) or host + self.cluster_size > self._host.size:
            raise corrupt(
                self.path, f"data cluster offset {host:#x} unaligned or past the end (guest {pos:#x})"
            )
        if self._is_metadata(host >> self.cluster_bits):
            self._mark_corrupt(f"guest offset {pos:#x} maps to metadata at {host:#x}")

    def _mark_corrupt(self, why: str) -> None:
        """Stop writing, set the corrupt bit (as QEMU does), fail the request."""
        self._broken = why
        log.error("qcow2_marked_corrupt", path=str(self.path), why=why)
        if self.version == 3:
            self._incompatible |= INCOMPAT_CORRUPT
            try:
                self._host.write_bytes(HEADER_FEATURES_AT, struct.pack(">Q", self._incompatible))
                self._host.barrier()
            except OSError as failed:
                log.error("qcow2_corrupt_bit_not_written", path=str(self.path), error=str(failed))
        raise corrupt(self.path, f"{why}; the image is now marked corrupt (qemu-img check -r all repairs it)")

    # -- zeroes -------------------------------------------------------------------------------------

    def zero_now(self, offset: int, length: int, may_unmap: bool) -> None:
        check_access(self.path, self._size, self._read_only, offset, length, True)
        with _host_errors(self.path), self._lock:
            self._writable()
            self._zero(offset, length, may_unmap)

    def _zero(self, offset: int, length: int, unmap: bool) -> None:
        """``[offset, offset+length)`` reads as zeroes: whole clusters by their entries (the
        zero flag, or none), the rest by writing zeroes where it does not read as zeroes."""
        bits = self.cluster_bits
        size = self.cluster_size
        end = offset + length
        pos = offset
        while pos < end:
            cluster_start = (pos >> bits) << bits
            cluster_end = cluster_start + size
            take = min(end, cluster_end) - pos
            if pos == cluster_start and min(cluster_end, self._size) <= end:
                self._zero_cluster(pos, unmap)
            elif self._current(pos, take) is not None:
                zeroes = memoryview(bytes(take))
                self._write(pos, take, [zeroes])
            pos += take

    def _zero_cluster(self, pos: int, unmap: bool) -> None:
        bits = self.cluster_bits
        l1_index = pos >> self._l1_shift
        table = self._l2_table(l1_index)
        entry = table[(pos >> bits) & (self._l2_entries - 1)] if table is not None else 0
        compressed = entry & L2_COMPRESSED  # its low bits are a byte offset, not flags
        host = 0 if compressed else entry & OFFSET_MASK
        shows_backing = self.backing is not None and pos < self.backing.size
        if not compressed and entry & L2_ZERO and (host == 0 or not unmap):
            return  # zeroes already
        if entry == 0 and not shows_backing:
            return  # unallocated, nothing beneath: zeroes already
        if self.version < 3:  # no zero flag: deallocate where nothing shows beneath, else write
            if shows_backing or not unmap:
                self._write(pos, self.cluster_size, [memoryview(bytes(self.cluster_size))])
                return
            new = 0
        elif unmap:
            new = L2_ZERO if shows_backing else 0
        elif entry & COPIED and host:
            new = host | COPIED | L2_ZERO  # keeps its cluster, reads as zeroes
        else:
            new = L2_ZERO
        table, l2_offset = self._l2_for_write(l1_index)
        index = (pos >> bits) & (self._l2_entries - 1)
        old = table[index]
        if new & OFFSET_MASK == 0:
            self._unlink(old)
        table[index] = new
        self._l2_dirty.add(l2_offset)

    # -- flushing -----------------------------------------------------------------------------------

    def flush_now(self) -> None:
        with _host_errors(self.path), self._lock:
            if self._refcounts is None:
                return
            if self._broken is None:
                self._flush_metadata()
            self._host.barrier()

    def _refcounts_down(self) -> None:
        """Refcount blocks, then the refcount table, each on disk before what comes after."""
        refcounts = self._refcounts
        assert refcounts is not None
        refcounts.write_blocks()
        if refcounts.table_dirty:
            self._host.barrier()
            refcounts.write_table()
        self._host.barrier()

    def _flush_metadata(self) -> None:
        """Every cached change on disk, in the order that keeps a crash safe (module doc)."""
        refcounts = self._refcounts
        if refcounts is None:
            return
        if not (refcounts.dirty or self._l2_dirty or self._l1_dirty or self._pending_free):
            return
        self._refcounts_down()
        for offset in sorted(self._l2_dirty):
            self._host.write_bytes(offset, be64_bytes(self._l2_cache[offset]))
        self._l2_dirty.clear()
        if self._l1_dirty:
            self._host.barrier()
            for first, last in _spans(sorted(self._l1_dirty)):
                entries = self._l1[first : last + 1]
                self._host.write_bytes(self._l1_offset + first * 8, be64_bytes(entries))
            self._l1_dirty.clear()
        self._host.barrier()
        if self._pending_free and self._inflight == 0:
            freed, self._pending_free = self._pending_free, []
            for cluster, count in freed:
                refcounts.change(cluster, count, -1)
                self._metadata.difference_update(range(cluster, cluster + count))
            refcounts.write_blocks()
            self._host.barrier()

    # -- resizing -----------------------------------------------------------------------------------

    def resize(self, new_size: int) -> None:
        if new_size <= 0 or new_size % 512:
            raise ValueError(f"size {new_size} is not a positive multiple of 512")
        if self._read_only:
            raise BlockError(errno.EROFS, f"{self.path} is read-only")
        with _host_errors(self.path), self._lock:
            self._writable()
            old = self._size
            if new_size > old:
                self._set_host_limit(new_size)
                self._grow(old, new_size)
            elif new_size < old:
                self._shrink(new_size)
            else:
                return
            self._flush_metadata()
            self._host.write_header_size(new_size)
            self._host.barrier()
            self._size = new_size
            self._set_host_limit(new_size)

    def _grow(self, old: int, new_size: int) -> None:
        covered = 1 << (2 * self.cluster_bits - 3)
        needed = -(-new_size // covered)
        if needed * 8 > MAX_L1_BYTES:
            raise BlockError(
                errno.EFBIG, f"{self.path}: {new_size} bytes needs an L1 table over QEMU's limit"
            )
        if needed > len(self._l1):
            self._move_l1(needed)
        # What the grown part would show: the old last cluster's tail, a longer backing file.
        mask = self.cluster_size - 1
        shown = min(new_size, (old + mask) & ~mask)
        if self.backing is not None:
            shown = max(shown, min(new_size, self.backing.size))
        if shown > old:
            self._size = new_size  # the zeroing works in the new bounds
            try:
                self._zero(old, shown - old, True)
            finally:
                self._size = old

    def _shrink(self, new_size: int) -> None:
        bits = self.cluster_bits
        mask = self.cluster_size - 1
        start = (new_size + mask) & ~mask
        per_table = 1 << self._l1_shift
        first_table = -(-new_size // per_table)
        pos = start
        while pos < self._size:  # the clusters past the end in tables that stay
            l1_index = pos >> self._l1_shift
            if l1_index >= first_table:
                break
            table = self._l2_table(l1_index)
            table_end = min(self._size, (l1_index + 1) * per_table)
            if table is not None:
                table, l2_offset = self._l2_for_write(l1_index)
                for index in range(
                    (pos >> bits) & (self._l2_entries - 1),
                    ((table_end - 1) >> bits & (self._l2_entries - 1)) + 1,
                ):
                    self._unlink(table[index])
                    table[index] = 0
                self._l2_dirty.add(l2_offset)
            pos = table_end
        for l1_index in range(first_table, len(self._l1)):  # tables wholly past it
            entry = self._l1[l1_index]
            offset = entry & OFFSET_MASK
            if not offset:
                continue
            table = self._l2_table(l1_index)
            assert table is not None
            if entry & COPIED:
                for index in range(self._l2_entries):
                    self._unlink(table[index])
            self._free_later(offset >> bits, 1)
            self._l2_cache.pop(offset, None)
            self._l2_dirty.discard(offset)
            self._l1[l1_index] = 0
            self._l1_dirty.add(l1_index)

    def _move_l1(self, needed: int) -> None:
        """A bigger L1 table in new clusters; the header points at it once it is on disk."""
        refcounts = self._writable()
        self._flush_metadata()  # the tables the new L1 points at are on disk first
        clusters = -(-needed * 8 // self.cluster_size)
        start = refcounts.allocate(clusters)
        offset = start << self.cluster_bits
        self._host.grow(offset + (clusters << self.cluster_bits))
        l1 = array("Q", self._l1)
        l1.extend([0] * ((clusters << self.cluster_bits) // 8 - len(l1)))
        self._host.write_bytes(offset, be64_bytes(l1))
        self._refcounts_down()
        self._host.write_header_l1(len(l1), offset)
        self._host.barrier()
        old_first = self._l1_offset >> self.cluster_bits
        old_clusters = max(1, -(-len(self._l1) * 8 >> self.cluster_bits))
        self._l1, self._l1_offset = l1, offset
        self._metadata.difference_update(range(old_first, old_first + old_clusters))
        self._metadata.update(range(start, start + clusters))
        refcounts.change(old_first, old_clusters, -1)

    # -- the allocation map ---------------------------------------------------------------------------

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Data (allocated here or in a backing file), zero clusters (zero, not data) and holes.

        As ``qemu-img map`` tells them: a data cluster is data (QEMU looks into the host file's
        holes only for images with preallocated metadata), a hole with no backing file is hole
        and zero.
        """
        check_access(self.path, self._size, True, offset, length, False)
        with _host_errors(self.path):
            return self._extents(offset, length)

    def _extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for start, run, kind, _host in self.runs(offset, length):
            if kind in (DATA, COMPRESSED):
                _append(out, Extent(start, run, False, False))
            elif kind == ZERO:
                _append(out, Extent(start, run, True, True))
            else:
                for part in self._backing_extents(start, run):
                    _append(out, part)
        return out

    def _backing_extents(self, offset: int, length: int) -> list[Extent]:
        backing = self.backing
        have = 0 if backing is None else max(0, min(length, backing.size - offset))
        parts = backing.extents(offset, have) if backing is not None and have else []
        if have < length:
            parts.append(Extent(offset + have, length - have, True, True))
        return parts

    def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """``(offset, length, depth)`` runs: 0 allocated nowhere in the chain, 1 in this image
        (zero clusters too), 2 and more in the backing chain (a raw file: all of it; past the end
        of a shorter backing file, that file's depth), as ``qemu-nbd -A`` counts."""
        check_access(self.path, self._size, True, offset, length, False)
        with _host_errors(self.path):
            return self._allocation_depth(offset, length)

    def _allocation_depth(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        for start, run, kind, _host in self.runs(offset, length):
            if kind != UNALLOCATED:
                _append_depth(out, start, run, 1)
                continue
            backing = self.backing
            have = 0 if backing is None else max(0, min(run, backing.size - start))
            if isinstance(backing, Qcow2Node) and have:
                for part_start, part_length, depth in backing._allocation_depth(start, have):
                    _append_depth(out, part_start, part_length, depth + 1 if depth else 0)
            elif have:
                _append_depth(out, start, have, 2)
            if have < run:  # past a shorter backing file: its zeroes, as QEMU counts them
                _append_depth(out, start + have, run - have, 0 if backing is None else 2)
        return out


_CAPABILITIES_RO: Final = Capabilities(read_only=True, discard=False, fast_zero=False, cache=False)
_CAPABILITIES_V3: Final = Capabilities(read_only=False, discard=True, fast_zero=True, cache=False)
_CAPABILITIES_V2: Final = Capabilities(read_only=False, discard=True, fast_zero=False, cache=False)


def _slice(views: list[memoryview], skip: int, length: int) -> list[memoryview]:
    """``length`` bytes from byte ``skip`` of the buffers, as views (no copy)."""
    out: list[memoryview] = []
    for view in views:
        n = view.nbytes
        if skip >= n:
            skip -= n
            continue
        take = min(n - skip, length)
        out.append(view[skip : skip + take])
        length -= take
        skip = 0
        if not length:
            break
    return out


def _spans(indices: list[int]) -> Iterator[tuple[int, int]]:
    """Sorted indices as ``(first, last)`` runs of consecutive ones."""
    first = last = indices[0]
    for index in indices[1:]:
        if index != last + 1:
            yield first, last
            first = index
        last = index
    yield first, last


def _append(out: list[Extent], extent: Extent) -> None:
    if not extent.length:
        return
    if out:
        last = out[-1]
        if (
            last.hole == extent.hole
            and last.zero == extent.zero
            and last.offset + last.length == extent.offset
        ):
            out[-1] = Extent(last.offset, last.length + extent.length, last.hole, last.zero)
            return
    out.append(extent)


def _append_depth(out: list[tuple[int, int, int]], offset: int, length: int, depth: int) -> None:
    if out and out[-1][2] == depth and out[-1][0] + out[-1][1] == offset:
        out[-1] = (out[-1][0], out[-1][1] + length, depth)
    elif length:
        out.append((offset, length, depth))


@contextmanager
def _host_errors(path: Path) -> Iterator[None]:
    """A failure of the host file (EIO from the disk, EISDIR...) as a BlockError naming the image."""
    try:
        yield
    except BlockError:
        raise
    except OSError as failed:
        error = BlockError(failed.errno or errno.EIO, f"{path}: {failed.strerror or failed}")
        raise error from failed


def _open_backing(
    path: Path, name: str, backing_format: str, force_share: bool, l2_cache_bytes: int, chain: tuple[str, ...]
) -> FileNode | Qcow2Node:
    """The backing file ``name`` of the image at ``path``: relative to the image's directory."""
    if "://" in name or name.startswith("json:"):
        raise unsupported(path, f"backing file {name!r} is not a local file")
    target = Path(name) if os.path.isabs(name) else path.parent / name
    if target.is_dir():
        raise invalid(path, f"its backing file {target} is a directory")
    if not backing_format:
        raise unsupported(
            path,
            f"the backing file {name!r} has no recorded format, and vblk never guesses one; record it "
            f"with qemu-img rebase -u -b {name} -F raw|qcow2 {path}",
        )
    if os.path.realpath(target) in chain:
        raise invalid(path, f"its backing chain loops back to {target}")
    if len(chain) > MAX_CHAIN:
        raise unsupported(path, f"its backing chain is deeper than {MAX_CHAIN}")
    if backing_format == "qcow2":
        return Qcow2Node.open(target, force_share=force_share, l2_cache_bytes=l2_cache_bytes, _below=chain)
    if backing_format == "raw":
        try:
            return FileNode.open(target, read_only=True, create=False, force_share=force_share, any_size=True)
        except BlockError:
            raise
        except OSError as failed:
            where = failed.filename if failed.filename is not None else target
            raise BlockError(
                failed.errno or errno.EIO, f"{path}: backing file {where}: {failed.strerror or failed}"
            ) from failed
        except ValueError as bad:
            raise BlockError(errno.EINVAL, f"{path}: backing file {target}: {bad}") from bad
    raise unsupported(path, f"backing file {name!r} has format {backing_format!r} (vblk reads raw and qcow2)")


def _bitmap_directory(
    host: Host, header: Header, file_size: int
) -> tuple[list[BitmapEntry], list[array[int]], str]:
    """The bitmap directory and tables the header's extension points at, checked as QEMU checks
    them, or why they are damaged (then no entries)."""
    ext = header.bitmaps
    if header.bitmaps_damage or ext is None:
        return [], [], header.bitmaps_damage
    cluster_size = header.cluster_size
    try:
        raw = host.read(ext.directory_offset, ext.directory_size)
        entries = parse_directory(raw, ext.nb_bitmaps, header.size, cluster_size, file_size)
        tables: list[array[int]] = []
        for entry in entries:
            table = be64(host.read(entry.table_offset, entry.table_size * 8))
            for value in table:
                data = value & BMT_OFFSET_MASK
                if (
                    value & BMT_RESERVED_MASK
                    or (data and value & BMT_ALL_ONES)
                    or data % cluster_size
                    or data + cluster_size > file_size
                ):
                    raise ValueError(f"bitmap {entry.name!r} has a bad bitmap table entry ({value:#x})")
            tables.append(table)
    except ValueError as bad:
        return [], [], str(bad)
    return entries, tables, ""
