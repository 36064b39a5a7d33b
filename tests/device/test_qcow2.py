"""The qcow2 node reads what QEMU's tools write: every byte as ``qemu-img convert -O raw`` reads
it, the allocation map as ``qemu-img map`` tells it, backing chains included; and hostile images
are refused at open or fail their reads with EIO, never with another exception.

Images are made by ``qemu-img`` and ``qemu-io`` (real tools, no mocks); hostile ones are those
images with bytes of their header and tables changed.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.block.node import BlockError, Extent, blocking_call
from device.block.qcow2 import DEFAULT_L2_CACHE, Qcow2Node

KiB = 1 << 10
MiB = 1 << 20


def tool(*argv: str | Path) -> str:
    """Run a QEMU tool; a missing binary or a failure fails the test."""
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{argv}: {done.stderr}{done.stdout}"
    return done.stdout


def qemu_io(image: Path, *commands: str, fmt: str = "qcow2") -> None:
    argv: list[str | Path] = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    tool(*argv, image)


def create(image: Path, size: int, *options: str, backing: tuple[Path, str] | None = None) -> Path:
    argv: list[str | Path] = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if options:
        argv += ["-o", ",".join(options)]
    if backing is not None:
        argv += ["-b", backing[0], "-F", backing[1]]
    tool(*argv, image, str(size))
    return image


def raw_of(image: Path, tmp: Path) -> bytes:
    """The image's guest bytes as qemu-img reads them."""
    out = tmp / f"{image.name}.raw"
    tool("qemu-img", "convert", "-O", "raw", image, out)
    return out.read_bytes()


def read_all(node: Qcow2Node) -> bytes:
    data = bytearray(node.size)
    node.read_now(0, [memoryview(data)])
    return bytes(data)


Run = tuple[int, int, bool, bool]  # offset, length, data, zero


def merged(runs: Iterator[Run] | list[Run]) -> list[Run]:
    out: list[Run] = []
    for start, length, data, zero in runs:
        if out and out[-1][2:] == (data, zero) and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, data, zero)
        elif length:
            out.append((start, length, data, zero))
    return out


def qemu_map(image: Path) -> list[Run]:
    entries = json.loads(tool("qemu-img", "map", "--output=json", image))
    return merged((e["start"], e["length"], e["data"], e["zero"]) for e in entries)


def node_map(node: Qcow2Node, offset: int = 0, length: int | None = None) -> list[Run]:
    length = node.size - offset if length is None else length
    return merged((e.offset, e.length, not e.hole, e.zero) for e in node.extents(offset, length))


def assert_like_qemu(image: Path, tmp: Path, l2_cache_bytes: int = DEFAULT_L2_CACHE) -> Qcow2Node:
    """The node over ``image`` reads and maps it as QEMU does (the caller closes it)."""
    node = Qcow2Node.open(image, l2_cache_bytes=l2_cache_bytes)
    assert read_all(node) == raw_of(image, tmp)
    assert node_map(node) == qemu_map(image)
    return node


def fill(image: Path, size: int, cluster: int, *, zero_clusters: bool) -> None:
    """Patterns at scattered, unaligned offsets, a write at the very end, zero clusters."""
    commands = [
        "write -P 0xab 0 1M",
        f"write -P 0x11 {size // 3 + 512} 100k",
        f"write -P 0x22 {size // 2 + 1000} 3000",
        f"write -P 0x33 {size - 4096} 4096",
    ]
    if zero_clusters:  # one zero cluster over data, one over nothing
        commands += [f"write -z {cluster} {cluster}", f"write -z 6M {cluster}"]
    qemu_io(image, *commands)


# -- images QEMU made ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster", [512, 4 * KiB, 64 * KiB, 2 * MiB])
def test_every_byte_and_the_map_match_qemu(tmp_path: Path, compat: str, cluster: int) -> None:
    size = 9 * MiB + 3 * 512  # the last cluster is partial
    image = create(tmp_path / "a.qcow2", size, f"compat={compat}", f"cluster_size={cluster}")
    fill(image, size, cluster, zero_clusters=compat == "1.1")
    with_zero = Qcow2Node.open(image)
    try:
        assert with_zero.version == (2 if compat == "0.10" else 3)
        assert with_zero.cluster_size == cluster and with_zero.size == size
        assert read_all(with_zero) == raw_of(image, tmp_path)
        assert node_map(with_zero) == qemu_map(image)
        if compat == "1.1":
            assert any(zero and not data for _, _, data, zero in node_map(with_zero)[1:])
    finally:
        with_zero.close()
    compressed = tmp_path / "c.qcow2"  # the same image, every cluster compressed
    tool(
        "qemu-img",
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        f"compat={compat},cluster_size={cluster}",
        image,
        compressed,
    )
    assert raw_of(compressed, tmp_path) == raw_of(image, tmp_path)
    assert_like_qemu(compressed, tmp_path).close()


def test_compressed_writes_of_qemu_io_and_reads_at_odd_offsets(tmp_path: Path) -> None:
    image = create(tmp_path / "c.qcow2", 4 * MiB, "cluster_size=4k")
    qemu_io(image, "write -c -P 0x5a 0 64k", "write -c -P 0xa5 1M 8k", "write -P 0x77 68k 4k")
    node = assert_like_qemu(image, tmp_path)
    expected = raw_of(image, tmp_path)
    try:
        for offset, length in [(0, 512), (4096 - 512, 1024), (60 * KiB, 12 * KiB), (MiB - 512, 9 * KiB)]:
            got = bytearray(length)
            node.read_now(offset, [memoryview(got)])
            assert bytes(got) == expected[offset : offset + length]
        # several buffers, completion style
        parts = [bytearray(1000), bytearray(24), bytearray(3072)]
        blocking_call(node.readv, 63 * KiB, [memoryview(p) for p in parts])
        assert b"".join(parts) == expected[63 * KiB : 63 * KiB + 4096]
    finally:
        node.close()


def test_a_small_l2_cache_still_reads_everything(tmp_path: Path) -> None:
    # 4 KiB clusters: one L2 table maps 2 MiB, so 16 MiB needs 8 tables; the cache holds one.
    image = create(tmp_path / "a.qcow2", 16 * MiB, "cluster_size=4k")
    qemu_io(image, *(f"write -P {i + 1} {i * 2 * MiB + 4096 * i} 8k" for i in range(8)))
    node = assert_like_qemu(image, tmp_path, l2_cache_bytes=4096)
    try:
        assert node.l2_cache_tables == 1 and node.l2_cached <= 1
    finally:
        node.close()
    # As QEMU's default: every table of the image, up to 32 MiB of them (256 GiB mapped).
    for size, tables in [(MiB, 1), (100 << 30, 200), (1 << 40, 512)]:
        default = Qcow2Node.open(create(tmp_path / f"b{size}.qcow2", size))
        try:
            assert default.l2_cache_tables == tables
        finally:
            default.close()


def test_a_three_deep_chain_reads_and_maps_as_qemu_says(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    tool("qemu-img", "create", "-q", "-f", "raw", base, str(3 * MiB))  # smaller than the rest
    qemu_io(base, "write -P 0x01 0 3M", fmt="raw")
    mid = create(tmp_path / "mid.qcow2", 6 * MiB, backing=(Path("base.raw"), "raw"))  # relative
    qemu_io(mid, "write -P 0x02 1M 512k", "write -P 0x22 4M 64k")
    top = create(tmp_path / "top.qcow2", 6 * MiB, backing=(mid, "qcow2"))  # absolute
    qemu_io(top, "write -P 0x03 1280k 64k", "write -z 0 64k", "write -P 0x33 5M 4k")
    node = assert_like_qemu(top, tmp_path)
    try:
        chain = node.describe()["backing"]
        assert [(c["path"], c["format"]) for c in chain] == [(str(mid), "qcow2"), (str(base), "raw")]
        # qemu-img map's depth: 0 is the top. Past the raw base's end nothing is present, and
        # QEMU's allocation depth counts those zeroes as the short layer's (qemu-nbd -A: 3).
        entries = json.loads(tool("qemu-img", "map", "--output=json", top))
        want = [
            (e["start"], e["length"], e["depth"] + 1 if e["present"] else (3 if e["start"] >= 3 * MiB else 0))
            for e in entries
        ]
        assert _merged_depth(node.allocation_depth(0, node.size)) == _merged_depth(want)
        # past the raw base's end, the chain reads zeroes
        tail = bytearray(64 * KiB)
        node.read_now(3 * MiB, [memoryview(tail)])
        assert tail == bytes(len(tail))
    finally:
        node.close()


def _merged_depth(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for start, length, depth in runs:
        if out and out[-1][2] == depth and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, depth)
        else:
            out.append((start, length, depth))
    return out


def _header_extension(data: bytes, kind: int) -> int:
    """Where the header extension ``kind`` starts in a v3 image's first cluster."""
    (header_length,) = struct.unpack_from(">I", data, 100)
    pos = header_length
    while True:
        found, length = struct.unpack_from(">II", data, pos)
        assert found != 0, f"no extension {kind:#x}"
        if found == kind:
            return int(pos)
        pos += 8 + (length + 7) // 8 * 8


def test_a_backing_file_of_unrecorded_format_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    tool("qemu-img", "create", "-q", "-f", "raw", base, str(MiB))
    top = create(tmp_path / "top.qcow2", MiB, backing=(base, "raw"))
    data = bytearray(top.read_bytes())
    at = _header_extension(bytes(data), 0xE2792ACA)
    struct.pack_into(">I", data, at, 0x0BADF00D)  # an unknown extension now: the format is gone
    top.write_bytes(data)
    assert "backing-filename-format" not in tool("qemu-img", "info", "--output=json", top)
    with pytest.raises(BlockError) as refused:
        Qcow2Node.open(top)
    assert refused.value.errno == errno.ENOTSUP
    assert "qemu-img rebase -u" in str(refused.value) and "-F raw|qcow2" in str(refused.value)


def test_a_dirty_image_opens_read_only_and_a_corrupt_one_is_refused(tmp_path: Path) -> None:
    image = create(tmp_path / "a.qcow2", MiB)
    qemu_io(image, "write -P 0x42 0 128k")
    data = bytearray(image.read_bytes())
    struct.pack_into(">Q", data, 72, 1)  # dirty: refcounts may be stale; L1/L2 are what counts
    image.write_bytes(data)
    node = assert_like_qemu(image, tmp_path)
    assert node.describe()["dirty"] is True
    node.close()
    struct.pack_into(">Q", data, 72, 2)
    image.write_bytes(data)
    with pytest.raises(BlockError, match="marked corrupt"):
        Qcow2Node.open(image)


def test_zstd_compressed_images(tmp_path: Path) -> None:
    """Read with the zstandard module (``pip install zstandard``), else refused at open."""
    image = create(tmp_path / "z.qcow2", 4 * MiB, "compression_type=zstd", "cluster_size=4k")
    qemu_io(image, "write -c -P 0x61 0 64k", "write -c -P 0x62 1M 12k", "write -P 0x63 2M 4k")
    if importlib.util.find_spec("zstandard") is None:
        with pytest.raises(BlockError, match="zstandard module is not installed") as refused:
            Qcow2Node.open(image)
        assert refused.value.errno == errno.ENOTSUP
        return
    assert_like_qemu(image, tmp_path).close()
    converted = tmp_path / "zc.qcow2"  # every cluster, 64 KiB ones
    tool("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", image, converted)
    assert_like_qemu(converted, tmp_path).close()
    data = bytearray(image.read_bytes())  # damage the first compressed cluster's frame
    (entry,) = struct.unpack_from(">Q", data, _l2_entries(bytes(data))[0])
    host = entry & ((1 << 58) - 1)
    data[host : host + 4] = b"\0\0\0\0"
    image.write_bytes(data)
    node = Qcow2Node.open(image)
    try:
        with pytest.raises(BlockError) as failed:
            blocking_call(node.readv, 0, [memoryview(bytearray(4096))])
        assert failed.value.errno == errno.EIO
    finally:
        node.close()


def test_the_node_is_read_only_and_describes_itself(tmp_path: Path) -> None:
    image = create(tmp_path / "a.qcow2", 2 * MiB, "cluster_size=4k")
    node = Qcow2Node.open(image)
    try:
        assert node.capabilities.read_only and node.capabilities.blocking
        described = node.describe()
        assert described["node"] == "qcow2" and described["format"] == "qcow2"
        assert (described["cluster_size"], described["size"], described["version"]) == (4096, 2 * MiB, 3)
        assert node.inner.describe()["path"] == str(image) and node.inner.capabilities.read_only
        for start, args in [(node.writev, (0, [memoryview(bytes(512))])), (node.discard, (0, 512))]:
            with pytest.raises(BlockError) as refused:
                blocking_call(start, *args)
            assert refused.value.errno == errno.EROFS
        with pytest.raises(BlockError) as outside:
            blocking_call(node.readv, 2 * MiB, [memoryview(bytearray(512))])
        assert outside.value.errno == errno.EINVAL
        assert node.extents(0, 2 * MiB) == [Extent(0, 2 * MiB, True, True)]
    finally:
        node.close()
        node.close()  # idempotent


def test_a_missing_image_and_a_raw_one_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BlockError) as missing:
        Qcow2Node.open(tmp_path / "nothing.qcow2")
    assert missing.value.errno == errno.ENOENT
    raw = tmp_path / "disk.img"
    raw.write_bytes(bytes(MiB))
    with pytest.raises(BlockError, match="no qcow2 magic"):
        Qcow2Node.open(raw)


# -- hostile images -------------------------------------------------------------------------------------


def _exercise(image: Path) -> str:
    """Open, read all and map an image; ``refused``/``eio``/``ok``. Any other exception escapes."""
    try:
        node = Qcow2Node.open(image)
    except BlockError as refused:  # ENOENT too: a damaged backing file name names no file
        assert refused.errno and str(refused), refused
        return "refused"
    try:
        outcome = "ok"
        for action in (lambda: read_all(node), lambda: node.extents(0, node.size)):
            try:
                action()
            except BlockError as failed:
                assert failed.errno == errno.EIO, failed
                outcome = "eio"
        step = max(512, node.size // 64) // 512 * 512  # piecewise, completion style
        for offset in range(0, node.size, step):
            try:
                blocking_call(node.readv, offset, [memoryview(bytearray(min(step, node.size - offset)))])
            except BlockError as failed:
                assert failed.errno == errno.EIO, failed
                outcome = "eio"
        return outcome
    finally:
        node.close()


@pytest.fixture(scope="module")
def victim_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small v3 image with data, zero and compressed clusters and a raw backing file, as bytes."""
    where = tmp_path_factory.mktemp("victim")
    base = where / "base.raw"
    tool("qemu-img", "create", "-q", "-f", "raw", base, str(MiB))
    plain = create(where / "plain.qcow2", MiB, "cluster_size=4k")
    qemu_io(plain, "write -P 0x11 0 64k", "write -P 0x22 512k 4k")
    image = where / "victim.qcow2"
    tool("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k", plain, image)
    tool("qemu-img", "rebase", "-u", "-b", "base.raw", "-F", "raw", image)  # beside it
    qemu_io(image, "write -P 0x33 256k 8k", "write -z 128k 8k")
    return image


@pytest.fixture
def victim(victim_image: Path) -> bytes:
    return victim_image.read_bytes()


def _l1(data: bytes) -> tuple[int, int]:
    l1_size, l1_offset = struct.unpack_from(">IQ", data, 36)
    return l1_offset, l1_size


def _l2_entries(data: bytes) -> list[int]:
    """File offsets of the victim's used L2 entries."""
    l1_offset, _ = _l1(data)
    (l2,) = struct.unpack_from(">Q", data, l1_offset)
    l2 &= 0x00FFFFFFFFFFFE00
    return [l2 + 8 * i for i in range(512) if struct.unpack_from(">Q", data, l2 + 8 * i)[0]]


def _mutations(data: bytes) -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    l1_offset, _ = _l1(data)
    entries = _l2_entries(data)

    def u32(value: int) -> bytes:
        return struct.pack(">I", value)

    def u64(value: int) -> bytes:
        return struct.pack(">Q", value)

    yield "bad magic", [(0, b"QFI\xfa")]
    yield "version 1", [(4, u32(1))]
    yield "version 4", [(4, u32(4))]
    yield "cluster_bits 8", [(20, u32(8))]
    yield "cluster_bits 22", [(20, u32(22))]
    yield "cluster_bits 31", [(20, u32(31))]
    yield "huge virtual size", [(24, u64(1 << 62))]
    yield "unaligned virtual size", [(24, u64(MiB + 1))]
    yield "aes", [(32, u32(1))]
    yield "luks", [(32, u32(2))]
    yield "huge l1_size", [(36, u32(0xFFFFFFFF))]
    yield "l1_size 0", [(36, u32(0))]
    yield "l1 past the end", [(40, u64(1 << 40))]
    yield "l1 unaligned", [(40, u64(l1_offset + 8))]
    yield "l1 at 0", [(40, u64(0))]
    yield "external data file", [(72, u64(1 << 2))]
    yield "compression type bit, zlib", [(72, u64(1 << 3))]
    yield "extended l2", [(72, u64(1 << 4))]
    yield "unknown incompatible bit", [(72, u64(1 << 20))]
    yield "every incompatible bit", [(72, u64((1 << 64) - 1))]
    yield "refcount_order 7", [(96, u32(7))]
    yield "short header_length", [(100, u32(100))]
    yield "header_length past the cluster", [(100, u32(1 << 20))]
    yield "unknown compression type", [(72, u64(1 << 3)), (104, b"\x07")]
    yield "backing name too long", [(16, u32(2000))]
    yield "backing name outside cluster 0", [(8, u64(4090)), (16, u32(100))]
    yield "backing name with a NUL", [(struct.unpack_from(">Q", data, 8)[0], b"\0")]
    yield "l2 past the end", [(l1_offset, u64((1 << 63) | (1 << 40)))]
    yield "l2 unaligned", [(l1_offset, u64((1 << 63) | 0x10200))]
    for i, at in enumerate(entries[:6]):
        (entry,) = struct.unpack_from(">Q", data, at)
        yield f"data past the end {i}", [(at, u64((1 << 63) | (1 << 44)))]
        yield f"data unaligned {i}", [(at, u64((1 << 63) | 0x3200))]
        yield f"zero flag and compressed {i}", [(at, u64(entry | 1))]
        yield f"compressed past the end {i}", [(at, u64((1 << 62) | (1 << 48) | 1))]
        yield f"compressed at 0 {i}", [(at, u64(1 << 62))]
        yield f"compressed, huge size {i}", [(at, u64((1 << 62) | (0xF << 58) | 0x3000))]
        yield f"compressed over the L1 {i}", [(at, u64((1 << 62) | l1_offset))]
    yield "garbage compressed data", [(4096 * 5 + i * 7, b"\xff\x00\x13") for i in range(300)]


def test_the_mutations_are_caught(tmp_path: Path, victim: bytes) -> None:
    """Each broken header is refused at open; each broken table or cluster fails its reads (and the
    map, where it reaches that entry) with EIO."""
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    outcomes: dict[str, str] = {}
    for name, patches in _mutations(victim):
        data = bytearray(victim)
        for at, patch in patches:
            data[at : at + len(patch)] = patch
        image = tmp_path / "victim.qcow2"
        image.write_bytes(data)
        outcomes[name] = _exercise(image)
    header = list(outcomes)[: list(outcomes).index("l2 past the end")]
    assert len(header) == 27 and len(outcomes) == 72
    assert {name: outcomes[name] for name in header} == dict.fromkeys(header, "refused")
    tables = [name for name in outcomes if name not in header]
    assert {name: outcomes[name] for name in tables} == dict.fromkeys(tables, "eio")


def test_cut_short_images_and_odd_files_are_refused_or_fail_with_eio(tmp_path: Path, victim: bytes) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    image = tmp_path / "victim.qcow2"
    outcomes = []
    for length in (1, 50, 72, 104, 111, 112, 200, 4096, 4097, 12 * 1024, 20 * 1024 + 3, len(victim) - 1):
        image.write_bytes(victim[:length])
        outcomes.append(_exercise(image))
    assert outcomes[:7] == ["refused"] * 7 and "eio" in outcomes
    image.write_bytes(b"")
    assert _exercise(image) == "refused"
    image.unlink()
    image.mkdir()  # a directory where the image should be
    assert _exercise(image) == "refused"
    data = bytearray(victim)  # a backing file name that names a directory
    at = struct.unpack_from(">Q", data, 8)[0]
    data[at : at + 8] = b"./././."[:7] + b"."
    (tmp_path / "top.qcow2").write_bytes(data)
    with pytest.raises(BlockError, match="is a directory"):
        Qcow2Node.open(tmp_path / "top.qcow2")


def test_a_backing_loop_is_refused(tmp_path: Path) -> None:
    a = create(tmp_path / "a.qcow2", MiB)
    b = create(tmp_path / "b.qcow2", MiB, backing=(a, "qcow2"))
    tool("qemu-img", "rebase", "-u", "-b", b, "-F", "qcow2", a)  # a -> b -> a
    with pytest.raises(BlockError, match="loops back") as refused:
        Qcow2Node.open(b)
    assert refused.value.errno == errno.EINVAL
    tool("qemu-img", "rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", a)  # a -> a
    with pytest.raises(BlockError, match="loops back"):
        Qcow2Node.open(a)
    assert not list(tmp_path.glob("*.lock")) and os.listdir(tmp_path)  # nothing left open or made


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.integers(0, 24 * 1024 - 1), st.binary(min_size=1, max_size=8)), min_size=1, max_size=12
    )
)
def test_random_metadata_damage_never_escapes_as_another_exception(
    tmp_path: Path, victim_image: Path, patches: list[tuple[int, bytes]]
) -> None:
    # The first 24 KiB hold the header, the refcount table and block, the L1 and L2 tables and
    # the first compressed clusters.
    data = bytearray(victim_image.read_bytes())
    for at, patch in patches:
        data[at : at + len(patch)] = patch[: len(data) - at]
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    image = tmp_path / "victim.qcow2"
    image.write_bytes(data)
    _exercise(image)
