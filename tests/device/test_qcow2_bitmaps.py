"""Persistent dirty bitmaps in qcow2 images, as QEMU keeps them: vblk loads what ``qemu-img
bitmap`` and ``qemu-io`` recorded, stores bitmaps ``qemu-img info``, ``qemu-img check`` and
``qemu-nbd -B`` agree with, marks them in use on a writable open (so a crash leaves them
inconsistent), and refuses what it must not write (v2 images, damaged directories).

Real tools, no mocks: images are made by ``qemu-img``/``qemu-io`` and read back by them and by
``nbdinfo`` over ``qemu-nbd``.
"""

from __future__ import annotations

import errno
import json
import random
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.block.dirty import BitmapRecord, DirtyLayer, bitmap_bytes
from device.block.file import FileNode
from device.block.node import BlockError
from device.block.qcow2 import Qcow2Node
from device.block.qcow2_bitmaps import Qcow2BitmapStore
from device.block.qcow2_header import AUTOCLEAR_BITMAPS, EXT_BITMAPS, create_image
from tests.device.test_qcow2 import create, qemu_io, tool
from tests.device.test_qcow2_write import WriteLog, _rebuild, check

KiB = 1 << 10
MiB = 1 << 20

Ranges = list[tuple[int, int]]


# -- helpers --------------------------------------------------------------------------------------


def info(image: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(tool("qemu-img", "info", "-U", "--output=json", image))
    return data


def qemu_bitmaps(image: Path) -> dict[str, tuple[int, list[str]]]:
    """name -> (granularity, flags) as ``qemu-img info`` lists them."""
    found = info(image)["format-specific"]["data"].get("bitmaps", [])
    return {b["name"]: (b["granularity"], sorted(b["flags"])) for b in found}


def clean_check(image: Path) -> None:
    """``qemu-img check``: no corruption, no leak."""
    report = check(image)
    assert report.get("leaks", 0) == 0, report


def nbd_map(image: Path, name: str) -> subprocess.CompletedProcess[str]:
    """``nbdinfo --map`` of bitmap ``name`` over a read-only ``qemu-nbd -B name``."""
    server = ["qemu-nbd", "-r", "-f", "qcow2", "-B", name, str(image)]
    argv = ["nbdinfo", f"--map=qemu:dirty-bitmap:{name}", "--json", "--", "[", *server, "]"]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def qemu_dirty(image: Path, name: str) -> Ranges:
    """The dirty ranges of bitmap ``name`` as ``qemu-nbd -B`` exports them."""
    done = nbd_map(image, name)
    assert done.returncode == 0, f"nbdinfo/qemu-nbd -B {name!r}: {done.stderr}"
    out: Ranges = []
    for extent in json.loads(done.stdout):
        if extent["type"] & 1:
            _add(out, extent["offset"], extent["length"])
    return out


def _add(out: Ranges, offset: int, length: int) -> None:
    if out and out[-1][0] + out[-1][1] == offset:
        out[-1] = (out[-1][0], out[-1][1] + length)
    elif length:
        out.append((offset, length))


def dirty_of(data: bytes, granularity: int, size: int) -> Ranges:
    """The dirty ranges a bit array says (byte k bit j: chunk 8k+j), clipped to the disk."""
    out: Ranges = []
    value = int.from_bytes(data, "little")
    chunks = -(-size // granularity)
    n = 0
    while n < chunks:
        if value >> n & 1:
            start = n
            while n < chunks and value >> n & 1:
                n += 1
            _add(out, start * granularity, min(n * granularity, size) - start * granularity)
        else:
            n += 1
    return out


def random_bits(rng: random.Random, size: int, granularity: int, style: str) -> bytes:
    length = bitmap_bytes(size, granularity)
    if style == "zero":
        data = bytearray(length)
    elif style == "ones":
        data = bytearray(b"\xff" * length)
    elif style == "sparse":
        data = bytearray(length)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(length)] = rng.randrange(1, 256)
    else:
        data = bytearray(rng.randbytes(length))
    chunks = -(-size // granularity)
    if chunks & 7:
        data[-1] &= (1 << (chunks & 7)) - 1
    return bytes(data)


def open_store(image: Path, *, read_only: bool = False) -> tuple[Qcow2Node, Qcow2BitmapStore]:
    node = Qcow2Node.open(image, read_only=read_only)
    return node, Qcow2BitmapStore(node)


def save_and_close(image: Path, records: list[BitmapRecord]) -> None:
    node, store = open_store(image)
    try:
        assert store.refusal() is None
        store.save(records)
    finally:
        node.close()


def load(image: Path) -> list[BitmapRecord]:
    node, store = open_store(image, read_only=True)
    try:
        return store.load()
    finally:
        node.close()


def extensions(data: bytes) -> dict[int, tuple[int, bytes]]:
    """Cluster 0's header extensions: type -> (offset of the data, data)."""
    pos = struct.unpack_from(">I", data, 100)[0]
    out: dict[int, tuple[int, bytes]] = {}
    while True:
        kind, length = struct.unpack_from(">II", data, pos)
        if kind == 0:
            return out
        out[kind] = (pos + 8, data[pos + 8 : pos + 8 + length])
        pos += 8 + ((length + 7) & ~7)


def directory_offset(image: Path) -> int:
    _, raw = extensions(image.read_bytes())[EXT_BITMAPS]
    return int(struct.unpack(">IIQQ", raw)[3])


# -- what QEMU recorded, loaded ---------------------------------------------------------------------


def test_load_finds_what_qemu_recorded(tmp_path: Path) -> None:
    image = create(tmp_path / "q.qcow2", 8 * MiB)
    tool("qemu-img", "bitmap", "--add", image, "b0")
    tool("qemu-img", "bitmap", "--add", "-g", "4096", "--disable", image, "off")
    tool("qemu-img", "bitmap", "--add", "-g", "512", image, "fine")
    qemu_io(image, "write 0 64k", "write 1M 4k", "write 5000k 3000", "write -z 7M 1M")
    tool("qemu-img", "bitmap", "--enable", image, "off")
    qemu_io(image, "write 3M 512")
    node, store = open_store(image, read_only=True)
    try:
        records = {r.name: r for r in store.load()}
    finally:
        node.close()
    assert sorted(records) == ["b0", "fine", "off"]
    assert {n: (r.granularity, r.enabled, r.in_use) for n, r in records.items()} == {
        "b0": (65536, True, False),
        "off": (4096, True, False),
        "fine": (512, True, False),
    }
    for name, record in records.items():
        assert len(record.data) == bitmap_bytes(8 * MiB, record.granularity)
        assert dirty_of(record.data, record.granularity, 8 * MiB) == qemu_dirty(image, name), name
    # And from the writes themselves: "off" saw only the last one.
    assert dirty_of(records["off"].data, 4096, 8 * MiB) == [(3 * MiB, 4096)]
    assert dirty_of(records["fine"].data, 512, 8 * MiB) == [
        (0, 64 * KiB),
        (1 * MiB, 4 * KiB),
        (3 * MiB, 512),
        (5000 * KiB, 3072),
        (7 * MiB, 1 * MiB),
    ]


# -- what vblk stores, read by QEMU -------------------------------------------------------------------


NAMES = ["a", "ünïcødé ✓ bitmap", "n" * 1023, "backup-2024-01-01T00:00:00", "日本語のビットマップ"]


def test_saved_bitmaps_are_what_qemu_reads(tmp_path: Path) -> None:
    size = 64 * MiB + 3 * 512  # a partial last granule for every granularity
    image = create(tmp_path / "s.qcow2", size, "cluster_size=4k")
    qemu_io(image, "write -P 0x11 0 1M")
    rng = random.Random(7)
    shapes = [(512, "random"), (4096, "sparse"), (65536, "ones"), (1 << 20, "random"), (1 << 31, "zero")]
    records = [
        BitmapRecord(name, g, enabled=n % 2 == 0, in_use=False, data=random_bits(rng, size, g, style))
        for n, (name, (g, style)) in enumerate(zip(NAMES, shapes, strict=True))
    ]
    save_and_close(image, records)
    clean_check(image)
    assert qemu_bitmaps(image) == {r.name: (r.granularity, ["auto"] if r.enabled else []) for r in records}
    for record in records:
        assert qemu_dirty(image, record.name) == dirty_of(record.data, record.granularity, size), record.name
    assert load(image) == records  # and vblk reads back what it wrote
    # QEMU changes them afterwards.
    tool("qemu-img", "bitmap", "--remove", image, NAMES[0])
    tool("qemu-img", "bitmap", "--clear", image, NAMES[2])
    tool("qemu-img", "bitmap", "--clear", image, NAMES[1])
    tool("qemu-img", "bitmap", "--merge", NAMES[3], image, NAMES[1])  # 1 MiB chunks into 4 KiB ones
    clean_check(image)
    after = {r.name: r for r in load(image)}
    assert sorted(after) == sorted(NAMES[1:])
    assert not any(after[NAMES[2]].data)
    assert after[NAMES[3]] == records[3] and after[NAMES[4]] == records[4]
    assert dirty_of(after[NAMES[1]].data, 4096, size) == dirty_of(records[3].data, 1 << 20, size) != []


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shapes=st.lists(
        st.tuples(
            st.sampled_from([512, 1024, 4096, 65536]),
            st.booleans(),
            st.booleans(),
            st.sampled_from(["zero", "ones", "sparse", "random"]),
        ),
        min_size=0,
        max_size=4,
    ),
    seed=st.integers(0, 1 << 30),
)
def test_saved_records_load_back_the_same(
    tmp_path: Path, shapes: list[tuple[int, bool, bool, str]], seed: int
) -> None:
    size = 3 * MiB + 512
    image = tmp_path / "r.qcow2"
    image.unlink(missing_ok=True)
    create(image, size, "cluster_size=512")
    rng = random.Random(seed)
    records = [
        BitmapRecord(f"b{n}-{'é' * n}", g, enabled, in_use, random_bits(rng, size, g, style))
        for n, (g, enabled, in_use, style) in enumerate(shapes)
    ]
    save_and_close(image, records)
    assert load(image) == records
    clean_check(image)
    assert qemu_bitmaps(image) == {
        r.name: (r.granularity, sorted((["auto"] if r.enabled else []) + (["in-use"] if r.in_use else [])))
        for r in records
    }


# -- in use: a writable open that never saves ---------------------------------------------------------


def _qemu_bitmap_image(tmp_path: Path) -> Path:
    image = create(tmp_path / "u.qcow2", 4 * MiB)
    tool("qemu-img", "bitmap", "--add", image, "b0")
    tool("qemu-img", "bitmap", "--add", "--disable", "-g", "4096", image, "b1")
    qemu_io(image, "write 0 4k")
    return image


def _assert_inconsistent(image: Path) -> None:
    assert qemu_bitmaps(image) == {"b0": (65536, ["auto", "in-use"]), "b1": (4096, ["in-use"])}
    done = nbd_map(image, "b0")
    assert done.returncode != 0 and "inconsistent" in done.stderr, done.stderr
    records = load(image)
    assert [(r.name, r.in_use, r.enabled) for r in records] == [("b0", True, True), ("b1", True, False)]
    tool("qemu-img", "bitmap", "--remove", image, "b0")
    assert qemu_bitmaps(image) == {"b1": (4096, ["in-use"])}
    clean_check(image)


def test_a_writable_open_marks_the_bitmaps_in_use_at_once(tmp_path: Path) -> None:
    image = _qemu_bitmap_image(tmp_path)
    node, store = open_store(image)
    try:
        assert qemu_bitmaps(image) == {"b0": (65536, ["auto", "in-use"]), "b1": (4096, ["in-use"])}
        records = store.load()  # as found: consistent
        assert [(r.name, r.in_use) for r in records] == [("b0", False), ("b1", False)]
        assert dirty_of(records[0].data, 65536, 4 * MiB) == [(0, 65536)]
        node.write_now(1 * MiB, [memoryview(b"\x01" * 4096)])
    finally:
        node.close()  # never saved: a crash as far as the bitmaps know
    _assert_inconsistent(image)


def test_a_process_that_dies_after_a_writable_open_leaves_them_in_use(tmp_path: Path) -> None:
    image = _qemu_bitmap_image(tmp_path)
    program = (
        "import os, sys\n"
        "from device.block.qcow2 import Qcow2Node\n"
        "node = Qcow2Node.open(sys.argv[1], read_only=False)\n"
        "node.write_now(0, [memoryview(bytes(4096))])\n"
        "os._exit(0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program, str(image)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    _assert_inconsistent(image)


def test_a_save_while_open_is_undone_by_the_next_write(tmp_path: Path) -> None:
    image = _qemu_bitmap_image(tmp_path)
    node, store = open_store(image)
    try:
        store.save(store.load())
        assert qemu_bitmaps(image) == {"b0": (65536, ["auto"]), "b1": (4096, [])}
        node.write_now(2 * MiB, [memoryview(b"\x02" * 512)])  # the stored bits no longer cover it
        assert qemu_bitmaps(image) == {"b0": (65536, ["auto", "in-use"]), "b1": (4096, ["in-use"])}
        store.save(store.load())
    finally:
        node.close()
    assert qemu_bitmaps(image) == {"b0": (65536, ["auto"]), "b1": (4096, [])}
    clean_check(image)


def test_the_dirty_layer_over_the_node_keeps_its_bitmaps_across_runs(tmp_path: Path) -> None:
    image = create(tmp_path / "l.qcow2", 4 * MiB)
    node = Qcow2Node.open(image, read_only=False)
    layer = DirtyLayer(node, Qcow2BitmapStore(node))
    layer.add("backup", 4096, persistent=True)
    done = Done()
    layer.writev(1 * MiB, [memoryview(b"\x03" * 8192)], done)
    assert done.error is None
    layer.close()
    clean_check(image)
    assert qemu_bitmaps(image) == {"backup": (4096, ["auto"])}
    assert qemu_dirty(image, "backup") == [(1 * MiB, 8192)]


class Done:
    def __init__(self) -> None:
        self.error: BaseException | None = None

    def complete(self, error: BaseException | None) -> None:
        self.error = error


# -- saving again, removing, resizing -------------------------------------------------------------------


def test_saving_twice_and_removing_every_bitmap(tmp_path: Path) -> None:
    size = 16 * MiB
    image = create(tmp_path / "t.qcow2", size)
    rng = random.Random(3)
    first = [
        BitmapRecord(f"x{n}", 65536, True, False, random_bits(rng, size, 65536, "random")) for n in range(3)
    ]
    save_and_close(image, first)
    second = [first[2], BitmapRecord("y", 512, False, False, random_bits(rng, size, 512, "sparse"))]
    save_and_close(image, second)
    clean_check(image)
    assert load(image) == second
    assert qemu_bitmaps(image) == {"x2": (65536, ["auto"]), "y": (512, [])}
    save_and_close(image, [])
    clean_check(image)
    data = image.read_bytes()
    assert EXT_BITMAPS not in extensions(data)
    assert struct.unpack_from(">Q", data, 88)[0] & AUTOCLEAR_BITMAPS == 0
    assert qemu_bitmaps(image) == {}
    assert load(image) == []
    tool("qemu-img", "bitmap", "--add", image, "again")  # QEMU takes it from there
    clean_check(image)


def test_bitmaps_saved_after_a_resize_have_the_new_size(tmp_path: Path) -> None:
    image = create(tmp_path / "g.qcow2", 4 * MiB)
    tool("qemu-img", "bitmap", "--add", "-g", "4096", image, "b0")
    qemu_io(image, "write 0 4k")
    node, store = open_store(image)
    try:
        (record,) = store.load()
        node.resize(9 * MiB + 512)
        grown = bytearray(bitmap_bytes(node.size, 4096))
        grown[: len(record.data)] = record.data
        grown[-1] |= 1  # the last chunk, 512 bytes from 9 MiB
        store.save([BitmapRecord("b0", 4096, True, False, bytes(grown))])
        with pytest.raises(BlockError) as short:
            store.save([record])  # the old size's bits
        assert short.value.errno == errno.EINVAL
    finally:
        node.close()
    clean_check(image)
    assert info(image)["virtual-size"] == 9 * MiB + 512
    assert qemu_dirty(image, "b0") == [(0, 4096), (9 * MiB, 512)]


# -- what stays as it was ----------------------------------------------------------------------------


def test_the_backing_file_name_and_other_extensions_are_kept(tmp_path: Path) -> None:
    name = "base-" + "ü" * 120 + ".raw"  # a long name (245 bytes), moved by the extension
    base = tmp_path / name
    base.write_bytes(random.Random(1).randbytes(2 * MiB))
    image = create(tmp_path / "o.qcow2", 2 * MiB, backing=(Path(name), "raw"))
    before = extensions(image.read_bytes())
    assert struct.unpack_from(">Q", image.read_bytes(), 8)[0] < 512 + 32  # where the extension goes
    records = [BitmapRecord("b", 65536, True, False, b"\x05\0\0\0")]
    save_and_close(image, records)
    data = image.read_bytes()
    after = extensions(data)
    assert {k: v[1] for k, v in after.items() if k != EXT_BITMAPS} == {k: v[1] for k, v in before.items()}
    offset, length = struct.unpack_from(">QI", data, 8)
    assert data[offset : offset + length] == name.encode()
    assert info(image)["backing-filename"] == name
    clean_check(image)
    tool("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, base)
    assert load(image) == records


def test_a_backing_name_that_cannot_fit_beside_the_extension_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "b.raw"
    base.write_bytes(bytes(1 * MiB))
    image = tmp_path / "tight.qcow2"
    name = "./" * 184 + "b.raw"  # header 112 + backing format 16 + end 8 + name 373 = 509 of 512
    create_image(image, 1 * MiB, cluster_size=512, backing=name, backing_format="raw")
    before = image.read_bytes()
    node, store = open_store(image)
    try:
        with pytest.raises(BlockError, match="do not fit in the first cluster") as refused:
            store.save([BitmapRecord("b", 4096, True, False, bytes(bitmap_bytes(1 * MiB, 4096)))])
        assert refused.value.errno == errno.ENOSPC
    finally:
        node.close()
    assert image.read_bytes() == before
    clean_check(image)


def test_v2_images_keep_no_bitmaps(tmp_path: Path) -> None:
    image = create(tmp_path / "v2.qcow2", 1 * MiB, "compat=0.10")
    node, store = open_store(image)
    try:
        refusal = store.refusal()
        assert refusal is not None and "Cannot store dirty bitmaps in qcow2 v2 files" in refusal
        assert "qemu-img amend -o compat=1.1" in refusal
        assert store.load() == []
        with pytest.raises(BlockError) as refused:
            store.save([BitmapRecord("b", 4096, True, False, bytes(bitmap_bytes(1 * MiB, 4096)))])
        assert refused.value.errno == errno.ENOTSUP
        store.save([])  # nothing to store: nothing done
    finally:
        node.close()
    clean_check(image)


def test_a_read_only_open_writes_nothing(tmp_path: Path) -> None:
    image = _qemu_bitmap_image(tmp_path)
    before = image.read_bytes()
    node, store = open_store(image, read_only=True)
    try:
        assert store.refusal() == "the disk is read-only"
        assert [r.in_use for r in store.load()] == [False, False]
        with pytest.raises(BlockError) as refused:
            store.save([])
        assert refused.value.errno == errno.EROFS
    finally:
        node.close()
    assert image.read_bytes() == before


def test_a_stale_extension_is_dropped_by_a_writer(tmp_path: Path) -> None:
    image = _qemu_bitmap_image(tmp_path)
    data = bytearray(image.read_bytes())
    struct.pack_into(">Q", data, 88, 0)  # as a program without bitmap support leaves it
    image.write_bytes(data)
    assert qemu_bitmaps(image) == {}
    assert load(image) == []
    node = Qcow2Node.open(image, read_only=False)
    node.close()
    assert EXT_BITMAPS not in extensions(image.read_bytes())
    report = check(image)  # the old bitmaps' clusters leak, as QEMU says they may
    assert report.get("leaks", 0) > 0
    save_and_close(image, [BitmapRecord("new", 65536, True, False, b"\x01" + bytes(7))])
    assert qemu_bitmaps(image) == {"new": (65536, ["auto"])}


# -- damaged directories ---------------------------------------------------------------------------------


def _entry_patch(field: int, fmt: str, value: int) -> Callable[[bytearray, int], None]:
    def patch(data: bytearray, directory: int) -> None:
        struct.pack_into(fmt, data, directory + field, value)

    return patch


DAMAGE: dict[str, Callable[[bytearray, int], None]] = {
    "type": _entry_patch(16, ">B", 2),
    "granularity_bits": _entry_patch(17, ">B", 8),
    "granularity_bits_high": _entry_patch(17, ">B", 32),
    "reserved_flags": _entry_patch(12, ">I", 1 << 5 | 2),
    "name_size_zero": _entry_patch(18, ">H", 0),
    "table_unaligned": _entry_patch(0, ">Q", 0x10200),
    "table_size": _entry_patch(8, ">I", 7),
    "extra_data": _entry_patch(20, ">I", 8),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_directory_is_refused_for_writing(tmp_path: Path, damage: str) -> None:
    image = create(tmp_path / "d.qcow2", 4 * MiB)
    tool("qemu-img", "bitmap", "--add", image, "b0")
    tool("qemu-img", "bitmap", "--add", image, "b1")
    qemu_io(image, "write -P 0x44 0 64k")
    data = bytearray(image.read_bytes())
    DAMAGE[damage](data, directory_offset(image))
    image.write_bytes(data)
    # QEMU 7.2 opens it not at all.
    done = subprocess.run(["qemu-img", "info", str(image)], capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "Could not open" in done.stderr, (damage, done.stderr)
    with pytest.raises(BlockError, match="cannot be written: its persistent bitmaps are damaged") as refused:
        Qcow2Node.open(image, read_only=False)
    assert refused.value.errno == errno.EROFS
    assert "\n" not in str(refused.value)
    node, store = open_store(image, read_only=True)  # the data, without the bitmaps
    try:
        assert store.load() == []
        refusal = store.refusal()
        assert refusal is not None
        out = bytearray(4096)
        node.read_now(0, [memoryview(out)])
        assert out == b"\x44" * 4096
    finally:
        node.close()
    assert image.read_bytes() == data


def test_duplicate_names_and_a_wrong_count_are_damage(tmp_path: Path) -> None:
    image = create(tmp_path / "n.qcow2", 4 * MiB)
    tool("qemu-img", "bitmap", "--add", image, "b0")
    tool("qemu-img", "bitmap", "--add", image, "b1")
    good = image.read_bytes()
    directory = directory_offset(image)
    ext_at, _ = extensions(good)[EXT_BITMAPS]
    for why, at, patch in [
        ("two bitmaps", directory + 24 + 8 + 24 + 1, b"0"),
        ("counts", ext_at, b"\0\0\0\3"),
    ]:
        data = bytearray(good)
        data[at : at + len(patch)] = patch
        image.write_bytes(data)
        assert (
            subprocess.run(["qemu-img", "info", str(image)], capture_output=True, check=False).returncode != 0
        )
        with pytest.raises(BlockError, match=why):
            Qcow2Node.open(image, read_only=False)


# -- power loss during a save --------------------------------------------------------------------------


@pytest.mark.parametrize("start", ["none", "qemu", "vblk"])
def test_a_power_loss_during_a_save_leaves_the_old_bitmaps_or_the_new(tmp_path: Path, start: str) -> None:
    size = 4 * MiB
    image = create(tmp_path / "p.qcow2", size, "cluster_size=4k")
    rng = random.Random(11)
    if start == "qemu":
        tool("qemu-img", "bitmap", "--add", "-g", "4096", image, "old")
        qemu_io(image, "write 0 64k")
    elif start == "vblk":
        save_and_close(
            image, [BitmapRecord("old", 4096, True, False, random_bits(rng, size, 4096, "random"))]
        )
    old = [(r.name, r.granularity, r.data) for r in load(image)]
    new_records = [
        BitmapRecord("new", 4096, True, False, random_bits(rng, size, 4096, "random")),
        BitmapRecord("other", 512, False, False, random_bits(rng, size, 512, "sparse")),
    ]
    if start == "vblk":
        new_records.append(BitmapRecord("old", 4096, True, False, random_bits(rng, size, 4096, "ones")))
    new = [(r.name, r.granularity, r.data) for r in new_records]
    initial = image.read_bytes()
    log = WriteLog(FileNode.open(image, any_size=True))
    node = Qcow2Node.open(image, read_only=False, file=log)
    try:
        Qcow2BitmapStore(node).save(new_records)
    finally:
        node.close()
    entries = log.entries
    assert len(entries) > 10
    seen = set()
    for point in range(len(entries) + 1):
        prefix = entries[:point]
        last_flush = max((i for i, e in enumerate(prefix) if e[0] == "flush"), default=-1)
        durable, after = prefix[: last_flush + 1], prefix[last_flush + 1 :]
        kept = [e for e in after if rng.random() < 0.5]
        crashed = tmp_path / "crashed.qcow2"
        crashed.write_bytes(_rebuild(initial, durable + kept))
        check(crashed)
        found = [(r.name, r.granularity, r.data) for r in load(crashed)]
        assert found in (old, new), f"crash at log entry {point}: {[f[0] for f in found]}"
        seen.add("old" if found == old else "new")
    assert seen == {"old", "new"}
