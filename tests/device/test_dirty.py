"""Dirty bitmaps at the device level: the bitmap against a model, the layer that marks them, and
the sidecar file that keeps a raw image's bitmaps across runs.

A :class:`Bitmap` is checked against a set of dirty chunk indexes by a hypothesis state machine
(marks, clears, merges across granularities, resizes; runs, dirty bytes and the bit array after
every step); :class:`DirtyLayer` over a memory node marks exactly what a change touches, before
it goes down, and never what a read does; :class:`SidecarStore` over a real file keeps the
qcow2 rule for ``in_use`` (a crash leaves the bitmaps inconsistent), never writes a read-only
disk's sidecar, and moves a damaged one aside.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import threading
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from device.block.bitmap_sidecar import SidecarStore, sidecar_path
from device.block.dirty import (
    MAX_GRANULARITY,
    Bitmap,
    BitmapError,
    BitmapRecord,
    DirtyLayer,
    bitmap_bytes,
    dirty_layer,
)
from device.block.faults import FaultLayer, FaultPlan
from device.block.file import FileNode
from device.block.memory import MemoryNode
from device.block.node import BlockError, BlockNode, Completion, Layer, blocking_call

KiB = 1 << 10
MiB = 1 << 20
SECTOR = 512

GRANULARITIES = st.sampled_from([512, 1024, 4096, 8192, 65536])
SECTORS = st.integers(0, 600)  # sizes up to 300 KiB: often not a multiple of the granularity


# -- the model --------------------------------------------------------------------------------------


def nbits(size: int, granularity: int) -> int:
    return -(-size // granularity)


def touched(offset: int, length: int, size: int, granularity: int) -> set[int]:
    """The chunks a mark of ``[offset, offset+length)`` sets (clipped to ``size``)."""
    if length <= 0 or offset >= size:
        return set()
    end = min(offset + length, size)
    return set(range(offset // granularity, (end - 1) // granularity + 1))


def model_runs(
    model: set[int], size: int, granularity: int, offset: int, length: int
) -> list[tuple[int, int, bool]]:
    """The runs the model says ``runs(offset, length)`` returns."""
    end = min(offset + length, size)
    out: list[tuple[int, int, bool]] = []
    if offset >= end:
        return out
    for chunk in range(offset // granularity, (end - 1) // granularity + 1):
        lo = max(chunk * granularity, offset)
        hi = min((chunk + 1) * granularity, end)
        dirty = chunk in model
        if out and out[-1][2] == dirty:
            start, run, _ = out[-1]
            out[-1] = (start, run + hi - lo, dirty)
        else:
            out.append((lo, hi - lo, dirty))
    return out


def model_dirty_bytes(model: set[int], size: int, granularity: int) -> int:
    return sum(min((chunk + 1) * granularity, size) - chunk * granularity for chunk in model)


def set_bits(bitmap: Bitmap) -> set[int]:
    """The chunks whose bit is set, read from the bit array itself (byte k bit j is chunk 8k+j)."""
    return {
        8 * index + bit
        for index, byte in enumerate(bytes(bitmap.bits))
        for bit in range(8)
        if byte >> bit & 1
    }


def check_against_model(bitmap: Bitmap, model: set[int]) -> None:
    size, granularity = bitmap.size, bitmap.granularity
    count = nbits(size, granularity)
    assert bitmap.nbits == count
    assert len(bitmap.bits) == bitmap_bytes(size, granularity)
    assert set_bits(bitmap) == model  # no bit set past the last chunk: the tail bits are zero
    if count % 8:
        assert bitmap.bits[-1] >> (count % 8) == 0
    runs = bitmap.runs(0, size)
    position = 0
    for index, (offset, length, dirty) in enumerate(runs):
        assert offset == position and length > 0
        if index:
            assert runs[index - 1][2] != dirty
        position += length
    assert position == size
    assert runs == model_runs(model, size, granularity, 0, size)
    assert bitmap.dirty_bytes() == model_dirty_bytes(model, size, granularity)


# -- 1. the bitmap against the model ----------------------------------------------------------------


class BitmapMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bitmap = Bitmap("m", 0, 512)
        self.model: set[int] = set()

    @initialize(granularity=GRANULARITIES, sectors=SECTORS)
    def start(self, granularity: int, sectors: int) -> None:
        self.bitmap = Bitmap("m", sectors * SECTOR, granularity)
        self.model = set()

    @rule(data=st.data())
    def mark(self, data: st.DataObject) -> None:
        size, granularity = self.bitmap.size, self.bitmap.granularity
        offset = data.draw(st.integers(0, size + 2 * granularity), label="offset")
        length = data.draw(
            st.integers(0, 3 * granularity) | st.integers(0, size + granularity), label="length"
        )
        self.bitmap.mark(offset, length)
        self.model |= touched(offset, length, size, granularity)

    @rule(data=st.data())
    def mark_chunks(self, data: st.DataObject) -> None:
        """Aligned marks, whole bytes of the bit array at a time as often as not."""
        size, granularity = self.bitmap.size, self.bitmap.granularity
        count = nbits(size, granularity)
        first = data.draw(st.integers(0, count), label="first chunk")
        chunks = data.draw(st.integers(0, count - first + 1), label="chunks")
        self.bitmap.mark(first * granularity, chunks * granularity)
        self.model |= touched(first * granularity, chunks * granularity, size, granularity)

    @rule()
    def clear(self) -> None:
        self.bitmap.clear()
        self.model = set()

    @rule(data=st.data(), granularity=GRANULARITIES)
    def merge(self, data: st.DataObject, granularity: int) -> None:
        size = self.bitmap.size
        source_size = data.draw(st.just(size) | SECTORS.map(lambda n: n * SECTOR), label="source size")
        source = Bitmap("s", source_size, granularity)
        source_model: set[int] = set()
        marks = data.draw(
            st.lists(
                st.tuples(st.integers(0, source_size + granularity), st.integers(0, source_size)), max_size=4
            ),
            label="source marks",
        )
        for offset, length in marks:
            source.mark(offset, length)
            source_model |= touched(offset, length, source_size, granularity)
        assert set_bits(source) == source_model
        before = bytes(source.bits)
        self.bitmap.merge_from(source)
        assert bytes(source.bits) == before  # the source keeps its bits
        for chunk in source_model:  # every target chunk a dirty source byte range overlaps
            lo = chunk * granularity
            hi = min(lo + granularity, source_size)
            self.model |= touched(lo, hi - lo, size, self.bitmap.granularity)

    @rule(sectors=SECTORS)
    def resize(self, sectors: int) -> None:
        size = sectors * SECTOR
        self.bitmap.resize(size)
        assert self.bitmap.size == size
        count = nbits(size, self.bitmap.granularity)
        self.model = {chunk for chunk in self.model if chunk < count}

    @rule(data=st.data())
    def window(self, data: st.DataObject) -> None:
        size, granularity = self.bitmap.size, self.bitmap.granularity
        offset = data.draw(st.integers(0, size + granularity), label="window offset")
        length = data.draw(st.integers(0, size + granularity), label="window length")
        assert self.bitmap.runs(offset, length) == model_runs(self.model, size, granularity, offset, length)

    @invariant()
    def matches_the_model(self) -> None:
        check_against_model(self.bitmap, self.model)

    @invariant()
    def its_record_round_trips(self) -> None:
        b = self.bitmap
        again = Bitmap(b.name, b.size, b.granularity, data=b.record().data)
        assert bytes(again.bits) == bytes(b.bits)
        assert again.runs(0, again.size) == b.runs(0, b.size)


TestBitmapMachine = settings(max_examples=60, stateful_step_count=25, deadline=None)(BitmapMachine).TestCase


def test_the_bit_order_is_the_qcow2_extensions_and_the_tail_bits_stay_zero() -> None:
    bitmap = Bitmap("order", 20 * SECTOR, 512)  # 20 chunks: 3 bytes, 4 tail bits
    bitmap.mark(9 * SECTOR + 100, 1)
    assert bytes(bitmap.bits) == b"\x00\x02\x00"  # chunk 9 is byte 1 bit 1
    bitmap.mark(0, 1)
    bitmap.mark(19 * SECTOR, 10 * SECTOR)  # past the end: clipped to the last chunk
    assert bytes(bitmap.bits) == b"\x01\x02\x08"
    loaded = Bitmap("order", 20 * SECTOR, 512, data=b"\x81\x00\xff")
    assert bytes(loaded.bits) == b"\x81\x00\x0f"  # the four tail bits cleared
    assert loaded.runs(0, loaded.size) == [
        (0, 512, True),
        (512, 6 * 512, False),
        (7 * 512, 512, True),
        (8 * 512, 8 * 512, False),
        (16 * 512, 4 * 512, True),
    ]
    assert loaded.dirty_bytes() == 6 * 512


def test_a_bitmap_larger_than_one_fill_block_marks_and_reads_every_chunk() -> None:
    """More than 4096 bytes of bits: the fill and the run search go through several blocks."""
    size = 512 * 8 * 9000 + 3 * 512
    bitmap = Bitmap("big", size, 512)
    model = touched(700, 512 * 70000, size, 512) | touched(size - 1, 1, size, 512)
    bitmap.mark(700, 512 * 70000)
    bitmap.mark(size - 1, 1)
    check_against_model(bitmap, model)
    bitmap.mark(0, size)
    check_against_model(bitmap, set(range(nbits(size, 512))))
    assert bitmap.runs(0, size) == [(0, size, True)]


def test_the_last_partial_chunk_counts_only_to_the_disks_end() -> None:
    bitmap = Bitmap("tail", 3 * SECTOR, 1024)  # chunk 1 is half a chunk
    bitmap.mark(3 * SECTOR - 1, 1)
    assert bitmap.dirty_bytes() == 512
    assert bitmap.runs(0, 10 * SECTOR) == [(0, 1024, False), (1024, 512, True)]
    bitmap.mark(0, 1)
    assert bitmap.dirty_bytes() == 3 * SECTOR


# -- 2. the record round trip -----------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(granularity=GRANULARITIES, sectors=SECTORS, data=st.data())
def test_a_record_round_trips_and_wrong_lengths_are_refused(
    granularity: int, sectors: int, data: st.DataObject
) -> None:
    size = sectors * SECTOR
    count = nbits(size, granularity)
    nbytes = bitmap_bytes(size, granularity)
    raw = data.draw(st.binary(min_size=nbytes, max_size=nbytes), label="bits")
    bitmap = Bitmap("r", size, granularity, enabled=False, data=raw)
    expected = {
        8 * i + j for i, byte in enumerate(raw) for j in range(8) if byte >> j & 1 and 8 * i + j < count
    }
    check_against_model(bitmap, expected)
    record = bitmap.record()
    assert (record.name, record.granularity, record.enabled, record.in_use) == (
        "r",
        granularity,
        False,
        False,
    )
    again = Bitmap("r", size, granularity, data=record.data)
    assert bytes(again.bits) == bytes(bitmap.bits) == record.data
    for wrong in (nbytes + 1, nbytes - 1):
        if wrong < 0:
            continue
        with pytest.raises(BitmapError) as refused:
            Bitmap("r", size, granularity, data=bytes(wrong))
        assert refused.value.errno == errno.EINVAL


def test_an_inconsistent_bitmap_keeps_in_use_in_its_record() -> None:
    bitmap = Bitmap("i", 8 * SECTOR, 512, inconsistent=True, data=b"\x05")
    assert bitmap.record() == BitmapRecord("i", 512, True, True, b"\x05")


# -- 3. the layer over a memory node ----------------------------------------------------------------


def write(node: BlockNode, offset: int, data: bytes, pieces: int = 1) -> None:
    """``data`` at ``offset`` in at most ``pieces`` buffers (each of at least one byte: a piece cut
    shorter than that would leave bytes unwritten)."""
    cut = -(-len(data) // pieces) if pieces > 1 else len(data)
    buffers = [memoryview(data[i : i + cut]) for i in range(0, len(data), cut or 1)] or [memoryview(b"")]
    blocking_call(node.writev, offset, buffers)


def read(node: BlockNode, offset: int, length: int) -> bytes:
    buffer = bytearray(length)
    blocking_call(node.readv, offset, [memoryview(buffer)])
    return bytes(buffer)


def errno_of(call: Callable[[], object]) -> int | None:
    with pytest.raises(BitmapError) as refused:
        call()
    return refused.value.errno


class MemoryStore:
    """A :class:`BitmapStore` in memory: what it loads, what it was told to save."""

    def __init__(self, records: Iterable[BitmapRecord] = (), refusal: str | None = None) -> None:
        self.records = list(records)
        self.saved: list[list[BitmapRecord]] = []
        self.refused = refusal
        self.fail: OSError | None = None
        self.on_save: Callable[[], None] | None = None

    @property
    def where(self) -> str:
        return "memory store"

    def refusal(self) -> str | None:
        return self.refused

    def load(self) -> list[BitmapRecord]:
        return list(self.records)

    def save(self, records: Sequence[BitmapRecord]) -> None:
        if self.on_save is not None:
            self.on_save()
        if self.fail is not None:
            raise self.fail
        self.saved.append(list(records))


class Probe(Layer):
    """Between the dirty layer and the storage: calls ``before_write`` as a change arrives, and
    remembers whether it was closed."""

    kind = "probe"

    def __init__(self, inner: BlockNode) -> None:
        super().__init__(inner)
        self.before_write: Callable[[int, int], None] | None = None
        self.closed = False

    def _arrived(self, offset: int, length: int) -> None:
        if self.before_write is not None:
            self.before_write(offset, length)

    def writev(self, offset: int, buffers: Sequence[memoryview], done: Completion) -> None:
        self._arrived(offset, sum(b.nbytes for b in buffers))
        super().writev(offset, buffers, done)

    def discard(self, offset: int, length: int, done: Completion) -> None:
        self._arrived(offset, length)
        super().discard(offset, length, done)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool, done: Completion) -> None:
        self._arrived(offset, length)
        super().write_zeroes(offset, length, may_unmap, done)

    def close(self) -> None:
        self.closed = True
        super().close()


LAYER_SIZE = 256 * KiB + 3 * SECTOR  # not a multiple of 4 KiB or 64 KiB
LAYER_GRANULARITIES = {"fine": 512, "page": 4096, "coarse": 65536}


@st.composite
def operations(draw: st.DrawFn) -> tuple[str, int, int, int]:
    kind = draw(st.sampled_from(["write", "write2", "discard", "zero", "zero_unmap", "read"]))
    offset = draw(
        st.integers(0, LAYER_SIZE - 1) | st.integers(0, LAYER_SIZE // SECTOR - 1).map(lambda n: n * SECTOR)
    )
    length = draw(st.integers(0, min(LAYER_SIZE - offset, 80 * KiB)))
    return kind, offset, length, draw(st.integers(1, 255))


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(operations(), max_size=12))
def test_the_layer_marks_exactly_what_changes_touch_and_passes_them_down(
    ops: list[tuple[str, int, int, int]],
) -> None:
    layer = DirtyLayer(MemoryNode(LAYER_SIZE))
    for name, granularity in LAYER_GRANULARITIES.items():
        layer.add(name, granularity)
    layer.add("off", 512, enabled=False)
    models: dict[str, set[int]] = {name: set() for name in layer.bitmaps}
    disk = bytearray(LAYER_SIZE)
    for kind, offset, length, seed in ops:
        if kind == "read":
            assert read(layer, offset, length) == disk[offset : offset + length]
            continue
        if kind.startswith("write"):
            data = bytes((seed + i) % 251 + 1 for i in range(length))
            write(layer, offset, data, pieces=2 if kind == "write2" else 1)
            disk[offset : offset + length] = data
        elif kind == "discard":
            blocking_call(layer.discard, offset, length)
            disk[offset : offset + length] = bytes(length)
        else:
            blocking_call(layer.write_zeroes, offset, length, kind == "zero_unmap")
            disk[offset : offset + length] = bytes(length)
        for name, granularity in LAYER_GRANULARITIES.items():
            models[name] |= touched(offset, length, LAYER_SIZE, granularity)
    for name, model in models.items():
        bitmap = layer.get(name)
        check_against_model(bitmap, model)
        assert layer.runs(name, 0, LAYER_SIZE) == model_runs(
            model, LAYER_SIZE, bitmap.granularity, 0, LAYER_SIZE
        )
    assert read(layer.inner, 0, LAYER_SIZE) == disk  # every change reached the storage


def test_reads_mark_nothing() -> None:
    layer = DirtyLayer(MemoryNode(MiB))
    bitmap = layer.add("b", 4096)
    read(layer, 0, MiB)
    read(layer, 4096 + 1, 3)
    assert set_bits(bitmap) == set()
    assert bitmap.dirty_bytes() == 0


def test_a_change_is_marked_before_it_goes_down_and_even_when_it_fails() -> None:
    memory = MemoryNode(MiB)
    plan = FaultPlan()
    probe = Probe(FaultLayer(memory, plan))
    layer = DirtyLayer(probe)
    bitmap = layer.add("b", 4096)
    seen: list[tuple[int, int, bool]] = []
    probe.before_write = lambda offset, length: seen.append(
        (offset, length, all(bitmap.bit(n) for n in touched(offset, length, MiB, 4096)))
    )
    write(layer, 8192, b"\x11" * 4096)
    blocking_call(layer.discard, 3 * 4096, 10)
    blocking_call(layer.write_zeroes, 5 * 4096, 4097, False)
    assert seen == [(8192, 4096, True), (3 * 4096, 10, True), (5 * 4096, 4097, True)]
    plan.write_errno = errno.EIO
    with pytest.raises(BlockError) as failed:
        write(layer, 20 * 4096, b"\x22" * 512)
    assert failed.value.errno == errno.EIO
    assert bitmap.bit(20)  # a failed write may have changed the disk: it counts
    assert set_bits(bitmap) == {2, 3, 5, 6, 20}


def test_a_disabled_bitmap_misses_writes_and_records_again_when_enabled() -> None:
    layer = DirtyLayer(MemoryNode(MiB))
    on = layer.add("on", 4096)
    off = layer.add("off", 4096, enabled=False)
    write(layer, 0, b"\x01" * 4096)
    assert set_bits(on) == {0} and set_bits(off) == set()
    layer.set_enabled("on", False)
    layer.set_enabled("off", True)
    write(layer, 4096, b"\x02" * 4096)
    assert set_bits(on) == {0} and set_bits(off) == {1}
    assert layer.counters() == {"bitmaps": 2, "bitmaps_recording": 1}
    assert read(layer, 0, 8192) == b"\x01" * 4096 + b"\x02" * 4096


def test_a_checkpoint_disables_what_was_recording_and_records_only_what_follows() -> None:
    layer = DirtyLayer(MemoryNode(MiB))
    a = layer.add("a", 4096)
    b = layer.add("b", 65536)
    c = layer.add("c", 4096, enabled=False)
    write(layer, 0, b"\xaa" * 512)
    generation = layer.generation
    b1, disabled = layer.checkpoint("b1", 4096)
    assert sorted(disabled) == ["a", "b"]
    assert layer.generation != generation
    assert not a.enabled and not b.enabled and not c.enabled and b1.enabled
    write(layer, 10 * 4096, b"\xbb" * 512)
    assert set_bits(b1) == {10}
    assert set_bits(a) == {0} and set_bits(b) == {0} and set_bits(c) == set()
    # a refused checkpoint changes nothing
    assert errno_of(lambda: layer.checkpoint("b1")) == errno.EEXIST
    assert b1.enabled
    b2, disabled = layer.checkpoint("b2", 512)
    assert disabled == ["b1"] and not b1.enabled
    write(layer, 0, b"\xcc" * 1024)
    assert set_bits(b2) == {0, 1} and set_bits(b1) == {10}
    assert read(layer, 0, 1024) == b"\xcc" * 1024
    assert read(layer, 10 * 4096, 512) == b"\xbb" * 512


def test_merge_ors_the_sources_into_the_target_which_keeps_its_bits() -> None:
    layer = DirtyLayer(MemoryNode(MiB))
    fine = layer.add("fine", 512)
    coarse = layer.add("coarse", 65536, enabled=False)
    page = layer.add("page", 4096, enabled=False)
    page.mark(5 * 4096, 1)  # the target's own bit
    write(layer, 70000, b"\x01" * 100)  # fine: chunk 136; coarse: not recording
    layer.set_enabled("coarse", True)
    write(layer, 3 * 65536 + 10, b"\x02")  # fine: chunk 384, coarse: chunk 3
    merged = layer.merge("page", ["fine", "coarse", "page"])
    assert merged is page
    assert set_bits(page) == {5, 70000 // 4096, *range(48, 64)}
    assert set_bits(fine) == {70000 // 512, (3 * 65536) // 512}
    assert set_bits(coarse) == {3}
    assert errno_of(lambda: layer.merge("page", ["fine", "nope"])) == errno.ENOENT
    assert errno_of(lambda: layer.merge("nope", ["fine"])) == errno.ENOENT
    assert set_bits(page) == {5, 70000 // 4096, *range(48, 64)}


def test_refusals_have_their_errno() -> None:
    layer = DirtyLayer(MemoryNode(MiB))
    layer.add("taken")
    for call, code in [
        (lambda: layer.get("nope"), errno.ENOENT),
        (lambda: layer.remove("nope"), errno.ENOENT),
        (lambda: layer.set_enabled("nope", True), errno.ENOENT),
        (lambda: layer.clear("nope"), errno.ENOENT),
        (lambda: layer.runs("nope", 0, 512), errno.ENOENT),
        (lambda: layer.add("taken"), errno.EEXIST),
        (lambda: layer.add("p", persistent=True), errno.ENOTSUP),  # no store
    ]:
        assert errno_of(call) == code
    assert isinstance(layer.persistence_refusal(), str)


@pytest.mark.parametrize(
    "name",
    ["", "a" * 1024, "é" * 512, "a/b", "/", "tab\there", "nul\x00", "del\x7f", "line\n", "zero\u200bwidth"],
)
def test_a_bad_name_is_refused(name: str) -> None:
    layer = DirtyLayer(MemoryNode(MiB))
    assert errno_of(lambda: layer.add(name)) == errno.EINVAL
    assert errno_of(lambda: layer.checkpoint(name)) == errno.EINVAL
    assert name not in layer.bitmaps


@pytest.mark.parametrize("name", ["a", "a" * 1023, "é" * 511 + "a", "backup 2024-01-01", "ünïcödé:1"])
def test_a_good_name_is_taken(name: str) -> None:
    layer = DirtyLayer(MemoryNode(MiB))
    assert layer.add(name).name == name
    assert layer.get(name).name == name


@pytest.mark.parametrize(
    "granularity", [0, -512, 256, 511, 513, 1000, 3 * 1024, 1 << 32, MAX_GRANULARITY + 512]
)
def test_a_bad_granularity_is_refused(granularity: int) -> None:
    layer = DirtyLayer(MemoryNode(MiB))
    assert errno_of(lambda: layer.add("g", granularity)) == errno.EINVAL
    assert errno_of(lambda: Bitmap("g", MiB, granularity)) == errno.EINVAL


@pytest.mark.parametrize("granularity", [512, 1024, 65536, MAX_GRANULARITY])
def test_a_power_of_two_granularity_in_range_is_taken(granularity: int) -> None:
    layer = DirtyLayer(MemoryNode(MiB))
    bitmap = layer.add("g", granularity)
    write(layer, MiB - 1, b"\x01")
    assert bitmap.bit((MiB - 1) // granularity)
    assert bitmap.dirty_bytes() == min(granularity, MiB)


def test_a_bitmap_too_large_for_memory_is_refused() -> None:
    layer = DirtyLayer(MemoryNode(1 << 43))  # sparse: costs nothing
    assert errno_of(lambda: layer.add("huge", 512)) == errno.ENOSPC
    assert "huge" not in layer.bitmaps
    assert layer.add("ok", 1 << 20).nbits == 1 << 23


def test_the_generation_changes_when_the_set_of_bitmaps_does() -> None:
    layer = DirtyLayer(MemoryNode(MiB))
    seen = [layer.generation]
    layer.add("a")
    seen.append(layer.generation)
    layer.add("b")
    seen.append(layer.generation)
    layer.remove("a")
    seen.append(layer.generation)
    layer.checkpoint("c")
    seen.append(layer.generation)
    assert len(set(seen)) == len(seen)
    assert sorted(layer.bitmaps) == ["b", "c"]
    assert layer.describe() == {"node": "dirty", "bitmaps": ["b", "c"]}


def test_clear_and_remove() -> None:
    layer = DirtyLayer(MemoryNode(MiB))
    bitmap = layer.add("b", 4096)
    write(layer, 0, b"\x01" * 8192)
    assert layer.clear("b") is bitmap and set_bits(bitmap) == set()
    write(layer, 4096 * 7, b"\x01")
    assert set_bits(bitmap) == {7}
    assert layer.remove("b") is bitmap
    assert errno_of(lambda: layer.get("b")) == errno.ENOENT
    write(layer, 0, b"\x03" * 4096)  # marks nothing, still written
    assert set_bits(bitmap) == {7}
    assert read(layer, 0, 4096) == b"\x03" * 4096


def test_resize_resizes_every_bitmap() -> None:
    memory = MemoryNode(MiB)
    layer = DirtyLayer(memory)
    bitmaps = [layer.add("a", 512), layer.add("b", 65536, enabled=False), layer.add("c", 1 << 20)]
    write(layer, MiB - 512, b"\x01" * 512)
    layer.resize(MiB + 3 * SECTOR)
    assert memory.size == layer.size == MiB + 3 * SECTOR
    for bitmap in bitmaps:
        assert bitmap.size == MiB + 3 * SECTOR
        assert len(bitmap.bits) == bitmap_bytes(MiB + 3 * SECTOR, bitmap.granularity)
    assert set_bits(bitmaps[0]) == {MiB // 512 - 1}  # the grown tail is clean
    assert set_bits(bitmaps[2]) == {0}
    write(layer, MiB + 2 * SECTOR, b"\x02" * 512)
    assert set_bits(bitmaps[0]) == {MiB // 512 - 1, MiB // 512 + 2}
    assert set_bits(bitmaps[2]) == {0, 1}
    layer.resize(MiB // 2)
    for bitmap in bitmaps:
        assert bitmap.size == MiB // 2
    assert set_bits(bitmaps[0]) == set() and set_bits(bitmaps[2]) == {0}
    layer.resize(MiB + 3 * SECTOR)  # the forgotten tail comes back clean
    assert set_bits(bitmaps[0]) == set() and set_bits(bitmaps[2]) == {0}


def test_dirty_layer_finds_the_layer_in_a_stack() -> None:
    layer = DirtyLayer(MemoryNode(MiB))
    assert dirty_layer(FaultLayer(layer)) is layer
    assert dirty_layer(MemoryNode(MiB)) is None


# -- loaded bitmaps: consistent, inconsistent, saved on close ---------------------------------------


def loaded_layer(
    records: Iterable[BitmapRecord], size: int = 64 * KiB
) -> tuple[DirtyLayer, MemoryStore, Probe]:
    store = MemoryStore(records)
    probe = Probe(MemoryNode(size))
    return DirtyLayer(probe, store), store, probe


def test_an_inconsistent_bitmap_is_kept_never_marked_and_can_only_be_removed() -> None:
    stale = BitmapRecord("stale", 4096, True, True, b"\x81\x00")  # 16 chunks of 64 KiB
    fresh = BitmapRecord("fresh", 4096, True, False, b"\x00\x01")
    layer, store, _ = loaded_layer([stale, fresh])
    bitmap = layer.bitmaps["stale"]
    assert bitmap.inconsistent and bitmap.persistent
    assert not layer.get("fresh").inconsistent and layer.get("fresh").persistent
    assert layer.get("stale", usable=False) is bitmap
    for call in [
        lambda: layer.get("stale"),
        lambda: layer.runs("stale", 0, 4096),
        lambda: layer.set_enabled("stale", False),
        lambda: layer.clear("stale"),
        lambda: layer.merge("stale", ["fresh"]),
        lambda: layer.merge("fresh", ["stale"]),
    ]:
        assert errno_of(call) == errno.EBUSY
    write(layer, 4096, b"\x55" * 4096)
    blocking_call(layer.discard, 2 * 4096, 4096)
    blocking_call(layer.write_zeroes, 3 * 4096, 4096, True)
    assert bytes(bitmap.bits) == b"\x81\x00"  # never marked
    assert set_bits(layer.get("fresh")) == {1, 2, 3, 8}
    assert read(layer, 4096, 4096) == b"\x55" * 4096
    assert bitmap.describe()["recording"] is False and bitmap.describe()["inconsistent"] is True
    layer.close()
    [saved] = store.saved
    assert saved == [stale, BitmapRecord("fresh", 4096, True, False, b"\x0e\x01")]  # stale as it was


def test_a_checkpoint_leaves_an_inconsistent_bitmap_alone() -> None:
    layer, _, _ = loaded_layer(
        [
            BitmapRecord("stale", 4096, True, True, b"\x01\x00"),
            BitmapRecord("fresh", 4096, True, False, bytes(2)),
        ]
    )
    new, disabled = layer.checkpoint("new", 4096)
    assert disabled == ["fresh"]
    write(layer, 5 * 4096, b"\x01")
    assert set_bits(new) == {5} and set_bits(layer.get("fresh")) == set()
    assert bytes(layer.bitmaps["stale"].bits) == b"\x01\x00"


def test_removing_an_inconsistent_bitmap_is_allowed() -> None:
    layer, store, _ = loaded_layer([BitmapRecord("stale", 4096, True, True, b"\xff\xff")])
    generation = layer.generation
    removed = layer.remove("stale")
    assert removed.inconsistent
    assert layer.generation != generation
    assert errno_of(lambda: layer.get("stale", usable=False)) == errno.ENOENT
    layer.close()
    assert store.saved == [[]]


def test_a_loaded_disabled_bitmap_is_not_marked() -> None:
    layer, _, _ = loaded_layer([BitmapRecord("off", 4096, False, False, bytes(2))])
    write(layer, 0, b"\x01" * 4096)
    assert set_bits(layer.get("off")) == set()
    assert layer.counters()["bitmaps_recording"] == 0


def test_close_saves_the_persistent_bitmaps_before_the_storage_closes() -> None:
    layer, store, probe = loaded_layer([])
    layer.add("transient", 4096)
    layer.add("persistent", 4096, persistent=True)
    write(layer, 0, b"\x01")
    closed_at_save: list[bool] = []
    store.on_save = lambda: closed_at_save.append(probe.closed)
    layer.close()
    assert closed_at_save == [False] and probe.closed
    [saved] = store.saved
    assert saved == [BitmapRecord("persistent", 4096, True, False, b"\x01\x00")]  # not the transient one


def test_a_failed_save_still_closes_the_storage() -> None:
    layer, store, probe = loaded_layer([BitmapRecord("p", 4096, True, False, bytes(2))])
    store.fail = OSError(errno.ENOSPC, "no space")
    layer.close()
    assert probe.closed


def test_a_store_that_refuses_is_never_saved_to_and_refuses_persistent_bitmaps() -> None:
    store = MemoryStore([BitmapRecord("p", 4096, True, False, bytes(2))], refusal="the disk is read-only")
    layer = DirtyLayer(MemoryNode(64 * KiB), store)
    assert layer.persistence_refusal() == "the disk is read-only"
    assert errno_of(lambda: layer.add("q", persistent=True)) == errno.ENOTSUP
    layer.close()
    assert store.saved == []


# -- 4. the sidecar store over a real file ----------------------------------------------------------

IMAGE_SIZE = MiB + 5 * SECTOR  # not a multiple of any granularity above 512


def some_bits(size: int, granularity: int, step: int) -> bytes:
    bitmap = Bitmap("x", size, granularity)
    for chunk in range(0, nbits(size, granularity), step):
        bitmap.mark(chunk * granularity, 1)
    bitmap.mark(size - 1, 1)
    return bytes(bitmap.bits)


def sidecar_document(image: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(sidecar_path(image).read_bytes())
    return document


def open_image(image: Path, *, read_only: bool = False) -> tuple[FileNode, SidecarStore]:
    node = FileNode.open(image, None if image.exists() else IMAGE_SIZE, read_only=read_only)
    return node, SidecarStore(image, node)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return tmp_path / "disk.img"


def records_for(size: int) -> list[BitmapRecord]:
    return [
        BitmapRecord("a", 512, True, False, some_bits(size, 512, 7)),
        BitmapRecord("b/loaded", 65536, False, False, some_bits(size, 65536, 3)),
    ]


def test_the_sidecar_round_trips_and_a_writable_load_marks_it_in_use(image: Path) -> None:
    node, store = open_image(image)
    assert store.load() == []
    assert not sidecar_path(image).exists()  # nothing to mark: nothing written
    assert store.refusal() is None and str(sidecar_path(image)) in store.where
    records = records_for(IMAGE_SIZE)
    store.save(records)
    assert not Path(str(sidecar_path(image)) + ".new").exists()
    document = sidecar_document(image)
    assert (document["format"], document["version"], document["image_size"]) == (
        "vblk-bitmaps",
        1,
        IMAGE_SIZE,
    )
    assert [entry["in_use"] for entry in document["bitmaps"]] == [False, False]
    node.close()

    node, store = open_image(image)
    assert store.load() == records  # as found: in use clear
    document = sidecar_document(image)
    assert [entry["in_use"] for entry in document["bitmaps"]] == [True, True]  # a crash from now on shows
    assert [zlib.decompress(base64.b64decode(entry["data"])) for entry in document["bitmaps"]] == [
        r.data for r in records
    ]
    node.close()  # a crash: never saved

    node, store = open_image(image)
    again = store.load()
    assert [r.in_use for r in again] == [True, True]
    assert [(r.name, r.granularity, r.enabled, r.data) for r in again] == [
        (r.name, r.granularity, r.enabled, r.data) for r in records
    ]
    store.save([])
    assert not sidecar_path(image).exists()
    store.save([])  # nothing to remove
    assert store.load() == []
    node.close()


def test_bitmaps_survive_a_clean_close_and_go_inconsistent_after_a_crash(image: Path) -> None:
    node, store = open_image(image)
    layer = DirtyLayer(node, store)
    kept = layer.add("kept", 4096, persistent=True)
    layer.add("transient", 4096)
    off = layer.add("off", 65536, persistent=True, enabled=False)
    write(layer, 4096 * 3 + 1, b"\x01" * 9000)
    write(layer, IMAGE_SIZE - 512, b"\x02" * 512)
    bits, runs = bytes(kept.bits), kept.runs(0, IMAGE_SIZE)
    off_bits = bytes(off.bits)
    layer.close()
    assert [(e["name"], e["in_use"]) for e in sidecar_document(image)["bitmaps"]] == [
        ("kept", False),
        ("off", False),
    ]

    node, store = open_image(image)
    layer = DirtyLayer(node, store)
    assert sorted(layer.bitmaps) == ["kept", "off"]
    kept = layer.get("kept")
    assert kept.persistent and not kept.inconsistent and kept.enabled
    assert bytes(kept.bits) == bits and layer.runs("kept", 0, IMAGE_SIZE) == runs
    assert bytes(layer.get("off").bits) == off_bits and not layer.get("off").enabled
    assert read(layer, 4096 * 3 + 1, 9000) == b"\x01" * 9000
    write(layer, 0, b"\x03")  # still recording
    assert kept.bit(0)
    node.close()  # a crash: the layer never closed

    node, store = open_image(image)
    layer = DirtyLayer(node, store)
    assert layer.bitmaps["kept"].inconsistent and layer.bitmaps["off"].inconsistent
    assert errno_of(lambda: layer.get("kept")) == errno.EBUSY
    layer.remove("kept")
    layer.close()
    assert [(e["name"], e["in_use"]) for e in sidecar_document(image)["bitmaps"]] == [("off", True)]


def test_a_read_only_disk_never_writes_its_sidecar(image: Path) -> None:
    node, store = open_image(image)
    records = records_for(IMAGE_SIZE)
    store.save(records)
    node.close()
    path = sidecar_path(image)
    before = path.read_bytes(), path.stat().st_mtime_ns

    node, store = open_image(image, read_only=True)
    refusal = store.refusal()
    assert isinstance(refusal, str) and "read-only" in refusal
    assert store.load() == records
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    with pytest.raises(BlockError) as refused:
        store.save([])
    assert refused.value.errno == errno.EROFS
    layer = DirtyLayer(node, store)
    assert sorted(layer.bitmaps) == ["a", "b/loaded"]
    assert not layer.get("a").inconsistent
    assert errno_of(lambda: layer.add("new", persistent=True)) == errno.ENOTSUP
    layer.add("transient", 512)
    layer.close()
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert sorted(p.name for p in image.parent.iterdir()) == ["disk.img", "disk.img.bitmaps"]


def test_a_read_only_disk_leaves_a_damaged_sidecar_where_it_is(image: Path) -> None:
    node, _ = open_image(image)
    node.close()
    path = sidecar_path(image)
    path.write_bytes(b"{damaged")
    before = path.stat().st_mtime_ns
    node, store = open_image(image, read_only=True)
    assert store.load() == []
    assert path.read_bytes() == b"{damaged" and path.stat().st_mtime_ns == before
    assert not Path(str(path) + ".damaged").exists()
    node.close()


def good_document(size: int = IMAGE_SIZE) -> dict[str, Any]:
    return {
        "format": "vblk-bitmaps",
        "version": 1,
        "image_size": size,
        "bitmaps": [
            {
                "name": "a",
                "granularity": 4096,
                "enabled": True,
                "in_use": False,
                "data": base64.b64encode(zlib.compress(bytes(bitmap_bytes(size, 4096)))).decode(),
            }
        ],
    }


def damaged(change: Callable[[dict[str, Any]], object]) -> bytes:
    document = good_document()
    change(document)
    return json.dumps(document).encode()


DAMAGES = {
    "not json": b"{not json",
    "binary": b"\xff\xfe\x00garbage",
    "empty": b"",
    "a list": b"[1, 2]",
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "another format": damaged(lambda d: d.update(format="qcow2")),
    "another version": damaged(lambda d: d.update(version=2)),
    "no bitmaps": damaged(lambda d: d.pop("bitmaps")),
    "bitmaps not a list": damaged(lambda d: d.update(bitmaps=7)),
    "an entry not an object": damaged(lambda d: d.update(bitmaps=["a"])),
    "no in_use": damaged(lambda d: d["bitmaps"][0].pop("in_use")),
    "bad base64": damaged(lambda d: d["bitmaps"][0].update(data="!!!")),
    "not zlib": damaged(lambda d: d["bitmaps"][0].update(data=base64.b64encode(b"plain").decode())),
    "short data": damaged(
        lambda d: d["bitmaps"][0].update(data=base64.b64encode(zlib.compress(b"\0")).decode())
    ),
    "bad granularity": damaged(lambda d: d["bitmaps"][0].update(granularity=1000)),
    "granularity a string": damaged(lambda d: d["bitmaps"][0].update(granularity="4096")),
    "empty name": damaged(lambda d: d["bitmaps"][0].update(name="")),
    "duplicate names": damaged(lambda d: d["bitmaps"].append(dict(d["bitmaps"][0]))),
}


@pytest.mark.parametrize("content", list(DAMAGES.values()), ids=list(DAMAGES))
def test_a_damaged_sidecar_is_moved_aside_on_a_writable_open(image: Path, content: bytes) -> None:
    node, _ = open_image(image)
    node.close()
    path = sidecar_path(image)
    path.write_bytes(content)
    node, store = open_image(image)
    try:
        assert store.load() == []
        assert not path.exists()
        assert Path(str(path) + ".damaged").read_bytes() == content
        layer = DirtyLayer(node, SidecarStore(image, node))
        assert layer.bitmaps == {}
        layer.add("new", persistent=True)
        layer.close()
        assert [e["name"] for e in sidecar_document(image)["bitmaps"]] == ["new"]
        assert Path(str(path) + ".damaged").read_bytes() == content
    finally:
        node.close()


def test_a_good_document_written_by_hand_loads(image: Path) -> None:
    """The damage cases above differ from this one only in what they damage."""
    node, _ = open_image(image)
    node.close()
    sidecar_path(image).write_bytes(json.dumps(good_document()).encode())
    node, store = open_image(image)
    [record] = store.load()
    assert record == BitmapRecord("a", 4096, True, False, bytes(bitmap_bytes(IMAGE_SIZE, 4096)))
    node.close()


@pytest.mark.parametrize("new_size", [IMAGE_SIZE + 64 * KiB + 512, IMAGE_SIZE - 3 * SECTOR, 4096 * 9])
def test_a_sidecar_for_another_image_size_loads_inconsistent(image: Path, new_size: int) -> None:
    node, store = open_image(image)
    records = [BitmapRecord("a", 512, True, False, some_bits(IMAGE_SIZE, 512, 1))]  # every chunk dirty
    store.save(records)
    node.close()
    os.truncate(image, new_size)  # resized behind vblk's back

    node, store = open_image(image)
    [record] = store.load()
    assert record.in_use and record.name == "a" and record.granularity == 512
    assert len(record.data) == bitmap_bytes(new_size, 512)
    document = sidecar_document(image)
    assert document["image_size"] == new_size and document["bitmaps"][0]["in_use"] is True
    node.close()

    node, store = open_image(image)
    layer = DirtyLayer(node, store)
    bitmap = layer.bitmaps["a"]
    assert bitmap.inconsistent and bitmap.size == new_size
    assert len(bitmap.bits) == bitmap_bytes(new_size, 512)
    count = nbits(new_size, 512)
    assert set_bits(bitmap) <= set(range(count))
    layer.close()


def test_a_resized_sidecars_record_keeps_its_tail_bits_zero(image: Path) -> None:
    """A record's data has its tail bits zero (BitmapRecord's rule), a shrunk one's too."""
    node, store = open_image(image)
    store.save([BitmapRecord("a", 512, True, False, some_bits(IMAGE_SIZE, 512, 1))])  # every chunk dirty
    node.close()
    os.truncate(image, 9 * SECTOR)  # 9 chunks: 2 bytes, 7 tail bits
    node, store = open_image(image)
    [record] = store.load()
    assert record.data == b"\xff\x01"
    node.close()


# -- 5. threads -------------------------------------------------------------------------------------


def test_threads_marking_disjoint_chunks_mark_every_chunk() -> None:
    chunks = 4096
    layer = DirtyLayer(MemoryNode(chunks * SECTOR))
    fine = layer.add("fine", 512)
    page = layer.add("page", 4096)
    start = threading.Barrier(4)
    failures: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            start.wait()
            for chunk in range(index, chunks, 4):  # neighbours share a byte of the bit array
                write(layer, chunk * SECTOR, bytes([index + 1]) * SECTOR)
        except BaseException as failed:
            failures.append(failed)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert set_bits(fine) == set(range(chunks))
    assert set_bits(page) == set(range(chunks * SECTOR // 4096))
    assert fine.runs(0, fine.size) == [(0, fine.size, True)]
    data = read(layer, 0, chunks * SECTOR)
    assert all(data[c * SECTOR] == c % 4 + 1 for c in range(chunks))
