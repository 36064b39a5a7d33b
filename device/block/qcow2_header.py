"""The qcow2 header: parsed and checked at open, and written whole when vblk creates an image.

Block layer, under :mod:`device.block.qcow2` (which opens images with :func:`parse_header` and
``vblk create-image`` writes new ones with :func:`create_image`). The layout is QEMU's
``docs/interop/qcow2.txt``: a big-endian header (72 bytes in version 2, ``header_length`` in
version 3), header extensions up to the backing file's name, all in cluster 0. Every field that
decides where the node reads or writes is checked here against the file, with one sentence
when it is wrong: EINVAL for an image that is not usable qcow2, ENOTSUP for a feature vblk does
not implement.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Final

from device.block.node import BlockError

MAGIC: Final = b"QFI\xfb"
EXT_END: Final = 0x00000000
EXT_BACKING_FORMAT: Final = 0xE2792ACA
EXT_FEATURE_NAMES: Final = 0x6803F857
EXT_BITMAPS: Final = 0x23852875

INCOMPAT_DIRTY: Final = 1 << 0
INCOMPAT_CORRUPT: Final = 1 << 1
INCOMPAT_DATA_FILE: Final = 1 << 2
INCOMPAT_COMPRESSION: Final = 1 << 3
INCOMPAT_EXTL2: Final = 1 << 4
INCOMPAT_KNOWN: Final = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
COMPAT_LAZY_REFCOUNTS: Final = 1 << 0
AUTOCLEAR_BITMAPS: Final = 1 << 0

MIN_CLUSTER_BITS: Final = 9
MAX_CLUSTER_BITS: Final = 21
DEFAULT_CLUSTER_BITS: Final = 16
MAX_L1_BYTES: Final = 32 << 20  # QEMU's limit on the active L1 table
MAX_REFTABLE_BYTES: Final = 8 << 20  # and on the refcount table
MAX_BACKING_NAME: Final = 1023
HEADER_V3_LENGTH: Final = 112  # as QEMU 7.2 writes it: through compression_type and padding

_HEADER_V2: Final = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_HEADER_V3: Final = struct.Struct(">QQQII")  # bytes 72..104
_U32_PAIR: Final = struct.Struct(">II")
_BITMAPS_EXT: Final = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, offset
_DIR_ENTRY: Final = struct.Struct(">QIIBBHI")  # a bitmap directory entry's fixed 24 bytes

# The bitmaps extension and its directory (QEMU's limits, block/qcow2-bitmap.c).
MAX_BITMAPS: Final = 65535
MAX_BITMAP_DIRECTORY: Final = 1024 * MAX_BITMAPS
MAX_BITMAP_TABLE: Final = 0x8000000  # entries
MAX_BITMAP_BYTES: Final = 0x20000000  # one bitmap's table clusters, in bytes
MIN_GRANULARITY_BITS: Final = 9
MAX_GRANULARITY_BITS: Final = 31
MAX_BITMAP_NAME: Final = 1023
BME_IN_USE: Final = 1 << 0
BME_AUTO: Final = 1 << 1
BME_EXTRA_DATA_COMPATIBLE: Final = 1 << 2
BME_RESERVED: Final = ~(BME_IN_USE | BME_AUTO | BME_EXTRA_DATA_COMPATIBLE) & 0xFFFFFFFF
BITMAP_TYPE_DIRTY: Final = 1
#: A bitmap table entry: bits 9-55 the data cluster; with none, bit 0 says all ones.
BMT_OFFSET_MASK: Final = 0x00FFFFFFFFFFFE00
BMT_RESERVED_MASK: Final = 0xFF000000000001FE
BMT_ALL_ONES: Final = 1 << 0

#: The feature name table QEMU writes (type 0 incompatible, 1 compatible, 2 autoclear).
FEATURE_NAMES: Final = (
    (0, 0, b"dirty bit"),
    (0, 1, b"corrupt bit"),
    (0, 2, b"external data file"),
    (0, 3, b"compression type"),
    (0, 4, b"extended L2 entries"),
    (1, 0, b"lazy refcounts"),
    (2, 0, b"bitmaps"),
    (2, 1, b"raw external data"),
)


def invalid(path: Path, why: str) -> BlockError:
    return BlockError(errno.EINVAL, f"{path}: not a usable qcow2 image: {why}")


def unsupported(path: Path, why: str) -> BlockError:
    return BlockError(errno.ENOTSUP, f"{path}: {why}")


@dataclasses.dataclass(frozen=True, slots=True)
class BitmapsExtension:
    """The bitmaps extension's fields: how many bitmaps, where their directory is."""

    nb_bitmaps: int
    directory_size: int
    directory_offset: int


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    """What an image's cluster 0 says (the fields vblk uses), checked."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    incompatible: int
    compatible: int
    autoclear: int
    refcount_order: int
    header_length: int
    compression: str  # zlib or zstd
    backing_name: str
    backing_format: str
    feature_names: dict[int, str]
    #: Where the backing file name lies in cluster 0 (0: none), and its bytes.
    backing_offset: int = 0
    backing_raw: bytes = b""
    #: Every header extension, in the order found (type, data); kept when cluster 0 is rewritten.
    extensions: tuple[tuple[int, bytes], ...] = ()
    #: The bitmaps extension, when autoclear bit 0 vouches for it (else None).
    bitmaps: BitmapsExtension | None = None
    #: A bitmaps extension the autoclear bit no longer vouches for (a writer drops it).
    bitmaps_stale: bool = False
    #: Why the bitmaps extension is unusable ("" when it is fine, or absent).
    bitmaps_damage: str = ""
    #: Where the internal snapshot table starts (``nb_snapshots`` entries).
    snapshots_offset: int = 0

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def l1_needed(self, size: int | None = None) -> int:
        """L1 entries that map ``size`` bytes (the virtual size by default)."""
        covered = 1 << (2 * self.cluster_bits - 3)  # bytes one L2 table maps
        return -(-(self.size if size is None else size) // covered)


def parse_header(path: Path, head: bytes, file_size: int, zstd: bool) -> Header:
    """Parse and check ``head`` (the file's first bytes, up to one largest cluster).

    ``zstd``: whether zstd-compressed clusters can be read here.
    """
    if len(head) < _HEADER_V2.size:
        raise invalid(path, f"{file_size} bytes is shorter than a qcow2 header")
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
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _HEADER_V2.unpack_from(head, 0)
    if magic != MAGIC:
        raise invalid(path, "no qcow2 magic (is it a raw image? then leave out format=qcow2)")
    if version not in (2, 3):
        raise unsupported(path, f"qcow2 version {version} is not supported (2 and 3 are)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise invalid(path, f"cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
    cluster_size = 1 << cluster_bits
    incompatible = compatible = autoclear = 0
    refcount_order = 4
    header_length = 72
    compression_type = 0
    if version == 3:
        if len(head) < 104:
            raise invalid(path, "the v3 header is cut short")
        incompatible, compatible, autoclear, refcount_order, header_length = _HEADER_V3.unpack_from(head, 72)
        if header_length < 104 or header_length % 8 or header_length > cluster_size:
            raise invalid(path, f"header_length {header_length} (want 104 or more, a multiple of 8)")
        if refcount_order > 6:
            raise invalid(path, f"refcount_order {refcount_order} above 6")
        if header_length > len(head):
            raise invalid(path, f"header_length {header_length} runs past the end of the file")
        if header_length > 104:
            compression_type = head[104]
    found = _extensions(path, head, header_length, backing_offset or cluster_size, cluster_size)
    extensions = dict(found)
    names = _feature_names(extensions.get(EXT_FEATURE_NAMES, b""))
    if crypt_method != 0:
        raise unsupported(path, "the image is encrypted; vblk does not read encrypted qcow2 images")
    unknown = incompatible & ~INCOMPAT_KNOWN
    if unknown:
        bits = [bit for bit in range(64) if unknown >> bit & 1]
        listed = ", ".join(f"{bit} ({names[bit]})" if bit in names else str(bit) for bit in bits)
        raise unsupported(path, f"unknown incompatible qcow2 feature bits: {listed}")
    if incompatible & INCOMPAT_CORRUPT:
        raise unsupported(
            path, "the image is marked corrupt; check and repair it first (qemu-img check -r all)"
        )
    if incompatible & INCOMPAT_DATA_FILE:
        raise unsupported(path, "the image keeps its data in an external data file, which vblk does not read")
    if incompatible & INCOMPAT_EXTL2:
        raise unsupported(
            path, "the image has extended L2 entries (subclusters), which vblk does not read yet"
        )
    if incompatible & INCOMPAT_COMPRESSION:
        if compression_type == 0:
            raise invalid(path, "the compression type bit is set but the type is zlib")
    elif compression_type != 0:
        raise invalid(path, f"compression type {compression_type} without its incompatible bit")
    if compression_type == 0:
        compression = "zlib"
    elif compression_type == 1:
        compression = "zstd"
        if not zstd:
            raise unsupported(
                path,
                "the image's clusters are zstd-compressed and the zstandard module is not "
                "installed (pip install zstandard, or convert the image: qemu-img convert "
                "-O qcow2 -o compression_type=zlib)",
            )
    else:
        raise unsupported(path, f"unknown compression type {compression_type}")
    if size % 512:
        raise unsupported(path, f"virtual size {size} is not a multiple of 512")
    covered = cluster_size * (cluster_size >> 3)  # bytes one L1 entry maps
    needed = -(-size // covered)
    if needed * 8 > MAX_L1_BYTES:
        raise invalid(path, f"virtual size {size} needs an L1 table over {MAX_L1_BYTES} bytes")
    if l1_size < needed:
        raise invalid(path, f"l1_size {l1_size} is too small for virtual size {size} (needs {needed})")
    if l1_size * 8 > MAX_L1_BYTES:
        raise invalid(path, f"l1_size {l1_size} is over QEMU's limit of {MAX_L1_BYTES // 8}")
    if needed and (l1_offset % cluster_size or l1_offset == 0 or l1_offset + needed * 8 > file_size):
        raise invalid(path, f"the L1 table's offset {l1_offset:#x} is unaligned or outside the file")
    bitmaps: BitmapsExtension | None = None
    damage = ""
    raw_bitmaps = extensions.get(EXT_BITMAPS)
    stale = raw_bitmaps is not None and not autoclear & AUTOCLEAR_BITMAPS
    if raw_bitmaps is not None and not stale:
        bitmaps, damage = _bitmaps_extension(raw_bitmaps, cluster_size, file_size)
    name = ""
    raw_name = b""
    backing_format = ""
    if backing_offset:
        if backing_size == 0 or backing_size > MAX_BACKING_NAME:
            raise invalid(path, f"backing file name of {backing_size} bytes (1..{MAX_BACKING_NAME})")
        if backing_offset + backing_size > min(cluster_size, file_size):
            raise invalid(path, "the backing file name lies outside the first cluster")
        raw_name = head[backing_offset : backing_offset + backing_size]
        if b"\0" in raw_name:
            raise invalid(path, "the backing file name holds a NUL byte")
        name = os.fsdecode(raw_name)
        backing_format = extensions.get(EXT_BACKING_FORMAT, b"").decode("ascii", "replace")
    return Header(
        version=version,
        cluster_bits=cluster_bits,
        size=size,
        l1_size=l1_size,
        l1_offset=l1_offset,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        incompatible=incompatible,
        compatible=compatible,
        autoclear=autoclear,
        refcount_order=refcount_order,
        header_length=header_length,
        compression=compression,
        backing_name=name,
        backing_format=backing_format,
        feature_names=names,
        backing_offset=backing_offset,
        backing_raw=raw_name,
        extensions=tuple(found),
        bitmaps=bitmaps,
        bitmaps_stale=stale,
        bitmaps_damage=damage,
    )


def _bitmaps_extension(raw: bytes, cluster_size: int, file_size: int) -> tuple[BitmapsExtension | None, str]:
    """The bitmaps extension checked as QEMU checks it, or why it is damaged."""
    if len(raw) != _BITMAPS_EXT.size:
        return None, f"the bitmaps extension is {len(raw)} bytes, not {_BITMAPS_EXT.size}"
    nb_bitmaps, reserved, size, offset = _BITMAPS_EXT.unpack(raw)
    if reserved:
        return None, "the bitmaps extension's reserved field is not zero"
    if nb_bitmaps == 0 or nb_bitmaps > MAX_BITMAPS:
        return None, f"the bitmaps extension counts {nb_bitmaps} bitmaps (1..{MAX_BITMAPS})"
    if size == 0 or size > MAX_BITMAP_DIRECTORY:
        return None, f"a bitmap directory of {size} bytes (1..{MAX_BITMAP_DIRECTORY})"
    if offset == 0 or offset % cluster_size or offset + size > file_size:
        return None, f"the bitmap directory at {offset:#x} is unaligned or outside the file"
    return BitmapsExtension(nb_bitmaps, size, offset), ""


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """One internal snapshot (an entry of the snapshot table), as ``qemu-img snapshot -l`` lists it."""

    id: str
    name: str
    l1_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int  # the virtual size when it was taken (the image's, for v2 entries without it)

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "date_sec": self.date_sec,
            "date_nsec": self.date_nsec,
            "vm_clock_nsec": self.vm_clock_nsec,
            "vm_state_size": self.vm_state_size,
            "disk_size": self.disk_size,
        }


_SNAPSHOT_ENTRY: Final = struct.Struct(">QIHHIIQII")  # 40 bytes
MAX_SNAPSHOTS: Final = 65536  # QEMU's QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOT_EXTRA: Final = 1024  # QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_SNAPSHOT_TABLE: Final = 64 << 20  # QEMU's QCOW_MAX_SNAPSHOTS_SIZE


def parse_snapshots(
    path: Path, header: Header, read: Callable[[int, int], bytes], file_size: int
) -> list[Snapshot]:
    """The internal snapshot table, each entry checked as QEMU checks it (``read(offset, length)``
    reads the image file)."""
    count = header.nb_snapshots
    if not count:
        return []
    if count > MAX_SNAPSHOTS:
        raise invalid(path, f"{count} internal snapshots (at most {MAX_SNAPSHOTS})")
    offset = header.snapshots_offset
    cluster_size = header.cluster_size
    if offset % cluster_size or offset == 0 or offset >= file_size:
        raise invalid(path, f"the snapshot table at {offset} is not a cluster inside the file")
    out: list[Snapshot] = []
    position = offset
    for _ in range(count):
        if (
            position - offset + _SNAPSHOT_ENTRY.size > MAX_SNAPSHOT_TABLE
            or position + _SNAPSHOT_ENTRY.size > file_size
        ):
            raise invalid(path, "the snapshot table runs past the end of the file")
        fixed = read(position, _SNAPSHOT_ENTRY.size)
        l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state, extra_len = (
            _SNAPSHOT_ENTRY.unpack(fixed)
        )
        if extra_len > MAX_SNAPSHOT_EXTRA:
            raise invalid(
                path, f"a snapshot's extra data of {extra_len} bytes (at most {MAX_SNAPSHOT_EXTRA})"
            )
        rest_len = extra_len + id_len + name_len
        if position + _SNAPSHOT_ENTRY.size + rest_len > file_size:
            raise invalid(path, "the snapshot table runs past the end of the file")
        rest = read(position + _SNAPSHOT_ENTRY.size, rest_len)
        extra = rest[:extra_len]
        disk_size = header.size
        if len(extra) >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        if len(extra) >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        elif header.version >= 3:
            raise invalid(path, "a version 3 snapshot entry without its disk size (extra data up to byte 55)")
        if l1_offset % cluster_size or l1_size > (1 << 28) or l1_offset + l1_size * 8 > file_size:
            raise invalid(path, f"snapshot L1 table at {l1_offset} ({l1_size} entries) is outside the file")
        covered = 1 << (2 * header.cluster_bits - 3)
        if disk_size % 512 or l1_size * covered < disk_size:
            raise invalid(path, f"a snapshot of {disk_size} bytes that its {l1_size} L1 entries do not map")
        ident = rest[extra_len : extra_len + id_len].decode("utf-8", "replace")
        name = rest[extra_len + id_len :].decode("utf-8", "replace")
        out.append(
            Snapshot(ident, name, l1_offset, l1_size, date_sec, date_nsec, vm_clock, vm_state, disk_size)
        )
        position += _SNAPSHOT_ENTRY.size + rest_len
        position += -position % 8
    return out


def find_snapshot(path: Path, snapshots: list[Snapshot], wanted: str) -> Snapshot:
    """A snapshot by id or by name, as ``qemu-nbd -l`` finds one (an id first)."""
    for snapshot in snapshots:
        if snapshot.id == wanted:
            return snapshot
    for snapshot in snapshots:
        if snapshot.name == wanted:
            return snapshot
    known = ", ".join(s.name or s.id for s in snapshots) or "none"
    raise BlockError(errno.ENOENT, f"{path} has no internal snapshot {wanted!r} (it has: {known})")


def writable_refusal(header: Header) -> str | None:
    """Why vblk must not write this image (it is then served read-only or refused), or None."""
    if header.incompatible & INCOMPAT_DIRTY:
        return (
            "its refcounts may be stale (the dirty bit of lazy refcounts is set: it was not closed "
            "cleanly); repair it first with qemu-img check -r all, or serve it read-only"
        )
    if header.nb_snapshots:
        return (
            f"it has {header.nb_snapshots} internal snapshot(s), whose clusters vblk does not "
            "share when writing; serve it read-only, or delete them (qemu-img snapshot -d)"
        )
    if header.refcount_table_clusters * header.cluster_size > MAX_REFTABLE_BYTES:
        return f"its refcount table of {header.refcount_table_clusters} clusters is over QEMU's limit"
    return None


def _extensions(path: Path, head: bytes, start: int, end: int, cluster_size: int) -> list[tuple[int, bytes]]:
    """The header extensions between the header and ``end`` (the backing name, or cluster 1)."""
    found: list[tuple[int, bytes]] = []
    kinds: set[int] = set()
    end = min(end, cluster_size, len(head))
    pos = start
    while pos + 8 <= end:
        kind, length = _U32_PAIR.unpack_from(head, pos)
        pos += 8
        if kind == EXT_END:
            break
        if pos + length > end:
            raise invalid(path, f"header extension {kind:#x} runs past the first cluster")
        if kind in kinds:
            raise invalid(path, f"header extension {kind:#x} appears twice")
        kinds.add(kind)
        found.append((kind, head[pos : pos + length]))
        pos += (length + 7) & ~7
    return found


def _feature_names(table: bytes) -> dict[int, str]:
    """Incompatible features' names from the feature name table, by bit."""
    names: dict[int, str] = {}
    for pos in range(0, len(table) - 47, 48):
        if table[pos] == 0:
            names[table[pos + 1]] = table[pos + 2 : pos + 48].split(b"\0", 1)[0].decode("ascii", "replace")
    return names


# -- creating an image ------------------------------------------------------------------------------


def create_image(
    path: str | os.PathLike[str],
    size: int,
    *,
    cluster_size: int = 1 << DEFAULT_CLUSTER_BITS,
    backing: str | None = None,
    backing_format: str | None = None,
    version: int = 3,
) -> None:
    """Write a new, empty qcow2 image at ``path`` (which must not exist), laid out as QEMU lays
    out its own: cluster 0 the header, then the refcount table, its blocks and the L1 table.

    ``backing`` is stored as given (a relative name resolves against the image's directory);
    its format must be named (``raw`` or ``qcow2``): vblk never guesses one.
    """
    path = Path(path)
    if size <= 0 or size % 512:
        raise ValueError(f"virtual size {size} is not a positive multiple of 512")
    if (
        cluster_size & (cluster_size - 1)
        or not 1 << MIN_CLUSTER_BITS <= cluster_size <= 1 << MAX_CLUSTER_BITS
    ):
        raise ValueError(f"cluster size {cluster_size} is not a power of two from 512 to 2M")
    if version not in (2, 3):
        raise ValueError(f"qcow2 version {version} (2 or 3)")
    if (backing is None) != (backing_format is None):
        raise ValueError("a backing file needs its format named (--backing-format raw|qcow2), and only it")
    if backing_format is not None and backing_format not in ("raw", "qcow2"):
        raise ValueError(f"backing format {backing_format!r} (raw or qcow2)")
    bits = cluster_size.bit_length() - 1
    covered = cluster_size * (cluster_size >> 3)
    l1_size = -(-size // covered)
    if l1_size * 8 > MAX_L1_BYTES:
        raise ValueError(f"virtual size {size} needs an L1 table over {MAX_L1_BYTES} bytes")
    head = _header_cluster(bits, size, l1_size, backing, backing_format, version)
    # Clusters: header, refcount table (T), refcount blocks (B), L1 (L): all counted once.
    per_block = cluster_size * 8 // 16
    l1_clusters = max(1, -(-l1_size * 8 // cluster_size))
    table_clusters, blocks = 1, 1
    while True:
        total = 1 + table_clusters + blocks + l1_clusters
        want_blocks = -(-total // per_block)
        want_table = max(1, -(-want_blocks * 8 // cluster_size))
        if (want_blocks, want_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = max(blocks, want_blocks), max(table_clusters, want_table)
    table_offset = cluster_size
    blocks_at = table_offset + table_clusters * cluster_size
    l1_offset = blocks_at + blocks * cluster_size
    header = bytearray(head)
    struct.pack_into(">IQQI", header, 36, l1_size, l1_offset, table_offset, table_clusters)
    table = bytearray(table_clusters * cluster_size)
    for n in range(blocks):
        struct.pack_into(">Q", table, n * 8, blocks_at + n * cluster_size)
    counts = bytearray(blocks * cluster_size)
    for cluster in range(total):
        struct.pack_into(">H", counts, cluster * 2, 1)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, bytes(header), 0)
        os.pwrite(fd, bytes(table), table_offset)
        os.pwrite(fd, bytes(counts), blocks_at)
        os.ftruncate(fd, l1_offset + l1_clusters * cluster_size)  # the L1 table: zeroes
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def _header_cluster(
    bits: int, size: int, l1_size: int, backing: str | None, backing_format: str | None, version: int
) -> bytes:
    cluster_size = 1 << bits
    length = HEADER_V3_LENGTH if version == 3 else 72
    extensions = bytearray()
    if backing_format is not None:
        extensions += _extension(EXT_BACKING_FORMAT, backing_format.encode())
    if version == 3:
        table = b"".join(struct.pack(">BB46s", kind, bit, name) for kind, bit, name in FEATURE_NAMES)
        names = _extension(EXT_FEATURE_NAMES, table)
        name_bytes = len(os.fsencode(backing)) if backing is not None else 0
        if length + len(extensions) + len(names) + 8 + name_bytes <= cluster_size:
            extensions += names  # as QEMU, only where it fits
    extensions += struct.pack(">II", EXT_END, 0)
    backing_offset = backing_size = 0
    out = bytearray(length)
    out += extensions
    if backing is not None:
        raw = os.fsencode(backing)
        if not raw or len(raw) > MAX_BACKING_NAME or b"\0" in raw:
            raise ValueError(f"backing file name {backing!r} (1 to {MAX_BACKING_NAME} bytes, no NUL)")
        backing_offset, backing_size = len(out), len(raw)
        out += raw
    if len(out) > cluster_size:
        raise ValueError(f"the header and the backing file name do not fit in a {cluster_size}-byte cluster")
    struct.pack_into(">4sIQIIQI", out, 0, MAGIC, version, backing_offset, backing_size, bits, size, 0)
    if version == 3:
        struct.pack_into(">QQQII", out, 72, 0, 0, 0, 4, length)
    return bytes(out)


def _extension(kind: int, data: bytes) -> bytes:
    padded = data + bytes(-len(data) % 8)
    return struct.pack(">II", kind, len(data)) + padded


# -- the bitmap directory ---------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class BitmapEntry:
    """One bitmap directory entry (``docs/interop/qcow2.txt``, "Bitmap directory")."""

    name: str
    table_offset: int
    table_size: int  # entries
    flags: int
    granularity_bits: int
    extra_data: bytes = b""


def bitmap_name_bytes(name: str) -> bytes:
    """A bitmap name as the directory stores it (bytes a name was read from come back as they were)."""
    return name.encode("utf-8", "surrogateescape")


def table_entries(size: int, granularity_bits: int, cluster_size: int) -> int:
    """The bitmap table entries a bitmap of ``1 << granularity_bits`` over ``size`` bytes needs."""
    data = bitmap_data_bytes(size, granularity_bits)
    return -(-data // cluster_size)


def bitmap_data_bytes(size: int, granularity_bits: int) -> int:
    """The bytes of a bitmap's data: one bit per granule of the disk, rounded up to a byte."""
    bits = -(-size >> granularity_bits)
    return -(-bits // 8)


def parse_directory(
    raw: bytes, nb_bitmaps: int, size: int, cluster_size: int, file_size: int
) -> list[BitmapEntry]:
    """The entries of a bitmap directory, checked as QEMU checks them; ValueError (one sentence)
    when it is damaged. ``size``: the disk's virtual size."""
    entries: list[BitmapEntry] = []
    names: set[bytes] = set()
    pos = 0
    while pos < len(raw):
        if pos + _DIR_ENTRY.size > len(raw):
            raise ValueError("the bitmap directory ends inside an entry")
        if len(entries) == nb_bitmaps:
            raise ValueError(
                f"the bitmap directory holds more than the {nb_bitmaps} bitmaps its extension counts"
            )
        table_offset, table_size, flags, kind, granularity_bits, name_size, extra_size = (
            _DIR_ENTRY.unpack_from(raw, pos)
        )
        length = _DIR_ENTRY.size + extra_size + name_size
        end = pos + ((length + 7) & ~7)
        if end > len(raw):
            raise ValueError("a bitmap directory entry runs past the directory's end")
        extra = raw[pos + _DIR_ENTRY.size : pos + _DIR_ENTRY.size + extra_size]
        raw_name = raw[pos + _DIR_ENTRY.size + extra_size : pos + length]
        shown = raw_name.decode("utf-8", "replace")
        if any(raw[pos + length : end]):
            raise ValueError(f"bitmap {shown!r}: its directory entry's padding is not zero")
        if not 1 <= name_size <= MAX_BITMAP_NAME:
            raise ValueError(f"a bitmap name of {name_size} bytes (1..{MAX_BITMAP_NAME})")
        if raw_name in names:
            raise ValueError(f"two bitmaps are named {shown!r}")
        names.add(raw_name)
        if kind != BITMAP_TYPE_DIRTY:
            raise ValueError(f"bitmap {shown!r} has type {kind} (1, dirty tracking, is the only one)")
        if not MIN_GRANULARITY_BITS <= granularity_bits <= MAX_GRANULARITY_BITS:
            raise ValueError(
                f"bitmap {shown!r} has granularity_bits {granularity_bits} "
                f"({MIN_GRANULARITY_BITS}..{MAX_GRANULARITY_BITS})"
            )
        if flags & BME_RESERVED:
            raise ValueError(f"bitmap {shown!r} has reserved flags set ({flags:#x})")
        if extra_size and not flags & BME_EXTRA_DATA_COMPATIBLE:
            raise ValueError(f"bitmap {shown!r} has extra data it may not be used without")
        if table_size == 0 or table_size > MAX_BITMAP_TABLE or table_size * cluster_size > MAX_BITMAP_BYTES:
            raise ValueError(f"bitmap {shown!r} has a bitmap table of {table_size} entries")
        if table_offset == 0 or table_offset % cluster_size or table_offset + table_size * 8 > file_size:
            raise ValueError(
                f"bitmap {shown!r}: its table at {table_offset:#x} is unaligned or outside the file"
            )
        if not flags & BME_IN_USE and table_size != table_entries(size, granularity_bits, cluster_size):
            raise ValueError(
                f"bitmap {shown!r} has {table_size} table entries; a disk of {size} bytes needs "
                f"{table_entries(size, granularity_bits, cluster_size)}"
            )
        name = raw_name.decode("utf-8", "surrogateescape")
        entries.append(BitmapEntry(name, table_offset, table_size, flags, granularity_bits, extra))
        pos = end
    if len(entries) != nb_bitmaps:
        raise ValueError(
            f"the bitmap directory holds {len(entries)} bitmaps, its extension counts {nb_bitmaps}"
        )
    return entries


def encode_directory(entries: list[BitmapEntry]) -> bytes:
    out = bytearray()
    for entry in entries:
        name = bitmap_name_bytes(entry.name)
        out += _DIR_ENTRY.pack(
            entry.table_offset,
            entry.table_size,
            entry.flags,
            BITMAP_TYPE_DIRTY,
            entry.granularity_bits,
            len(name),
            len(entry.extra_data),
        )
        out += entry.extra_data + name
        out += bytes(-len(out) % 8)
    return bytes(out)


def directory_flag_offsets(entries: list[BitmapEntry]) -> list[int]:
    """Where each entry's ``flags`` field lies in the encoded directory."""
    out: list[int] = []
    pos = 0
    for entry in entries:
        out.append(pos + 12)
        length = _DIR_ENTRY.size + len(entry.extra_data) + len(bitmap_name_bytes(entry.name))
        pos += (length + 7) & ~7
    return out


def bitmaps_extension(nb_bitmaps: int, directory_size: int, directory_offset: int) -> bytes:
    return _BITMAPS_EXT.pack(nb_bitmaps, 0, directory_size, directory_offset)


def rewrite_cluster0(path: Path, head: bytes, header: Header, bitmaps: bytes | None, autoclear: int) -> bytes:
    """Cluster 0 (up to the end of the backing file name) with the bitmaps extension replaced by
    ``bitmaps`` (None: dropped) and ``autoclear`` as the autoclear features; every other
    extension and the backing file name are kept, the name moved further only when the
    extensions would reach it. Unchanged bytes stay as they were (so a rewrite touches few)."""
    cluster_size = header.cluster_size
    length = header.header_length
    out = bytearray(head[:length])
    kept: list[tuple[int, bytes]] = []
    placed = False
    for kind, data in header.extensions:
        if kind == EXT_BITMAPS:
            if bitmaps is not None:
                kept.append((kind, bitmaps))
                placed = True
            continue
        kept.append((kind, data))
    if bitmaps is not None and not placed:
        kept.append((EXT_BITMAPS, bitmaps))  # where QEMU puts it: after the others
    for kind, data in kept:
        out += _extension(kind, data)
    out += _U32_PAIR.pack(EXT_END, 0)
    name = header.backing_raw
    if name:
        at = header.backing_offset
        if at >= len(out):
            out += head[len(out) : at]  # what lay between is nobody's: left as it was
        else:
            at = len(out)
        out += name
        if len(out) > cluster_size:
            raise BlockError(
                errno.ENOSPC,
                f"{path}: the header extensions and the backing file name ({len(name)} bytes) do not fit "
                f"in the first cluster ({cluster_size} bytes) with the bitmaps extension",
            )
        struct.pack_into(">QI", out, 8, at, len(name))
    elif len(out) > cluster_size:
        raise BlockError(errno.ENOSPC, f"{path}: the header extensions do not fit in the first cluster")
    if header.version == 3:
        struct.pack_into(">Q", out, 88, autoclear)
    return bytes(out)
