"""Guest RAM: one region at a non-zero guest-physical base, shared by driver and device.

Device layer. Every access is bounds-checked by guest-physical address; views are zero-copy
memoryview slices of an mmap (backed by a memfd so another process could map it later).
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Final

from mypy_extensions import mypyc_attr

from device.platform import GuestMemoryError

DEFAULT_BASE: Final = 0x4000_0000  # 1 GiB: never 0, so that address bugs show
_U64_MAX: Final = (1 << 64) - 1
_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")


@mypyc_attr(allow_interpreted_subclasses=True)  # device.vhost_user subclasses it
class GuestMemory:
    """Guest RAM of ``size`` bytes at guest-physical ``base`` (both page aligned)."""

    def __init__(self, size: int, base: int = DEFAULT_BASE, *, memfd: bool = True) -> None:
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"guest memory size {size} is not a positive multiple of the page size")
        if base <= 0 or base % mmap.PAGESIZE or base + size - 1 > _U64_MAX:
            raise ValueError(f"guest memory base {base:#x} is not a non-zero page-aligned address")
        self._base = base
        self._size = size
        self._end = base + size
        self.fd: int | None = None
        if memfd:
            self.fd = os.memfd_create("vblk-guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
            self._mmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        else:
            self._mmap = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        #: The whole region; index it with ``gpa - base`` after :meth:`offset` checked the range.
        self.buffer = memoryview(self._mmap)

    @property
    def base(self) -> int:
        return self._base

    @property
    def size(self) -> int:
        return self._size

    @property
    def end(self) -> int:
        return self._end

    def contains(self, gpa: int, length: int) -> bool:
        """True if ``[gpa, gpa+length)`` lies inside guest RAM (no wrap-around, length >= 0)."""
        return length >= 0 and self._base <= gpa and gpa + length <= self._end

    def offset(self, gpa: int, length: int) -> int:
        """The buffer offset of ``[gpa, gpa+length)``, or GuestMemoryError if any byte is outside."""
        if length < 0 or gpa < self._base or gpa + length > self._end:
            raise GuestMemoryError(
                f"guest access [{gpa:#x}, +{length:#x}) outside RAM [{self._base:#x}, {self._end:#x})"
            )
        return gpa - self._base

    def view(self, gpa: int, length: int) -> memoryview:
        off = self.offset(gpa, length)
        return self.buffer[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        off = self.offset(gpa, length)
        return bytes(self.buffer[off : off + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data) if not isinstance(data, memoryview) else data.nbytes
        off = self.offset(gpa, length)
        self.buffer[off : off + length] = data

    def discard(self, gpa: int, length: int) -> None:
        off = self.offset(gpa, length)
        if off % mmap.PAGESIZE or length % mmap.PAGESIZE:
            raise ValueError(f"discard of [{gpa:#x}, +{length:#x}) is not page aligned")
        if length:
            # A shared memfd keeps its pages until they are punched out (MADV_REMOVE, which
            # another process mapping it sees too); private anonymous memory drops them.
            self._mmap.madvise(mmap.MADV_REMOVE if self.fd is not None else mmap.MADV_DONTNEED, off, length)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        off = self.offset(gpa, length)
        self._mmap[off : off + length] = bytes([byte]) * length

    def read_u16(self, gpa: int) -> int:
        return int(_U16.unpack_from(self.buffer, self.offset(gpa, 2))[0])

    def read_u32(self, gpa: int) -> int:
        return int(_U32.unpack_from(self.buffer, self.offset(gpa, 4))[0])

    def read_u64(self, gpa: int) -> int:
        return int(_U64.unpack_from(self.buffer, self.offset(gpa, 8))[0])

    def write_u16(self, gpa: int, value: int) -> None:
        _U16.pack_into(self.buffer, self.offset(gpa, 2), value)

    def write_u32(self, gpa: int, value: int) -> None:
        _U32.pack_into(self.buffer, self.offset(gpa, 4), value)

    def write_u64(self, gpa: int, value: int) -> None:
        _U64.pack_into(self.buffer, self.offset(gpa, 8), value)

    def close(self) -> None:
        """Unmap and close; views still alive keep the mapping until released."""
        try:
            self.buffer.release()
            self._mmap.close()
        except BufferError:
            pass  # live views (e.g. in-flight I/O) still reference it; the GC unmaps later
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
