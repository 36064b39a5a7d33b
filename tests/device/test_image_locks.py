"""QEMU's image locks on raw images (device/block/locks.py), against the real qemu-nbd, qemu-img
and qemu-io in both directions: one writer at a time, readers share, force-share reads anyway.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.block.file import FileNode
from device.block.locks import (
    PERM_BASE,
    READER,
    SHARED_BASE,
    SHARED_READER,
    WRITER,
    ImageInUseError,
    lock_mode,
)
from tests.qemu import locked_bytes, qemu_nbd, qemu_nbd_refusal
from tests.service.conftest import run

MiB = 1 << 20
SIZE = 4 * MiB
# QEMU 7.2's file-posix: bytes 100-103 say "I hold permission i", 200-203 "I do not share it".
QEMU_BYTES = set(range(PERM_BASE, PERM_BASE + 4)) | set(range(SHARED_BASE, SHARED_BASE + 4))
WRITE_LOCKED = 'Failed to get "write" lock'  # QEMU: someone else does not share writing
SHARED_WRITE_LOCKED = 'Failed to get shared "write" lock'  # QEMU: someone else writes


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
    return path


def opened(image: Path, **options: bool) -> FileNode:
    return FileNode.open(image, **options)


@pytest.fixture
def backends() -> Iterator[list[FileNode]]:
    """Backends a test opens, closed at its end whatever happens."""
    held: list[FileNode] = []
    yield held
    for backend in held:
        backend.close()


async def qemu_img_convert(image: Path, *options: str, check: bool = False) -> tuple[int, str]:
    """``qemu-img convert`` reads the image as its source (consistent read, refusing writers)."""
    copy = str(image) + ".copy"
    result = await run(
        "qemu-img", "convert", *options, "-f", "raw", "-O", "raw", str(image), copy, check=check
    )
    return result.returncode, result.stderr


async def qemu_io_write(image: Path) -> tuple[int, str]:
    result = await run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 4k", str(image), check=False)
    return result.returncode, result.stderr + result.stdout


def test_vblk_locks_the_bytes_qemu_reads(image: Path) -> None:
    assert lock_mode(read_only=False, force_share=False) is WRITER
    assert lock_mode(read_only=True, force_share=False) is READER
    assert lock_mode(read_only=True, force_share=True) is SHARED_READER
    with pytest.raises(ValueError, match="read-only"):
        lock_mode(read_only=False, force_share=True)
    for options, expected in (
        ({}, {100, 101, 201, 203}),  # CONSISTENT_READ and WRITE held; WRITE and RESIZE not shared
        ({"read_only": True}, {100, 201, 203}),
        ({"read_only": True, "force_share": True}, {100}),
    ):
        backend = opened(image, **options)
        try:
            assert locked_bytes(image) == dict.fromkeys(expected, "READ"), options
        finally:
            backend.close()
        assert locked_bytes(image) == {}, "closing the descriptor releases every lock"


async def test_qemu_nbd_locks_where_vblk_looks(image: Path) -> None:
    """QEMU's writer holds byte 101 (WRITE), its reader only 100; all of it in QEMU's two ranges."""
    async with qemu_nbd(image):
        held = locked_bytes(image)
        assert {100, 101} <= set(held) <= QEMU_BYTES and set(held.values()) == {"READ"}, held
    async with qemu_nbd(image, "-r"):
        held = locked_bytes(image)
        assert 100 in held and 101 not in held and set(held) <= QEMU_BYTES, held


async def test_vblk_refuses_an_image_qemu_nbd_writes(image: Path) -> None:
    async with qemu_nbd(image) as server:
        qemus = locked_bytes(image)
        for options in ({}, {"read_only": True}):
            with pytest.raises(ImageInUseError) as info:
                opened(image, **options)
            assert info.value.errno == errno.EBUSY
            message = info.value.strerror
            assert message is not None
            assert message.startswith(f"{image} is in use by another process (open for writing"), message
            assert "force-share" in message
            assert locked_bytes(image) == qemus, "a refused open leaves nothing locked"
        # force-share reads it anyway, and sees what qemu-nbd's client wrote.
        await run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", server.uri)
        backend = opened(image, read_only=True, force_share=True)
        try:
            buffer = bytearray(65536)
            backend.read_now(0, [memoryview(buffer)])
            assert buffer == b"\x5a" * 65536
        finally:
            backend.close()


async def test_qemu_refuses_an_image_vblk_writes(image: Path) -> None:
    backend = opened(image)
    try:
        assert WRITE_LOCKED in await qemu_nbd_refusal(image)
        code, out = await qemu_io_write(image)
        assert code != 0 and WRITE_LOCKED in out, out
        code, err = await qemu_img_convert(image)
        assert code != 0 and SHARED_WRITE_LOCKED in err, err
        resize = await run("qemu-img", "resize", "-f", "raw", str(image), "8M", check=False)
        assert resize.returncode != 0 and "lock" in resize.stderr, resize.stderr
        assert image.stat().st_size == SIZE
        # What QEMU lets through: -U (force-share), and qemu-nbd -r, which shares writing.
        assert (await qemu_img_convert(image, "-U"))[0] == 0
        async with qemu_nbd(image, "-r"):
            pass
    finally:
        backend.close()
    # Closed: the locks went with the descriptor.
    assert locked_bytes(image) == {}
    assert (await qemu_img_convert(image))[0] == 0
    assert (await qemu_io_write(image))[0] == 0
    async with qemu_nbd(image):
        pass


async def test_readers_share(image: Path, backends: list[FileNode]) -> None:
    async with qemu_nbd(image, "-r"):  # a QEMU reader first, then vblk
        backends.append(opened(image, read_only=True))
    async with qemu_nbd(image, "-r"):  # and the other way round, with a second vblk reader
        backends.append(opened(image, read_only=True))
        assert set(locked_bytes(image)) >= {100, 201, 203}
        assert (await qemu_img_convert(image))[0] == 0
        assert (await run("qemu-img", "info", "-U", str(image))).returncode == 0
        info = await run("qemu-img", "info", "--output=json", str(image))
        assert json.loads(info.stdout)["format"] == "raw"
    # A read-only disk refuses writers: its guest must see the contents stay as they are.
    assert WRITE_LOCKED in await qemu_nbd_refusal(image)
    code, out = await qemu_io_write(image)
    assert code != 0 and WRITE_LOCKED in out, out
    with pytest.raises(ImageInUseError, match=r"it lets no one else write it: QEMU lock byte 201"):
        opened(image)


async def test_force_share_reads_beside_writers(image: Path, backends: list[FileNode]) -> None:
    with pytest.raises(ValueError, match="read-only"):
        opened(image, force_share=True)
    backends.append(opened(image, read_only=True, force_share=True))
    async with qemu_nbd(image):  # a force-share reader does not refuse writers
        backends.append(opened(image, read_only=True, force_share=True))
    backends.append(opened(image))  # nor vblk's own
    assert locked_bytes(image) == dict.fromkeys({100, 101, 201, 203}, "READ")


def test_two_vblk_writers(image: Path, backends: list[FileNode]) -> None:
    first = opened(image)
    for options in ({}, {"read_only": True}):  # another writer, or a reader that refuses writers
        with pytest.raises(ImageInUseError, match=r"\(open for writing: QEMU lock byte 101\)"):
            opened(image, **options)
    first.close()
    backends.append(opened(image))


def test_an_exclusive_lock_refuses_all_but_what_it_leaves(image: Path) -> None:
    """QEMU takes only shared locks; another program's exclusive one on a byte vblk locks refuses."""
    fd = os.open(image, os.O_RDWR)
    try:  # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 203, 1, 0))
        with pytest.raises(ImageInUseError, match=r"locked exclusively: QEMU lock byte 203"):
            opened(image)
        assert set(locked_bytes(image)) == {203}
        opened(image, read_only=True, force_share=True).close()  # byte 100 only
    finally:
        os.close(fd)


async def test_a_new_image_is_locked_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "new.img"
    backend = FileNode.open(path, SIZE)
    try:
        assert set(locked_bytes(path)) == {100, 101, 201, 203}
        assert WRITE_LOCKED in await qemu_nbd_refusal(path)
    finally:
        backend.close()
