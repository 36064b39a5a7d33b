"""The qcow2 node: a qcow2 image (version 2 or 3), read-only, over the file node that holds it.

Block layer, a format node: it sits above a storage node (its ``inner``, a read-only
:class:`~device.block.file.FileNode` of the image file, which takes QEMU's image locks) and turns
the guest offsets it is asked for into the clusters the image's L1 and L2 tables point at, reading
metadata and data through that file node. Layers (``fault=``) go above it. Unallocated clusters
read from the backing file named in the header (raw or qcow2, itself a chain), or as zeroes.

What it reads: standard L2 entries (unallocated, normal, the v3 zero flag), compressed clusters
(zlib, and zstd when the ``zstandard`` module is importable), backing files whose format the image
records. What it refuses at open, with one sentence: encryption, an external data file, extended
L2 entries, unknown incompatible features, the corrupt bit, a backing file of unrecorded format,
a backing loop. Internal snapshots and bitmaps are ignored (the active L1 is what a guest sees).
An image marked dirty (lazy refcounts) opens: only its refcounts may be stale, and a reader never
looks at them (QEMU repairs only on a writable open). Every offset read from the image is checked
against the file's size and alignment before use: a bad one fails that request with EIO.
"""

from __future__ import annotations

import errno
import importlib
import os
import struct
import sys
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from device.block.file import FileNode
from device.block.node import BlockError, BlockingNode, BlockNode, Capabilities, Extent, check_access

MAGIC: Final = b"QFI\xfb"
EXT_END: Final = 0x00000000
EXT_BACKING_FORMAT: Final = 0xE2792ACA
EXT_FEATURE_NAMES: Final = 0x6803F857

INCOMPAT_DIRTY: Final = 1 << 0
INCOMPAT_CORRUPT: Final = 1 << 1
INCOMPAT_DATA_FILE: Final = 1 << 2
INCOMPAT_COMPRESSION: Final = 1 << 3
INCOMPAT_EXTL2: Final = 1 << 4
INCOMPAT_KNOWN: Final = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)

MIN_CLUSTER_BITS: Final = 9
MAX_CLUSTER_BITS: Final = 21
MAX_L1_BYTES: Final = 32 << 20  # QEMU's limit on the active L1 table
MAX_BACKING_NAME: Final = 1023
MAX_CHAIN: Final = 64  # backing files below one image

OFFSET_MASK: Final = 0x00FFFFFFFFFFFE00  # bits 9-55: a host offset in an L1 or standard L2 entry
L2_COMPRESSED: Final = 1 << 62
L2_ZERO: Final = 1 << 0

#: The L2 cache's default size in bytes of tables: 16 tables of a 64 KiB-cluster image, which
#: map 8 GiB of it.
DEFAULT_L2_CACHE: Final = 1 << 20

# Kinds of runs of guest bytes.
DATA: Final = 0  # a normal cluster: host bytes at ``host``
ZERO: Final = 1  # reads as zeroes (the zero flag)
UNALLOCATED: Final = 2  # not in this image: the backing file's, or zeroes
COMPRESSED: Final = 3  # one compressed cluster: ``host`` is its L2 entry

_HEADER_V2: Final = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_HEADER_V3: Final = struct.Struct(">QQQII")  # bytes 72..104
_U32_PAIR: Final = struct.Struct(">II")


def _zstd_module() -> Any:
    """The ``zstandard`` module for zstd-compressed clusters, or None when it is not installed."""
    try:
        return importlib.import_module("zstandard")
    except ImportError:
        return None


_zstd: Final[Any] = _zstd_module()


def _invalid(path: Path, why: str) -> BlockError:
    return BlockError(errno.EINVAL, f"{path}: not a usable qcow2 image: {why}")


def _unsupported(path: Path, why: str) -> BlockError:
    return BlockError(errno.ENOTSUP, f"{path}: {why}")


def _corrupt(path: Path, why: str) -> BlockError:
    return BlockError(errno.EIO, f"{path}: corrupt qcow2 metadata: {why}")


def _be64(data: bytes) -> array[int]:
    table = array("Q")
    table.frombytes(data)
    if sys.byteorder == "little":
        table.byteswap()
    return table


class Qcow2Node(BlockingNode):
    """A qcow2 image, read-only; ``open`` it (the constructor takes what ``open`` found)."""

    kind = "qcow2"

    def __init__(
        self,
        file: FileNode,
        *,
        version: int,
        cluster_bits: int,
        size: int,
        l1: array[int],
        compression: str,
        backing: FileNode | Qcow2Node | None,
        backing_name: str,
        backing_format: str,
        dirty: bool,
        l2_cache_bytes: int,
    ) -> None:
        super().__init__(size, True)
        self.path = file.path
        self._file = file
        self.version = version
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self._l2_bits = cluster_bits - 3
        self._l2_entries = 1 << self._l2_bits
        self._l1 = l1
        self.compression = compression
        self.backing = backing
        self.backing_name = backing_name
        self.backing_format = backing_format
        self.dirty = dirty
        self._cache_tables = max(1, l2_cache_bytes >> cluster_bits)
        self._l2_cache: OrderedDict[int, array[int]] = OrderedDict()
        self._lock = threading.Lock()
        # The last cluster decompressed: its L2 entry and bytes (sequential reads hit it).
        self._inflated: tuple[int, bytes] = (0, b"")
        # Compressed descriptor: bits 0..x-1 host byte offset, x..61 additional 512-byte sectors.
        self._csize_shift = 62 - (cluster_bits - 8)
        self._coffset_mask = (1 << self._csize_shift) - 1
        self._csize_mask = (1 << (cluster_bits - 8)) - 1
        self._closed = False

    # -- opening ------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        force_share: bool = False,
        l2_cache_bytes: int = DEFAULT_L2_CACHE,
        _below: tuple[str, ...] = (),
    ) -> Qcow2Node:
        """Open the qcow2 image at ``path`` read-only, with its backing chain.

        Raises :class:`BlockError` with one sentence when it cannot (missing, locked, not qcow2,
        a feature this node does not read).
        """
        path = Path(path)
        if l2_cache_bytes <= 0:
            raise ValueError("the L2 cache needs a positive size")
        try:
            file = FileNode.open(path, read_only=True, create=False, force_share=force_share, any_size=True)
        except BlockError:
            raise
        except OSError as failed:
            raise BlockError(failed.errno or errno.EIO, f"{path}: {failed.strerror or failed}") from failed
        except ValueError as bad:  # an empty file
            raise _invalid(path, str(bad)) from bad
        try:
            with _host_errors(path):
                return cls._open_file(file, force_share, l2_cache_bytes, (*_below, os.path.realpath(path)))
        except BaseException:
            file.close()
            raise

    @classmethod
    def _open_file(
        cls, file: FileNode, force_share: bool, l2_cache_bytes: int, chain: tuple[str, ...]
    ) -> Qcow2Node:
        path = file.path
        if file.size < _HEADER_V2.size:
            raise _invalid(path, f"{file.size} bytes is shorter than a qcow2 header")
        head = _read(file, 0, min(file.size, 1 << MAX_CLUSTER_BITS))
        (
            magic,
            version,
            backing_offset,
            backing_size,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_offset,
            _refcount_table_offset,
            _refcount_table_clusters,
            _nb_snapshots,
            _snapshots_offset,
        ) = _HEADER_V2.unpack_from(head, 0)
        if magic != MAGIC:
            raise _invalid(path, "no qcow2 magic (is it a raw image? then leave out format=qcow2)")
        if version not in (2, 3):
            raise _unsupported(path, f"qcow2 version {version} is not supported (2 and 3 are)")
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise _invalid(
                path, f"cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}"
            )
        cluster_size = 1 << cluster_bits
        incompatible = 0
        header_length = 72
        compression_type = 0
        if version == 3:
            if len(head) < 104:
                raise _invalid(path, "the v3 header is cut short")
            incompatible, _compatible, _autoclear, refcount_order, header_length = _HEADER_V3.unpack_from(
                head, 72
            )
            if header_length < 104 or header_length % 8 or header_length > cluster_size:
                raise _invalid(path, f"header_length {header_length} (want 104 or more, a multiple of 8)")
            if refcount_order > 6:
                raise _invalid(path, f"refcount_order {refcount_order} above 6")
            if header_length > len(head):
                raise _invalid(path, f"header_length {header_length} runs past the end of the file")
            if header_length > 104:
                compression_type = head[104]
        extensions = _extensions(path, head, header_length, backing_offset or cluster_size, cluster_size)
        if crypt_method != 0:
            raise _unsupported(path, "the image is encrypted; vblk does not read encrypted qcow2 images")
        unknown = incompatible & ~INCOMPAT_KNOWN
        if unknown:
            names = _feature_names(extensions.get(EXT_FEATURE_NAMES, b""))
            bits = [bit for bit in range(64) if unknown >> bit & 1]
            listed = ", ".join(f"{bit} ({names[bit]})" if bit in names else str(bit) for bit in bits)
            raise _unsupported(path, f"unknown incompatible qcow2 feature bits: {listed}")
        if incompatible & INCOMPAT_CORRUPT:
            raise _unsupported(
                path, "the image is marked corrupt; check and repair it first (qemu-img check -r all)"
            )
        if incompatible & INCOMPAT_DATA_FILE:
            raise _unsupported(
                path, "the image keeps its data in an external data file, which vblk does not read"
            )
        if incompatible & INCOMPAT_EXTL2:
            raise _unsupported(
                path, "the image has extended L2 entries (subclusters), which vblk does not read yet"
            )
        if incompatible & INCOMPAT_COMPRESSION:
            if compression_type == 0:
                raise _invalid(path, "the compression type bit is set but the type is zlib")
        elif compression_type != 0:
            raise _invalid(path, f"compression type {compression_type} without its incompatible bit")
        if compression_type == 0:
            compression = "zlib"
        elif compression_type == 1:
            compression = "zstd"
            if _zstd is None:
                raise _unsupported(
                    path,
                    "the image's clusters are zstd-compressed and the zstandard module is not "
                    "installed (pip install zstandard, or convert the image: qemu-img convert "
                    "-O qcow2 -o compression_type=zlib)",
                )
        else:
            raise _unsupported(path, f"unknown compression type {compression_type}")
        if size % 512:
            raise _unsupported(path, f"virtual size {size} is not a multiple of 512")
        l2_entries = cluster_size >> 3
        covered = cluster_size * l2_entries  # bytes one L1 entry maps
        needed = -(-size // covered)
        if needed * 8 > MAX_L1_BYTES:
            raise _invalid(path, f"virtual size {size} needs an L1 table over {MAX_L1_BYTES} bytes")
        if l1_size < needed:
            raise _invalid(path, f"l1_size {l1_size} is too small for virtual size {size} (needs {needed})")
        if l1_size * 8 > MAX_L1_BYTES:
            raise _invalid(path, f"l1_size {l1_size} is over QEMU's limit of {MAX_L1_BYTES // 8}")
        if needed and (l1_offset % cluster_size or l1_offset == 0 or l1_offset + needed * 8 > file.size):
            raise _invalid(path, f"the L1 table's offset {l1_offset:#x} is unaligned or outside the file")
        l1 = _be64(_read(file, l1_offset, needed * 8)) if needed else array("Q")
        backing: FileNode | Qcow2Node | None = None
        name = ""
        backing_format = ""
        if backing_offset:
            if backing_size == 0 or backing_size > MAX_BACKING_NAME:
                raise _invalid(path, f"backing file name of {backing_size} bytes (1..{MAX_BACKING_NAME})")
            if backing_offset + backing_size > min(cluster_size, file.size):
                raise _invalid(path, "the backing file name lies outside the first cluster")
            raw_name = head[backing_offset : backing_offset + backing_size]
            if b"\0" in raw_name:
                raise _invalid(path, "the backing file name holds a NUL byte")
            name = os.fsdecode(raw_name)
            backing_format = extensions.get(EXT_BACKING_FORMAT, b"").decode("ascii", "replace")
            backing = _open_backing(path, name, backing_format, force_share, l2_cache_bytes, chain)
        try:
            return cls(
                file,
                version=version,
                cluster_bits=cluster_bits,
                size=size,
                l1=l1,
                compression=compression,
                backing=backing,
                backing_name=name,
                backing_format=backing_format,
                dirty=bool(incompatible & INCOMPAT_DIRTY),
                l2_cache_bytes=l2_cache_bytes,
            )
        except BaseException:
            if backing is not None:
                backing.close()
            raise

    # -- the node -----------------------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        return _CAPABILITIES

    @property
    def inner(self) -> BlockNode:
        return self._file

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
            "size": self._size,
            "read_only": True,
            "compression": self.compression,
            "dirty": self.dirty,
            "backing": chain,
        }

    def read_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        total = sum(b.nbytes for b in buffers)
        check_access(self.path, self._size, True, offset, total, False)
        with _host_errors(self.path):
            for buffer in buffers:
                view = buffer if buffer.format == "B" and buffer.ndim == 1 else buffer.cast("B")
                self._read_into(offset, view)
                offset += view.nbytes

    def write_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        raise self._not_writable()

    def zero_now(self, offset: int, length: int, may_unmap: bool) -> None:
        raise self._not_writable()  # BlockingNode's discard_now comes here too

    def _not_writable(self) -> BlockError:
        return BlockError(errno.EROFS, f"{self.path} is read-only (writing qcow2 is not supported yet)")

    def resize(self, new_size: int) -> None:
        raise BlockError(errno.EROFS, f"{self.path} is read-only")

    def advise_willneed(self, offset: int, length: int) -> None:
        """Nothing: the image's clusters are not where the guest's bytes are."""

    def close(self) -> None:
        if self._closed:
            return
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
            table_end = min(end, (l1_index + 1) << (self._l2_bits + bits))
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
                raise _corrupt(self.path, f"a zero cluster in a version 2 image (guest offset {pos:#x})")
            return ZERO, 0
        host = entry & OFFSET_MASK
        if host == 0:
            return UNALLOCATED, 0
        if host & (self.cluster_size - 1):
            raise _corrupt(self.path, f"data cluster offset {host:#x} unaligned (guest offset {pos:#x})")
        if host >= self._file.size:
            raise _corrupt(self.path, f"data cluster offset {host:#x} past the end of the file")
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
            raise _corrupt(self.path, f"L2 table offset {l2_offset:#x} unaligned (L1 index {l1_index})")
        if l2_offset + self.cluster_size > self._file.size:
            raise _corrupt(self.path, f"L2 table offset {l2_offset:#x} past the end of the file")
        table = _be64(_read(self._file, l2_offset, self.cluster_size))
        with self._lock:
            self._l2_cache[l2_offset] = table
            self._l2_cache.move_to_end(l2_offset)
            while len(self._l2_cache) > self._cache_tables:
                self._l2_cache.popitem(last=False)
        return table

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
                if host + length > self._file.size:
                    raise _corrupt(self.path, f"data at {host:#x}+{length} runs past the end of the file")
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
        file_size = self._file.size
        if host == 0 or host >= file_size:
            raise _corrupt(self.path, f"compressed cluster at {host:#x} outside the file")
        length = min(length, file_size - host)  # the last one may end mid-sector, at the file's end
        compressed = _read(self._file, host, length)
        cluster = self._decompress(compressed)
        if len(cluster) != self.cluster_size:
            raise _corrupt(self.path, f"the compressed cluster at {host:#x} does not inflate to a cluster")
        self._inflated = (entry, cluster)
        return cluster

    def _decompress(self, compressed: bytes) -> bytes:
        try:
            if self.compression == "zlib":
                return zlib.decompressobj(-12).decompress(compressed, self.cluster_size)
            return self._unzstd(compressed)
        except zlib.error as bad:
            raise _corrupt(self.path, f"a compressed cluster does not inflate: {bad}") from bad
        except Exception as bad:  # zstandard.ZstdError and its kin
            raise _corrupt(self.path, f"a compressed cluster does not inflate: {bad}") from bad

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

    # -- the allocation map ---------------------------------------------------------------------------

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Data (allocated here or in a backing file), zero clusters (zero, not data) and holes.

        As ``qemu-img map`` tells them: a data cluster over a hole of the host file reads as
        zeroes (data and zero), a hole with no backing file is hole and zero.
        """
        check_access(self.path, self._size, True, offset, length, False)
        with _host_errors(self.path):
            return self._extents(offset, length)

    def _extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for start, run, kind, host in self.runs(offset, length):
            if kind == DATA:
                for part in self._host_extents(host, run):
                    _append(out, Extent(start + part.offset - host, part.length, False, part.zero))
            elif kind == COMPRESSED:
                _append(out, Extent(start, run, False, False))
            elif kind == ZERO:
                _append(out, Extent(start, run, True, True))
            else:
                for part in self._backing_extents(start, run):
                    _append(out, part)
        return out

    def _host_extents(self, host: int, length: int) -> list[Extent]:
        """The host file's map of a data run: its holes read as zeroes (still data here)."""
        inside = max(0, min(length, self._file.size - host))
        parts = self._file.extents(host, inside) if inside else []
        if inside < length:
            parts.append(Extent(host + inside, length - inside, True, True))
        return parts

    def _backing_extents(self, offset: int, length: int) -> list[Extent]:
        backing = self.backing
        have = 0 if backing is None else max(0, min(length, backing.size - offset))
        parts = backing.extents(offset, have) if backing is not None and have else []
        if have < length:
            parts.append(Extent(offset + have, length - have, True, True))
        return parts

    def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """``(offset, length, depth)`` runs: 0 allocated nowhere in the chain, 1 in this image
        (zero clusters too), 2 and more in the backing chain (a raw file: all of it, up to its
        end), as QEMU's ``qemu:allocation-depth`` counts."""
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
            if have < run:
                _append_depth(out, start + have, run - have, 0)
        return out


_CAPABILITIES: Final = Capabilities(read_only=True, discard=False, fast_zero=False, cache=False)


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


def _read(file: FileNode, offset: int, length: int) -> bytes:
    """``length`` bytes of the host file at ``offset``, which must lie inside it (else EIO)."""
    if offset < 0 or length < 0 or offset + length > file.size:
        raise _corrupt(file.path, f"metadata at {offset:#x}+{length} outside the file ({file.size} bytes)")
    data = bytearray(length)
    if length:
        file.read_now(offset, [memoryview(data)])
    return bytes(data)


def _extensions(path: Path, head: bytes, start: int, end: int, cluster_size: int) -> dict[int, bytes]:
    """The header extensions between the header and ``end`` (the backing name, or cluster 1)."""
    found: dict[int, bytes] = {}
    end = min(end, cluster_size, len(head))
    pos = start
    while pos + 8 <= end:
        kind, length = _U32_PAIR.unpack_from(head, pos)
        pos += 8
        if kind == EXT_END:
            break
        if pos + length > end:
            raise _invalid(path, f"header extension {kind:#x} runs past the first cluster")
        if kind in found:
            raise _invalid(path, f"header extension {kind:#x} appears twice")
        found[kind] = head[pos : pos + length]
        pos += (length + 7) & ~7
    return found


def _feature_names(table: bytes) -> dict[int, str]:
    """Incompatible features' names from the feature name table, by bit."""
    names: dict[int, str] = {}
    for pos in range(0, len(table) - 47, 48):
        if table[pos] == 0:
            names[table[pos + 1]] = table[pos + 2 : pos + 48].split(b"\0", 1)[0].decode("ascii", "replace")
    return names


def _open_backing(
    path: Path, name: str, backing_format: str, force_share: bool, l2_cache_bytes: int, chain: tuple[str, ...]
) -> FileNode | Qcow2Node:
    """The backing file ``name`` of the image at ``path``: relative to the image's directory."""
    if "://" in name or name.startswith("json:"):
        raise _unsupported(path, f"backing file {name!r} is not a local file")
    target = Path(name) if os.path.isabs(name) else path.parent / name
    if target.is_dir():
        raise _invalid(path, f"its backing file {target} is a directory")
    if not backing_format:
        raise _unsupported(
            path,
            f"the backing file {name!r} has no recorded format, and vblk never guesses one; record it "
            f"with qemu-img rebase -u -b {name} -F raw|qcow2 {path}",
        )
    if os.path.realpath(target) in chain:
        raise _invalid(path, f"its backing chain loops back to {target}")
    if len(chain) > MAX_CHAIN:
        raise _unsupported(path, f"its backing chain is deeper than {MAX_CHAIN}")
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
    raise _unsupported(
        path, f"backing file {name!r} has format {backing_format!r} (vblk reads raw and qcow2)"
    )
