"""Storage backends (memory and raw file) against a bytearray model, plus the raw file's
sparseness, allocation map, read-only mode and flush-failure contract.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.block.file import FileNode
from device.block.memory import MemoryNode
from device.block.node import BlockError, BlockNode, Extent, blocking_call
from device.spec.virtio_blk import RequestType, Status
from tests.device.ring import WRITE, BlkBench, Desc, link

SECTOR = 512
KiB = 1024
MiB = 1 << 20


@contextmanager
def open_backend(kind: str, size: int) -> Iterator[BlockNode]:
    if kind == "memory":
        backend: BlockNode = MemoryNode(size)
        yield backend
        backend.close()
        return
    with tempfile.TemporaryDirectory() as tmp:
        backend = FileNode.open(Path(tmp) / "disk.img", size)
        try:
            yield backend
        finally:
            backend.close()


def read(backend: BlockNode, offset: int, length: int, cuts: list[int] | None = None) -> bytes:
    """Read through readv, into buffers cut at ``cuts`` (offsets into the range)."""
    out = bytearray(length)
    view = memoryview(out)
    bounds = sorted({c for c in cuts or [] if 0 < c < length} | {0, length})
    blocking_call(backend.readv, offset, [view[a:b] for a, b in itertools.pairwise(bounds)])
    return bytes(out)


def write(backend: BlockNode, offset: int, data: bytes, cuts: list[int] | None = None) -> None:
    view = memoryview(data)
    bounds = sorted({c for c in cuts or [] if 0 < c < len(data)} | {0, len(data)})
    blocking_call(backend.writev, offset, [view[a:b] for a, b in itertools.pairwise(bounds)])


def check_extents(extents: list[Extent], offset: int, length: int, model: bytes | bytearray) -> None:
    """Contiguous, in order, exactly covering the range, sector aligned; holes read zero."""
    pos = offset
    for extent in extents:
        assert extent.offset == pos and extent.length > 0
        assert extent.offset % SECTOR == 0 and extent.length % SECTOR == 0
        if extent.hole:
            assert extent.zero
        if extent.zero:
            assert not any(model[extent.offset : extent.offset + extent.length]), extent
        pos += extent.length
    assert pos == offset + length


# -- both backends against a model -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Op:
    """One backend call: ``a`` and ``b`` pick the range (or the new size) once the size is known."""

    name: str
    a: int
    b: int
    cuts: list[int]
    seed: int
    unmap: bool


operations = st.lists(
    st.builds(
        Op,
        name=st.sampled_from(["write", "read", "discard", "write_zeroes", "extents", "resize"]),
        a=st.integers(0, 1 << 16),
        b=st.integers(0, 1 << 16),
        cuts=st.lists(st.integers(1, 256 * KiB), max_size=4),
        seed=st.integers(0, 1 << 32),
        unmap=st.booleans(),
    ),
    max_size=14,
)


@pytest.mark.parametrize("kind", ["memory", "raw"])
@settings(max_examples=60, deadline=None)
@given(ops=operations)
def test_backend_behaves_like_a_bytearray(kind: str, ops: list[Op]) -> None:
    size = 512 * SECTOR  # four 64 KiB memory chunks, several file-system blocks
    model = bytearray(size)
    with open_backend(kind, size) as backend:
        for op in ops:
            if op.name == "resize":
                new_size = (1 + op.a % 1024) * SECTOR
                backend.resize(new_size)
                del model[new_size:]
                model.extend(bytes(new_size - len(model)))
                assert backend.size == new_size
                continue
            sectors = len(model) // SECTOR
            start = op.a % sectors
            offset, length = start * SECTOR, op.b % (sectors - start + 1) * SECTOR
            if op.name == "write":
                if not length:
                    continue
                data = random.Random(op.seed).randbytes(length)
                write(backend, offset, data, op.cuts)
                model[offset : offset + length] = data
            elif op.name == "read":
                assert read(backend, offset, length, op.cuts) == model[offset : offset + length]
            elif op.name == "discard":
                blocking_call(backend.discard, offset, length)
                model[offset : offset + length] = bytes(length)
            elif op.name == "write_zeroes":
                blocking_call(backend.write_zeroes, offset, length, op.unmap)
                model[offset : offset + length] = bytes(length)
            elif op.name == "extents" and length:
                check_extents(backend.extents(offset, length), offset, length, model)
        assert backend.size == len(model)
        assert read(backend, 0, len(model)) == model
        check_extents(backend.extents(0, len(model)), 0, len(model), model)


@pytest.mark.parametrize("kind", ["memory", "raw"])
@pytest.mark.parametrize(
    ("offset", "length"),
    [(64 * KiB, SECTOR), (64 * KiB - SECTOR, 2 * SECTOR), (-SECTOR, SECTOR), ((1 << 63), SECTOR)],
)
def test_out_of_range_access_is_refused(kind: str, offset: int, length: int) -> None:
    with open_backend(kind, 64 * KiB) as backend:
        calls: dict[str, Callable[[], object]] = {
            "readv": lambda: blocking_call(backend.readv, offset, [memoryview(bytearray(length))]),
            "writev": lambda: blocking_call(backend.writev, offset, [memoryview(b"\1" * length)]),
            "discard": lambda: blocking_call(backend.discard, offset, length),
            "write_zeroes": lambda: blocking_call(backend.write_zeroes, offset, length, True),
            "extents": lambda: backend.extents(offset, length),
        }
        for name, call in calls.items():
            with pytest.raises(BlockError) as info:
                call()
            assert info.value.errno == errno.EINVAL, name
        negatives: list[Callable[[], object]] = [
            lambda: blocking_call(backend.discard, 0, -SECTOR),
            lambda: blocking_call(backend.write_zeroes, 0, -SECTOR, False),
            lambda: backend.extents(0, -SECTOR),
        ]
        for negative in negatives:
            with pytest.raises(BlockError):
                negative()
        assert read(backend, 0, 64 * KiB) == bytes(64 * KiB)


@pytest.mark.parametrize("kind", ["memory", "raw"])
@pytest.mark.parametrize("cut", [100 * KiB, 128 * KiB, 192 * KiB + SECTOR])  # inside and at chunk ends
def test_resize_keeps_the_prefix_and_grows_with_zeroes(kind: str, cut: int) -> None:
    with open_backend(kind, 256 * KiB) as backend:
        data = random.Random(1).randbytes(256 * KiB)
        write(backend, 0, data)
        backend.resize(cut)
        assert backend.size == cut
        backend.resize(300 * KiB)
        assert read(backend, 0, 300 * KiB) == data[:cut] + bytes(300 * KiB - cut)
        assert not any(e.hole for e in backend.extents(0, cut))


# -- raw file specifics ----------------------------------------------------------------------


def test_raw_image_is_created_sparse(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    backend = FileNode.open(path, 256 * MiB)
    try:
        st_ = os.stat(path)
        assert st_.st_size == 256 * MiB
        assert st_.st_blocks * 512 <= 64 * KiB  # nothing allocated yet
        [extent] = backend.extents(0, 256 * MiB)
        assert extent == Extent(0, 256 * MiB, hole=True, zero=True)
        assert read(backend, 128 * MiB, 4 * KiB) == bytes(4 * KiB)
    finally:
        backend.close()


def test_raw_punched_hole_shows_as_a_hole_extent(tmp_path: Path) -> None:
    backend = FileNode.open(tmp_path / "disk.img", 4 * MiB)
    try:
        write(backend, 0, b"\xab" * MiB)
        assert backend.extents(0, MiB) == [Extent(0, MiB, hole=False, zero=False)]
        blocking_call(backend.discard, 256 * KiB, 256 * KiB)
        assert backend.extents(0, MiB) == [
            Extent(0, 256 * KiB, hole=False, zero=False),
            Extent(256 * KiB, 256 * KiB, hole=True, zero=True),
            Extent(512 * KiB, 512 * KiB, hole=False, zero=False),
        ]
        blocking_call(backend.write_zeroes, 768 * KiB, 128 * KiB, True)
        holes = [e for e in backend.extents(0, MiB) if e.hole]
        assert Extent(768 * KiB, 128 * KiB, hole=True, zero=True) in holes
        assert read(backend, 0, MiB) == (
            b"\xab" * (256 * KiB)
            + bytes(256 * KiB)
            + b"\xab" * (256 * KiB)
            + bytes(128 * KiB)
            + b"\xab" * (128 * KiB)
        )
        # A sub-block range inside data reads as zeroes after a discard.
        blocking_call(backend.discard, SECTOR, SECTOR)
        assert read(backend, 0, 3 * SECTOR) == b"\xab" * SECTOR + bytes(SECTOR) + b"\xab" * SECTOR
        # Extents of a range that starts and ends inside runs are clipped to it.
        extents = backend.extents(200 * KiB, 100 * KiB)
        assert extents[0].offset == 200 * KiB and sum(e.length for e in extents) == 100 * KiB
    finally:
        backend.close()


def test_raw_read_only_refuses_every_write_with_erofs(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    FileNode.open(path, MiB).close()
    with pytest.raises(ValueError, match="read-only"):
        FileNode.open(tmp_path / "new.img", MiB, read_only=True)
    backend = FileNode.open(path, read_only=True)
    try:
        assert backend.read_only and backend.size == MiB
        writes: list[Callable[[], object]] = [
            lambda: blocking_call(backend.writev, 0, [memoryview(b"\1" * SECTOR)]),
            lambda: blocking_call(backend.discard, 0, SECTOR),
            lambda: blocking_call(backend.write_zeroes, 0, SECTOR, False),
            lambda: backend.resize(2 * MiB),
        ]
        for call in writes:
            with pytest.raises(BlockError) as info:
                call()
            assert info.value.errno == errno.EROFS
        assert read(backend, 0, MiB) == bytes(MiB)
        blocking_call(backend.flush)  # nothing to make durable, and no error
    finally:
        backend.close()
    assert os.stat(path).st_size == MiB


def test_memory_read_only_refuses_every_write_with_erofs() -> None:
    backend = MemoryNode(MiB, read_only=True)
    writes: list[Callable[[], object]] = [
        lambda: blocking_call(backend.writev, 0, [memoryview(b"\1" * SECTOR)]),
        lambda: blocking_call(backend.discard, 0, SECTOR),
        lambda: blocking_call(backend.write_zeroes, 0, SECTOR, True),
        lambda: backend.resize(2 * MiB),
    ]
    for call in writes:
        with pytest.raises(BlockError) as info:
            call()
        assert info.value.errno == errno.EROFS


def test_raw_open_checks_the_image(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    with pytest.raises(FileNotFoundError):
        FileNode.open(path, MiB, create=False)
    with pytest.raises(ValueError):
        FileNode.open(path, 1000)  # not a multiple of 512
    FileNode.open(path, MiB).close()
    with pytest.raises(ValueError, match="not the requested"):
        FileNode.open(path, 2 * MiB)
    path.write_bytes(b"\0" * 1000)
    with pytest.raises(ValueError, match="multiple of 512"):
        FileNode.open(path)
    # A directory opens read-only as a file descriptor with a size, and every read would fail.
    with pytest.raises(ValueError, match="not a regular file"):
        FileNode.open(tmp_path, read_only=True, create=False)


def test_raw_flush_failure_is_reported_and_never_forgotten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed fdatasync the page cache may have dropped the dirty data and marked it
    clean, so a later fdatasync can succeed without it: every later flush must fail too."""
    backend = FileNode.open(tmp_path / "disk.img", MiB)
    try:
        write(backend, 0, b"\x77" * SECTOR)
        blocking_call(backend.flush)
        real_fdatasync = os.fdatasync

        def failing_fdatasync(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
        write(backend, SECTOR, b"\x78" * SECTOR)
        with pytest.raises(BlockError) as info:
            blocking_call(backend.flush)
        assert info.value.errno == errno.EIO
        monkeypatch.setattr(os, "fdatasync", real_fdatasync)
        for _ in range(2):
            with pytest.raises(BlockError) as info:
                blocking_call(backend.flush)
            assert info.value.errno == errno.EIO
    finally:
        backend.close()


async def test_flush_request_after_a_failed_fdatasync_keeps_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the device: a FLUSH is never acknowledged once an fdatasync has failed."""
    bench = BlkBench(backend=FileNode.open(tmp_path / "disk.img", MiB))
    bench.start()
    try:

        def flush() -> list[Desc]:
            return link([(bench.header(RequestType.FLUSH), 16, 0), (bench.buffer(1, 0xFF), 1, WRITE)])

        assert await bench.run(bench.out_chain(0, b"\x01" * SECTOR)) == (Status.OK, 1)
        assert await bench.run(flush()) == (Status.OK, 1)

        def failing_fdatasync(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        real_fdatasync = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
        assert await bench.run(bench.out_chain(1, b"\x02" * SECTOR)) == (Status.OK, 1)
        assert await bench.run(flush()) == (Status.IOERR, 1)
        monkeypatch.setattr(os, "fdatasync", real_fdatasync)
        assert await bench.run(flush()) == (Status.IOERR, 1)
    finally:
        bench.backend.close()
