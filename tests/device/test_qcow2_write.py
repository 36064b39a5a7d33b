"""The qcow2 node writes images QEMU agrees with: after any sequence of writes, zeroes, discards,
flushes and resizes ``qemu-img check`` finds nothing wrong and ``qemu-img compare`` finds the bytes a
byte model holds; a simulated power loss at any moment leaves no corruption and loses no flushed
write; images it must not write are refused, and a write that would land on metadata marks the
image corrupt, as QEMU does.

Images are made by ``qemu-img`` and ``qemu-io`` or by :func:`create_image`, and checked by
``qemu-img`` (real tools, no mocks).
"""

from __future__ import annotations

import errno
import json
import os
import random
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from device.block.file import FileNode
from device.block.node import BlockError, Extent
from device.block.qcow2 import Qcow2Node, create_image
from device.block.qcow2_meta import HostFile
from tests.device.test_qcow2 import merged, qemu_io, tool

KiB = 1 << 10
MiB = 1 << 20


def check(image: Path) -> dict[str, Any]:
    """``qemu-img check`` as JSON; any exit but clean (0) or leaks only (3) fails the test."""
    done = subprocess.run(
        ["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True, check=False
    )
    assert done.returncode in (0, 3), f"qemu-img check: rc {done.returncode}: {done.stdout}{done.stderr}"
    report: dict[str, Any] = json.loads(done.stdout)
    assert report.get("corruptions", 0) == 0 and report["check-errors"] == 0, report
    return report


def compare(image: Path, model: bytes, where: Path) -> None:
    raw = where / "model.raw"
    raw.write_bytes(model)
    tool("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, raw)


def qemu_map(image: Path) -> list[tuple[int, int, bool, bool]]:
    entries = json.loads(tool("qemu-img", "map", "--output=json", image))
    return merged([(e["start"], e["length"], e["data"], e["zero"]) for e in entries])


def node_map(extents: list[Extent]) -> list[tuple[int, int, bool, bool]]:
    return merged([(e.offset, e.length, not e.hole, e.zero) for e in extents])


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


# -- the state machine ----------------------------------------------------------------------------


class Qcow2Writes(RuleBasedStateMachine):
    """Random operations on a qcow2 image (of QEMU's making, with or without a raw backing
    file) through the node and on a byte model; the image must agree with both QEMU and it."""

    def __init__(self) -> None:
        super().__init__()
        self.where = Path(os.environ["VBLK_QCOW2_MACHINE_DIR"])
        for leftover in self.where.iterdir():
            leftover.unlink()
        self.node: Qcow2Node | None = None
        self.model = bytearray()
        self.seed = 0

    @initialize(
        shape=st.sampled_from(
            [
                ("1.1", 4 * KiB, 16),
                ("1.1", 512, 16),  # the refcount table grows
                ("1.1", 64 * KiB, 16),
                ("1.1", 4 * KiB, 1),
                ("1.1", 512, 64),
                ("0.10", 4 * KiB, 16),
            ]
        ),
        backing=st.booleans(),
        compressed=st.booleans(),
    )
    def start(self, shape: tuple[str, int, int], backing: bool, compressed: bool) -> None:
        compat, cluster, refcount_bits = shape
        size = 3 * MiB + 1536  # the last cluster is partial
        image = self.where / "t.qcow2"
        options = f"compat={compat},cluster_size={cluster},refcount_bits={refcount_bits}"
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", options]
        if backing:
            base = self.where / "base.raw"
            base.write_bytes(pattern(1, 2 * MiB))  # shorter than the image
            argv += ["-b", "base.raw", "-F", "raw"]
        tool(*argv, self.where / "plain.qcow2", str(size))
        qemu_io(self.where / "plain.qcow2", "write -P 0x5a 256k 300k", "write -P 0x17 2900k 20k")
        if compressed:  # every cluster of QEMU's writes compressed
            convert = ["qemu-img", "convert", "-c", "-O", "qcow2", "-o", options]
            if backing:
                convert += ["-B", "base.raw", "-F", "raw"]
            tool(*convert, self.where / "plain.qcow2", image)
        else:
            (self.where / "plain.qcow2").rename(image)
        tool("qemu-img", "convert", "-O", "raw", image, self.where / "start.raw")
        self.model = bytearray((self.where / "start.raw").read_bytes())
        self.node = Qcow2Node.open(image, read_only=False)
        self.cluster = cluster

    def _range(self, data: st.DataObject, largest: int) -> tuple[int, int]:
        size = len(self.model)
        # Aligned to sectors, often to clusters, sometimes across many of them.
        unit = data.draw(st.sampled_from([512, self.cluster]))
        offset = data.draw(st.integers(0, (size - 512) // unit)) * unit
        length = data.draw(st.integers(1, max(1, min(largest, size - offset) // 512))) * 512
        return offset, min(length, size - offset)

    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        assert self.node is not None
        offset, length = self._range(data, 200 * KiB)
        self.seed += 1
        payload = pattern(self.seed, length)
        split = data.draw(st.integers(0, length // 512)) * 512  # two guest buffers
        self.node.write_now(offset, [memoryview(payload[:split]), memoryview(payload[split:])])
        self.model[offset : offset + length] = payload

    @rule(data=st.data(), unmap=st.booleans())
    def zero(self, data: st.DataObject, unmap: bool) -> None:
        assert self.node is not None
        offset, length = self._range(data, 400 * KiB)
        self.node.zero_now(offset, length, unmap)
        self.model[offset : offset + length] = bytes(length)

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        assert self.node is not None
        offset, length = self._range(data, 400 * KiB)
        self.node.discard_now(offset, length)
        self.model[offset : offset + length] = bytes(length)

    @rule()
    def flush(self) -> None:
        assert self.node is not None
        self.node.flush_now()

    @precondition(lambda self: self.node is not None)
    @rule(change=st.integers(-8, 8))
    def resize(self, change: int) -> None:
        assert self.node is not None
        new_size = max(512, len(self.model) + change * 64 * KiB + (512 if change % 2 else 0))
        self.node.resize(new_size)
        if new_size < len(self.model):
            del self.model[new_size:]
        else:
            self.model += bytes(new_size - len(self.model))

    @invariant()
    def reads_as_the_model(self) -> None:
        if self.node is None:
            return
        assert self.node.size == len(self.model)
        out = bytearray(len(self.model))
        self.node.read_now(0, [memoryview(out)])
        assert out == self.model

    def teardown(self) -> None:
        if self.node is None:
            return
        self.node.close()
        image = self.where / "t.qcow2"
        report = check(image)
        assert report.get("leaks", 0) == 0, report  # closed cleanly: nothing leaked
        compare(image, bytes(self.model), self.where)
        info = json.loads(tool("qemu-img", "info", "--output=json", image))
        assert info["virtual-size"] == len(self.model)
        again = Qcow2Node.open(image)
        try:
            assert node_map(again.extents(0, again.size)) == qemu_map(image)
        finally:
            again.close()


TestQcow2Writes = Qcow2Writes.TestCase
TestQcow2Writes.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
)


@pytest.fixture(autouse=True)
def _machine_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VBLK_QCOW2_MACHINE_DIR", str(tmp_path))


# -- what is written, as QEMU sees it -----------------------------------------------------------------


def test_create_image_makes_what_qemu_img_makes(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    create_image(base, 10 * MiB + 512, cluster_size=4 * KiB)
    top = tmp_path / "top.qcow2"
    create_image(top, 16 * MiB, backing="base.qcow2", backing_format="qcow2")
    small = tmp_path / "small.qcow2"
    create_image(small, 1 << 30, cluster_size=512, backing=str(base), backing_format="qcow2", version=2)
    infos = json.loads(tool("qemu-img", "info", "--output=json", "--backing-chain", top))
    assert [(i["format"], i["virtual-size"], i["cluster-size"]) for i in infos] == [
        ("qcow2", 16 * MiB, 64 * KiB),
        ("qcow2", 10 * MiB + 512, 4 * KiB),
    ]
    assert infos[0]["backing-filename"] == "base.qcow2" and infos[0]["backing-filename-format"] == "qcow2"
    specific = infos[0]["format-specific"]["data"]
    assert (specific["compat"], specific["refcount-bits"], specific["corrupt"]) == ("1.1", 16, False)
    assert (
        json.loads(tool("qemu-img", "info", "--output=json", small))["format-specific"]["data"]["compat"]
        == "0.10"
    )
    for image in (base, top, small):
        assert check(image).get("leaks", 0) == 0
    qemu_io(base, "write -P 0x61 1M 64k")
    qemu_io(top, "write -P 0x62 1056k 4k")
    node = Qcow2Node.open(top)
    try:
        out = bytearray(64 * KiB)
        node.read_now(MiB, [memoryview(out)])
        assert out == b"\x61" * 32 * KiB + b"\x62" * 4 * KiB + b"\x61" * 28 * KiB
    finally:
        node.close()
    with pytest.raises(ValueError, match="needs its format"):
        create_image(tmp_path / "x.qcow2", MiB, backing="base.qcow2")
    with pytest.raises(ValueError, match="power of two"):
        create_image(tmp_path / "x.qcow2", MiB, cluster_size=3000)
    with pytest.raises(FileExistsError):
        create_image(top, MiB)


def test_partial_writes_over_a_backing_file_copy_the_rest_of_the_cluster(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(7, 4 * MiB))
    image = tmp_path / "top.qcow2"
    create_image(image, 4 * MiB, backing="base.raw", backing_format="raw")
    node = Qcow2Node.open(image, read_only=False)
    model = bytearray(base.read_bytes())
    try:
        for offset, length in [(1000 * 512, 512), (64 * KiB + 4096, 8192), (3 * MiB - 512, 1024)]:
            payload = pattern(offset, length)
            node.write_now(offset, [memoryview(payload)])
            model[offset : offset + length] = payload
        node.flush_now()
    finally:
        node.close()
    compare(image, bytes(model), tmp_path)
    allocated = [e for e in json.loads(tool("qemu-img", "map", "--output=json", image)) if e["depth"] == 0]
    # Whole clusters, the rest of each copied from the backing file.
    assert [(e["start"], e["length"]) for e in allocated] == [
        (64 * KiB, 64 * KiB),
        (448 * KiB, 64 * KiB),
        (3 * MiB - 64 * KiB, 128 * KiB),
    ]
    assert check(image).get("leaks", 0) == 0


def test_writes_over_compressed_and_zero_clusters_free_what_they_replace(tmp_path: Path) -> None:
    plain = tmp_path / "plain.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", plain, "4M")
    qemu_io(plain, "write -P 0x33 0 4M")
    image = tmp_path / "c.qcow2"
    tool("qemu-img", "convert", "-c", "-O", "qcow2", plain, image)
    qemu_io(image, "write -z 1M 128k", "write -z -u 2M 64k")
    model = bytearray(b"\x33" * 4 * MiB)
    model[MiB : MiB + 128 * KiB] = bytes(128 * KiB)
    model[2 * MiB : 2 * MiB + 64 * KiB] = bytes(64 * KiB)
    node = Qcow2Node.open(image, read_only=False)
    try:
        for offset in range(0, 4 * MiB, 256 * KiB):  # partial writes into every kind of cluster
            node.write_now(offset + 512, [memoryview(b"\x44" * 4096)])
            model[offset + 512 : offset + 4608] = b"\x44" * 4096
        node.write_now(3 * MiB, [memoryview(b"\x55" * MiB)])  # whole clusters, replaced
        model[3 * MiB :] = b"\x55" * MiB
    finally:
        node.close()
    compare(image, bytes(model), tmp_path)
    report = check(image)
    assert report.get("leaks", 0) == 0 and report["compressed-clusters"] < 64


def test_zeroes_use_the_zero_flag_and_unmap_frees_clusters(tmp_path: Path) -> None:
    image = tmp_path / "z.qcow2"
    create_image(image, 4 * MiB)
    node = Qcow2Node.open(image, read_only=False)
    try:
        node.write_now(0, [memoryview(b"\x66" * 4 * MiB)])
        node.flush_now()
        node.zero_now(0, MiB, False)  # keeps its clusters
        node.zero_now(MiB, MiB, True)  # frees them
        node.discard_now(2 * MiB, MiB)
        node.zero_now(3 * MiB + 512, 1024, True)  # inside a cluster: written
        assert node.capabilities.fast_zero and not node.capabilities.read_only
    finally:
        node.close()
    entries = json.loads(tool("qemu-img", "map", "--output=json", image))
    runs = [(e["start"], e["length"], e["zero"], e["data"], "offset" in e) for e in entries]
    assert runs[0] == (0, MiB, True, False, True)  # zero flag, cluster kept
    assert (MiB, 2 * MiB, True, False, False) in runs  # zero or unallocated, no cluster
    report = check(image)
    assert report.get("leaks", 0) == 0 and report["allocated-clusters"] < 4 + 16 + 16 + 2
    model = bytearray(4 * MiB)
    model[3 * MiB :] = b"\x66" * MiB
    model[3 * MiB + 512 : 3 * MiB + 1536] = bytes(1024)
    compare(image, bytes(model), tmp_path)


def test_a_version_2_image_and_deep_refcount_widths(tmp_path: Path) -> None:
    for options in ("compat=0.10,cluster_size=4k", "refcount_bits=2,cluster_size=512", "refcount_bits=32"):
        image = tmp_path / "v.qcow2"
        tool("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, image, "6M")
        node = Qcow2Node.open(image, read_only=False)
        model = bytearray(6 * MiB)
        try:
            rng = random.Random(options)
            for n in range(60):
                offset = rng.randrange(0, 6 * MiB // 512) * 512
                length = min(6 * MiB - offset, rng.randrange(1, 256) * 512)
                if n % 4 == 3:
                    node.zero_now(offset, length, bool(n % 8 == 3))
                    model[offset : offset + length] = bytes(length)
                else:
                    node.write_now(offset, [memoryview(pattern(n, length))])
                    model[offset : offset + length] = pattern(n, length)
        finally:
            node.close()
        assert check(image).get("leaks", 0) == 0, options
        compare(image, bytes(model), tmp_path)
        image.unlink()


# -- images vblk must not write -------------------------------------------------------------------------


def _set_incompatible(image: Path, bits: int) -> None:
    data = bytearray(image.read_bytes())
    (features,) = struct.unpack_from(">Q", data, 72)
    struct.pack_into(">Q", data, 72, features | bits)
    image.write_bytes(data)


def test_dirty_images_and_internal_snapshots_are_refused_writable_served_read_only(
    tmp_path: Path,
) -> None:
    dirty = tmp_path / "dirty.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", dirty, "1M")
    _set_incompatible(dirty, 1)
    snap = tmp_path / "snap.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", snap, "1M")
    qemu_io(snap, "write -P 0x12 0 64k")
    tool("qemu-img", "snapshot", "-c", "s1", snap)
    for image, why in [(dirty, "dirty bit"), (snap, "internal snapshot")]:
        before = image.read_bytes()
        with pytest.raises(BlockError, match=why) as refused:
            Qcow2Node.open(image, read_only=False)
        assert refused.value.errno == errno.EROFS and "cannot be written" in str(refused.value)
        Qcow2Node.open(image).close()  # read-only: served
        assert image.read_bytes() == before  # untouched


def test_a_writer_that_never_stores_the_bitmaps_leaves_them_in_use(tmp_path: Path) -> None:
    image = tmp_path / "b.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", image, "4M")
    tool("qemu-img", "bitmap", "--add", image, "b0")
    assert struct.unpack_from(">Q", image.read_bytes(), 88)[0] & 1
    node = Qcow2Node.open(image, read_only=False)
    node.write_now(0, [memoryview(b"\x01" * 4096)])
    node.close()  # no store saved them: b0 may miss this write, so it stays in use
    assert struct.unpack_from(">Q", image.read_bytes(), 88)[0] == 1  # the extension still vouched for
    info = json.loads(tool("qemu-img", "info", "--output=json", image))
    bitmaps = info["format-specific"]["data"]["bitmaps"]
    assert [(b["name"], sorted(b["flags"])) for b in bitmaps] == [("b0", ["auto", "in-use"])]
    assert check(image)["check-errors"] == 0


@pytest.mark.expect_errors("qcow2_marked_corrupt")
def test_a_write_that_would_land_on_metadata_marks_the_image_corrupt(tmp_path: Path) -> None:
    image = tmp_path / "m.qcow2"
    create_image(image, 4 * MiB, cluster_size=4 * KiB)
    qemu_io(image, "write -P 0x21 0 8k")
    data = bytearray(image.read_bytes())
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", data, l2 + 8, (1 << 63) | l1_offset)  # guest cluster 1 -> the L1 table
    image.write_bytes(data)
    node = Qcow2Node.open(image, read_only=False)
    try:
        with pytest.raises(BlockError, match="marked corrupt") as stopped:
            node.write_now(4096, [memoryview(b"\xee" * 512)])
        assert stopped.value.errno == errno.EIO
        with pytest.raises(BlockError, match="marked corrupt"):
            node.write_now(0, [memoryview(b"\xee" * 512)])  # no more writes at all
        out = bytearray(4096)
        node.read_now(0, [memoryview(out)])  # reads go on
        assert out == b"\x21" * 4096
    finally:
        node.close()
    assert image.read_bytes()[l1_offset : l1_offset + 8] == data[l1_offset : l1_offset + 8]
    info = json.loads(tool("qemu-img", "info", "--output=json", image))
    assert info["format-specific"]["data"]["corrupt"] is True
    with pytest.raises(BlockError, match="marked corrupt"):
        Qcow2Node.open(image)


# -- power loss -------------------------------------------------------------------------------------------


class WriteLog:
    """A host file that records every write, size change and flush on the way to the file node
    (in the manner of dm-log-writes), for rebuilding the file as a power loss would leave it."""

    def __init__(self, file: FileNode) -> None:
        self.file = file
        self.path = file.path
        self.entries: list[tuple[str, int, bytes]] = []

    @property
    def size(self) -> int:
        return self.file.size

    @property
    def read_only(self) -> bool:
        return self.file.read_only

    def read_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.file.read_now(offset, buffers)

    def write_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.entries.append(("write", offset, b"".join(bytes(b) for b in buffers)))
        self.file.write_now(offset, buffers)

    def flush_now(self) -> None:
        self.file.flush_now()
        self.entries.append(("flush", 0, b""))

    def zero_now(self, offset: int, length: int, may_unmap: bool) -> None:
        self.entries.append(("write", offset, bytes(length)))
        self.file.zero_now(offset, length, may_unmap)

    def resize(self, new_size: int) -> None:
        self.entries.append(("size", new_size, b""))
        self.file.resize(new_size)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self.file.extents(offset, length)

    def close(self) -> None:
        self.file.close()


def _host_file(log: WriteLog) -> HostFile:
    return log


def _rebuild(initial: bytes, entries: list[tuple[str, int, bytes]]) -> bytes:
    data = bytearray(initial)
    for kind, offset, payload in entries:
        if kind == "write":
            if offset + len(payload) > len(data):
                data += bytes(offset + len(payload) - len(data))
            data[offset : offset + len(payload)] = payload
        elif kind == "size":
            if offset < len(data):
                del data[offset:]
            else:
                data += bytes(offset - len(data))
    return bytes(data)


@pytest.mark.parametrize(("cluster", "backing"), [(4 * KiB, True), (512, False), (64 * KiB, False)])
def test_a_power_loss_at_any_moment_corrupts_nothing_and_loses_no_flushed_write(
    tmp_path: Path, cluster: int, backing: bool
) -> None:
    size = 2 * MiB if cluster != 512 else 12 * MiB  # 512: past the refcount table's first cluster
    image = tmp_path / "p.qcow2"
    if backing:
        (tmp_path / "base.raw").write_bytes(pattern(3, size))
        create_image(image, size, cluster_size=cluster, backing="base.raw", backing_format="raw")
        model = bytearray((tmp_path / "base.raw").read_bytes())
    else:
        create_image(image, size, cluster_size=cluster)
        model = bytearray(size)
    initial = image.read_bytes()
    log = WriteLog(FileNode.open(image, any_size=True))
    node = Qcow2Node.open(image, read_only=False, file=_host_file(log), l2_cache_bytes=4 * cluster)
    rng = random.Random(cluster)
    # Guest operations: (log length when it completed, kind, offset, bytes or None for zeroes).
    done: list[tuple[int, str, int, bytes | None]] = []
    # (log length at the ack, operations done before it, contents)
    flushed: list[tuple[int, int, bytes]] = [(0, 0, bytes(model))]
    try:
        for n in range(160):
            choice = rng.random()
            offset = rng.randrange(0, size // 512) * 512
            length = min(size - offset, rng.choice([512, 4096, cluster, 3 * cluster + 512, 100 * KiB]))
            if choice < 0.6:
                payload = pattern(1000 + n, length)
                node.write_now(offset, [memoryview(payload)])
                model[offset : offset + length] = payload
                done.append((len(log.entries), "write", offset, payload))
            elif choice < 0.75:
                node.zero_now(offset, length, rng.random() < 0.5)
                model[offset : offset + length] = bytes(length)
                done.append((len(log.entries), "zero", offset, bytes(length)))
            elif choice < 0.85:
                node.discard_now(offset, length)
                model[offset : offset + length] = bytes(length)
                done.append((len(log.entries), "zero", offset, bytes(length)))
            else:
                node.flush_now()
                flushed.append((len(log.entries), len(done), bytes(model)))
    finally:
        node.close()
    entries = log.entries
    crash_points = sorted(set(rng.sample(range(len(entries) + 1), min(len(entries) + 1, 120))))
    checked = 0
    for point in crash_points:
        prefix = entries[:point]
        last_flush = max((i for i, e in enumerate(prefix) if e[0] == "flush"), default=-1)
        durable, after = prefix[: last_flush + 1], prefix[last_flush + 1 :]
        kept = [e for e in after if rng.random() < 0.5]  # what a disk cache may have kept
        rebuilt = tmp_path / "crashed.qcow2"
        rebuilt.write_bytes(_rebuild(initial, durable + kept))
        check(rebuilt)
        # The last FLUSH acknowledged before the durable part ended, and what may follow it.
        _, ops_before, contents = max((f for f in flushed if f[0] <= last_flush + 1), key=lambda f: f[1])
        later = done[ops_before:]
        crashed = Qcow2Node.open(rebuilt)
        try:
            seen = bytearray(crashed.size)
            crashed.read_now(0, [memoryview(seen)])
        finally:
            crashed.close()
        for sector in range(0, size, 512):
            now = bytes(seen[sector : sector + 512])
            if now == contents[sector : sector + 512]:
                continue
            candidates = [
                op[3][sector - op[2] : sector - op[2] + 512]
                for op in later
                if op[3] is not None and op[2] <= sector < op[2] + len(op[3])
            ]
            assert now in candidates, f"crash at log entry {point}: sector {sector} lost a flushed write"
        checked += 1
    assert checked == len(crash_points) and len(entries) > 200


# -- hostile images, written ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def writable_victim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("wvictim")
    plain = where / "plain.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", plain, "1M")
    qemu_io(plain, "write -P 0x11 0 64k", "write -P 0x22 512k 4k")
    image = where / "victim.qcow2"
    tool("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k", plain, image)
    qemu_io(image, "write -P 0x33 256k 8k", "write -z 128k 8k")
    return image


@pytest.mark.expect_errors("qcow2_marked_corrupt", "qcow2_close_failed")
@settings(
    max_examples=int(os.environ.get("VBLK_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    patches=st.lists(
        st.tuples(st.integers(0, 24 * 1024 - 1), st.binary(min_size=1, max_size=8)), min_size=1, max_size=10
    ),
    operations=st.lists(
        st.tuples(st.sampled_from(["write", "zero", "discard", "flush", "grow"]), st.integers(0, 2047)),
        min_size=1,
        max_size=12,
    ),
)
def test_writing_a_damaged_image_fails_requests_cleanly(
    tmp_path: Path,
    writable_victim: Path,
    patches: list[tuple[int, bytes]],
    operations: list[tuple[str, int]],
) -> None:
    data = bytearray(writable_victim.read_bytes())
    for at, patch in patches:
        data[at : at + len(patch)] = patch[: len(data) - at]
    image = tmp_path / "victim.qcow2"
    image.write_bytes(data)
    try:
        node = Qcow2Node.open(image, read_only=False)
    except BlockError as refused:
        assert refused.errno and str(refused)
        return
    if node.size == 0:  # a damaged virtual size of 0: nothing to write
        operations = [("flush", 0)]
    try:
        for kind, sector in operations:
            offset = min(sector * 512, node.size - 512)
            try:
                if kind == "write":
                    node.write_now(offset, [memoryview(b"\x77" * 4096)[: min(4096, node.size - offset)]])
                elif kind == "zero":
                    node.zero_now(offset, min(64 * KiB, node.size - offset), bool(sector & 1))
                elif kind == "discard":
                    node.discard_now(offset, min(8 * KiB, node.size - offset))
                elif kind == "flush":
                    node.flush_now()
                else:
                    node.resize(node.size + 64 * KiB)
            except BlockError as failed:
                assert failed.errno in (errno.EIO, errno.EFBIG), failed
    finally:
        try:
            node.close()
        except BlockError:
            pass
    assert image.stat().st_size < len(data) + 8 * MiB  # it never wrote far outside the image
