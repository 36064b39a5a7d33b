"""The file node: a raw image in a sparse file, read and written with preadv/pwritev.

Block layer, a storage node (the bottom of a stack), vblk's embedded default. Blocking: every
operation is done when its call returns (inline on the event loop, or in a worker thread with
``io-mode thread``). FLUSH is fdatasync, DISCARD punches holes, WRITE_ZEROES uses
FALLOC_FL_ZERO_RANGE (or punches when it may unmap), and the allocation map comes from
SEEK_DATA/SEEK_HOLE. Opening an image takes QEMU's image locks (:mod:`device.block.locks`) for
as long as the descriptor is open.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from device.block.locks import lock_image, lock_mode
from device.block.node import BlockError, BlockingNode, Capabilities, Extent, as_block_error, check_access

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_ZERO_RANGE: Final = 0x10
ZERO_CHUNK: Final = 1 << 20
IOV_MAX: Final = 1024

_libc: Final = ctypes.CDLL(None, use_errno=True)
_fallocate: Final = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def _as_block_error() -> Iterator[None]:
    try:
        yield
    except BlockError:
        raise
    except OSError as exc:
        raise as_block_error(exc) from exc


_CAPABILITIES: Final = Capabilities(cache=True)
_CAPABILITIES_RO: Final = Capabilities(read_only=True, cache=True)


class FileNode(BlockingNode):
    """A raw disk image of ``size`` bytes (a multiple of 512) in a regular file."""

    kind = "file"

    def __init__(self, path: Path, fd: int, size: int, read_only: bool) -> None:
        super().__init__(size, read_only)
        self.path = path
        self._fd = fd
        # errno of a failed fdatasync: the kernel may have dropped the dirty pages and marked
        # them clean, so a later fdatasync could succeed without them. Every later flush fails.
        self._flush_errno: int | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        size: int | None = None,
        *,
        read_only: bool = False,
        create: bool = True,
        force_share: bool = False,
        any_size: bool = False,
    ) -> FileNode:
        """Open ``path``; create it sparse with ``size`` bytes if missing and ``create``.

        ``any_size``: an existing file of any non-zero size (a format node's host file, such as a
        qcow2 image, which may end mid-sector); else it must be a multiple of 512.

        The image is locked the way QEMU locks it (:mod:`device.block.locks`): no one else
        may write it while it is open, and a writable one is refused when someone else refuses
        writers; ``force_share`` (read-only only) reads it whoever writes it. A conflict raises
        :class:`~device.block.locks.ImageInUseError` (EBUSY).
        """
        path = Path(path)
        if size is not None and (size <= 0 or size % 512):
            raise ValueError(f"image size {size} is not a positive multiple of 512")
        mode = lock_mode(read_only, force_share)
        flags = os.O_CLOEXEC | (os.O_RDONLY if read_only else os.O_RDWR)
        if not path.exists():
            if not create or size is None:
                raise FileNotFoundError(errno.ENOENT, "image does not exist", str(path))
            if read_only:
                raise ValueError("cannot create a read-only image")
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                lock_image(fd, path, mode)
                os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                raise
            return cls(path, fd, size, read_only)
        fd = os.open(path, flags)
        try:
            lock_image(fd, path, mode)
        except OSError:
            os.close(fd)
            raise
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            os.close(fd)
            raise ValueError(f"{path} is not a regular file (an image is one)")
        actual = status.st_size
        if size is not None and size != actual:
            os.close(fd)
            raise ValueError(f"{path} is {actual} bytes, not the requested {size}")
        if (actual % 512 and not any_size) or actual == 0:
            os.close(fd)
            raise ValueError(f"{path} is {actual} bytes, not a positive multiple of 512")
        return cls(path, fd, actual, read_only)

    @property
    def capabilities(self) -> Capabilities:
        # fallocate(FALLOC_FL_ZERO_RANGE) zeroes without writing: extents marked unwritten.
        return _CAPABILITIES_RO if self._read_only else _CAPABILITIES

    @property
    def fd(self) -> int:
        return self._fd

    def describe(self) -> dict[str, Any]:
        return {"node": self.kind, "path": str(self.path), "size": self._size, "read_only": self._read_only}

    def _check(self, offset: int, length: int, write: bool) -> None:
        if offset >= 0 and length >= 0 and offset + length <= self._size and not (write and self._read_only):
            return  # the common case, without a call into interpreted code
        check_access(self.path, self._size, self._read_only, offset, length, write)

    # -- the data plane: done when the call returns -------------------------------------------------

    def discard_now(self, offset: int, length: int) -> None:
        self._check(offset, length, True)
        with _as_block_error():
            if length and not self._punch(offset, length):
                self._write_zero_bytes(offset, length)

    def zero_now(self, offset: int, length: int, may_unmap: bool) -> None:
        self._check(offset, length, True)
        if length:
            with _as_block_error():
                self._zero(offset, length, may_unmap)

    def read_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers`` from ``offset`` (short reads past EOF read as zeroes); raises BlockError."""
        total = buffers[0].nbytes if len(buffers) == 1 else sum(b.nbytes for b in buffers)
        self._check(offset, total, False)
        if len(buffers) <= IOV_MAX and os.preadv(self._fd, buffers, offset) == total:
            return  # the common case: one system call, no context manager
        # A short read (past EOF, or a signal): start over the slow, exact way.
        pending = [b.cast("B") if b.format != "B" else b for b in buffers]
        with _as_block_error():
            while pending:
                batch = pending[:IOV_MAX]
                n = os.preadv(self._fd, batch, offset)
                want = sum(b.nbytes for b in batch)
                if n == 0 and want:
                    for b in pending:  # past EOF reads as zeroes
                        b[:] = bytes(b.nbytes)
                    return
                offset += n
                pending = _advance(pending, n)

    def write_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Write ``buffers`` at ``offset``, completely; raises BlockError."""
        total = buffers[0].nbytes if len(buffers) == 1 else sum(b.nbytes for b in buffers)
        self._check(offset, total, True)
        if len(buffers) <= IOV_MAX and os.pwritev(self._fd, buffers, offset) == total:
            return
        # A short write (a full disk, a signal): write it all again the slow, exact way.
        pending = list(buffers)
        with _as_block_error():
            while pending:
                n = os.pwritev(self._fd, pending[:IOV_MAX], offset)
                if n == 0:
                    raise BlockError(errno.EIO, "pwritev wrote nothing")
                offset += n
                pending = _advance(pending, n)

    def flush_now(self) -> None:
        """fdatasync; once one failed, every later flush fails (the pages may be gone)."""
        if self._flush_errno is not None:
            raise BlockError(self._flush_errno, f"an earlier flush of {self.path} failed")
        try:
            os.fdatasync(self._fd)
        except OSError as failed:
            self._flush_errno = failed.errno or errno.EIO
            raise BlockError(self._flush_errno, failed.strerror or str(failed)) from failed

    def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        if may_unmap and self._punch(offset, length):
            return
        try:
            fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as unsupported:
            if unsupported.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        if self._punch(offset, length):
            return
        self._write_zero_bytes(offset, length)

    def _punch(self, offset: int, length: int) -> bool:
        try:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            return True
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                return False
            raise

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        zeroes = memoryview(bytes(min(length, ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            take = min(end - offset, len(zeroes))
            self.write_now(offset, [zeroes[:take]])
            offset += take

    # -- control plane ------------------------------------------------------------------------------

    def extents(self, offset: int, length: int) -> list[Extent]:
        self._check(offset, length, False)
        out: list[Extent] = []
        end = offset + length
        pos = offset
        with _as_block_error():
            while pos < end:
                try:
                    data = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    data = end  # no data after pos
                data = min(data, end)
                if data > pos:
                    out.append(Extent(pos, data - pos, hole=True, zero=True))
                    pos = data
                    continue
                hole = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
                out.append(Extent(pos, hole - pos, hole=False, zero=False))
                pos = hole
        return out

    def resize(self, new_size: int) -> None:
        if new_size <= 0 or new_size % 512:
            raise ValueError(f"size {new_size} is not a positive multiple of 512")
        if self._read_only:
            raise BlockError(errno.EROFS, f"{self.path} is read-only")
        with _as_block_error():
            os.ftruncate(self._fd, new_size)
        self._size = new_size

    def advise_willneed(self, offset: int, length: int) -> None:
        with _as_block_error():
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _advance(buffers: list[memoryview], n: int) -> list[memoryview]:
    """Drop ``n`` bytes from the front of a buffer list (no copying)."""
    i = 0
    while i < len(buffers) and n >= buffers[i].nbytes:
        n -= buffers[i].nbytes
        i += 1
    rest = buffers[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest
