"""Image locks QEMU understands: OFD byte-range locks on bytes 100-103 and 200-203 of an image.

Storage layer, beside :mod:`device.block.file`, which locks every image it opens, so qemu-nbd,
qemu-img, qemu-io and QEMU (whose block/file-posix.c defines the bytes) see vblk as one of their own.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import errno
import fcntl
import os
from typing import Final

from device.block.node import BlockError


class Perm(enum.IntFlag):
    """QEMU's block-layer permissions (``BLK_PERM_*``, include/block/block-common.h)."""

    #: a complete and self-consistent view of the contents
    CONSISTENT_READ = 0x01
    #: changing the visible contents
    WRITE = 0x02
    #: writes that leave the visible contents as they are
    WRITE_UNCHANGED = 0x04
    #: changing the size
    RESIZE = 0x08


# Byte 100 + i locked: "I hold permission i" (the BLK_PERM_* bit 1 << i); byte 200 + i locked: "I let
# no one else hold it". Every lock is a shared (read) lock, held as long as the open file description
# is (closing the image's descriptor releases them); a conflict is another description's lock on a
# byte, found with F_OFD_GETLK.

#: QEMU's BLK_PERM_ALL. 0x10 was BLK_PERM_GRAPH_MOD until QEMU 6.1 (bytes 104 and 204): QEMU
#: has neither locked nor tested those bytes since, and vblk leaves them alone too.
ALL_PERMS: Final = Perm(0x0F)
PERM_BASE: Final = 100  # RAW_LOCK_PERM_BASE in block/file-posix.c: permissions held
SHARED_BASE: Final = 200  # RAW_LOCK_SHARED_BASE: permissions not shared


@dataclasses.dataclass(frozen=True, slots=True)
class LockMode:
    """What a user of an image does (``perm``) and what it lets others do at the same time."""

    perm: Perm
    shared: Perm

    def locked_bytes(self) -> list[int]:
        """The bytes this user locks: its permissions, then those it does not share."""
        unshared = ALL_PERMS & ~self.shared
        return [PERM_BASE + i for i, p in _PERMS if self.perm & p] + [
            SHARED_BASE + i for i, p in _PERMS if unshared & p
        ]


_PERMS: Final = [(i, Perm(1 << i)) for i in range(ALL_PERMS.bit_length())]

#: A writable disk: reads and writes; others may read, not write (QEMU's virtio-blk disk without
#: share-rw), nor resize, which vblk would not notice (qemu-nbd does not share it either).
#: Locks bytes 100, 101, 201, 203.
WRITER: Final = LockMode(Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
#: A read-only disk: its guest needs the contents to stay as they are, so no one else may write or
#: resize them either (QEMU's read-only virtio-blk disk). Locks bytes 100, 201, 203.
READER: Final = LockMode(Perm.CONSISTENT_READ, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
#: force-share (and ``vblk info``): reads, whoever else writes (QEMU's force-share=on, qemu-img
#: -U). Locks byte 100 only.
SHARED_READER: Final = LockMode(Perm.CONSISTENT_READ, ALL_PERMS)

# What it means when another process holds one of the bytes we test.
_HELD: Final = {
    Perm.CONSISTENT_READ: "open for reading",
    Perm.WRITE: "open for writing",
    Perm.WRITE_UNCHANGED: "open for writing",
    Perm.RESIZE: "open for resizing",
}
_NOT_SHARED: Final = {
    Perm.CONSISTENT_READ: "it lets no one else read it",
    Perm.WRITE: "it lets no one else write it",
    Perm.WRITE_UNCHANGED: "it lets no one else write it",
    Perm.RESIZE: "it lets no one else resize it",
}


class ImageInUseError(BlockError):
    """Another process holds the image in a way that conflicts with how vblk would use it."""


def lock_mode(read_only: bool, force_share: bool) -> LockMode:
    """The locks for a disk: force-share is for read-only disks only, as in QEMU."""
    if force_share and not read_only:
        raise ValueError("force-share is for read-only disks: a writer must not ignore other writers")
    if force_share:
        return SHARED_READER
    return READER if read_only else WRITER


class _Flock(ctypes.Structure):
    """``struct flock`` (fcntl(2)); with F_OFD_* ``l_pid`` must be 0."""

    _fields_ = (
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64),
        ("l_pid", ctypes.c_int),
    )


def _fcntl(fd: int, command: int, lock_type: int, start: int, length: int) -> int:
    """One OFD lock call; the lock type the kernel answers (F_UNLCK: no conflict)."""
    request = _Flock(lock_type, os.SEEK_SET, start, length, 0)
    answer = fcntl.fcntl(fd, command, bytes(request))
    return int(_Flock.from_buffer_copy(answer).l_type)


def held_elsewhere(fd: int, byte: int) -> bool:
    """True if another open file description holds any lock on ``byte`` of ``fd``'s file."""
    return _fcntl(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte, 1) != fcntl.F_UNLCK


def lock_image(fd: int, path: object, mode: LockMode) -> None:
    """Lock ``fd``'s image for ``mode``, or raise :class:`ImageInUseError` (EBUSY) naming ``path``.

    First our bytes, then the test: no one else may hold what we do not share (bytes 100 + i),
    nor refuse to share what we take (bytes 200 + i). Locking before testing, as QEMU does, means
    that of two users opening at once at least one sees the other. On failure nothing stays locked.
    """
    try:
        for byte in mode.locked_bytes():
            try:
                _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte, 1)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise _in_use(path, mode, "locked exclusively", byte) from exc
        for i, p in _PERMS:
            if not mode.shared & p and held_elsewhere(fd, PERM_BASE + i):
                raise _in_use(path, mode, _HELD[p], PERM_BASE + i)
        for i, p in _PERMS:
            if mode.perm & p and held_elsewhere(fd, SHARED_BASE + i):
                raise _in_use(path, mode, _NOT_SHARED[p], SHARED_BASE + i)
    except ImageInUseError:
        _unlock(fd)
        raise
    except OSError as exc:  # ENOLCK, or a filesystem without byte-range locks
        _unlock(fd)
        code = exc.errno or errno.ENOLCK
        raise BlockError(code, f"cannot lock {path} as QEMU would: {os.strerror(code)}") from exc


def _unlock(fd: int) -> None:
    try:
        _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, PERM_BASE, SHARED_BASE + len(_PERMS) - PERM_BASE)
    except OSError:
        pass  # the caller closes fd, which releases them anyway


def _in_use(path: object, mode: LockMode, reason: str, byte: int) -> ImageInUseError:
    hint = "stop that process first"
    # A shared reader locks byte 100 and tests byte 200, nothing else.
    if mode is not SHARED_READER and byte not in (PERM_BASE, SHARED_BASE):
        hint += ", or serve the disk read-only with force-share to read it anyway"
    return ImageInUseError(
        errno.EBUSY, f"{path} is in use by another process ({reason}: QEMU lock byte {byte}); {hint}"
    )
