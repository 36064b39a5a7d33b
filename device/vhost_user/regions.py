"""Guest RAM as a vhost-user front end shares it: memfd regions mapped at their guest-physical addresses.

Device layer, under the back end's rings and request execution: a :class:`device.memory.GuestMemory`
whose bytes are the front end's regions, and the memory table's UVA → GPA translation.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
from collections.abc import Sequence

from device.memory import GuestMemory
from device.platform import GuestMemoryError
from device.spec import vhost_user as vu

PAGE = mmap.PAGESIZE
MAX_SPAN = 1 << 46  # guest-physical address space one memory table may cover (64 TiB)

_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
]
_MAP_FAILED = ctypes.c_void_p(-1).value


@dataclasses.dataclass(frozen=True, slots=True)
class _Span:
    """GPA-contiguous guest RAM (one region, or adjacent regions merged)."""

    start: int
    end: int


class RegionMemory(GuestMemory):
    """Guest RAM as a vhost-user front end shares it: up to eight regions, each an fd.

    Same accessors as :class:`GuestMemory` (the device's virtqueues and executor use them
    unchanged): ``buffer`` indexed by ``gpa - base``. The regions are mapped MAP_SHARED at
    their guest-physical offsets inside one reserved span, so the buffer is contiguous in
    guest-physical address space; gaps between regions are private zero pages that
    :meth:`contains` and :meth:`offset` refuse. :meth:`map_table` swaps in a new table in
    place (QEMU sends one per device start), so every holder of this object follows.
    """

    def __init__(self) -> None:  # no super().__init__: nothing is mapped until a table arrives
        self._base = 0
        self._size = 0
        self._end = 0
        self.fd = None
        self._mmap = mmap.mmap(-1, PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.buffer = memoryview(self._mmap)
        self.regions: tuple[vu.MemoryRegion, ...] = ()
        self._spans: tuple[_Span, ...] = ()
        self.generation = 0  # tables mapped so far

    @property
    def mapped(self) -> bool:
        return bool(self.regions)

    @property
    def sparse(self) -> bool:
        """Guest RAM has holes between its first and last byte."""
        return len(self._spans) > 1

    def contains(self, gpa: int, length: int) -> bool:
        if length < 0:
            return False
        end = gpa + length
        return any(span.start <= gpa and end <= span.end for span in self._spans)

    def offset(self, gpa: int, length: int) -> int:
        if not self.contains(gpa, length):
            raise GuestMemoryError(
                f"guest access [{gpa:#x}, +{length:#x}) outside the shared regions "
                + ", ".join(f"[{s.start:#x}, {s.end:#x})" for s in self._spans)
            )
        return gpa - self._base

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """Translate a front-end virtual address range (ring addresses) to guest-physical."""
        for region in self.regions:
            if region.userspace_addr <= uva and uva + length <= region.uva_end:
                return region.guest_phys_addr + (uva - region.userspace_addr)
        raise GuestMemoryError(f"front-end address [{uva:#x}, +{length:#x}) in no memory region")

    def map_table(self, regions: Sequence[vu.MemoryRegion], fds: Sequence[int]) -> None:
        """Map a memory table (the caller still owns and closes ``fds``)."""
        if not regions or len(regions) != len(fds):
            raise GuestMemoryError(f"{len(regions)} memory regions with {len(fds)} fds")
        ordered = sorted(zip(regions, fds, strict=True), key=lambda item: item[0].guest_phys_addr)
        previous_end = -1
        for region, fd in ordered:
            gpa, size, offset = region.guest_phys_addr, region.memory_size, region.mmap_offset
            if size <= 0 or gpa % PAGE or size % PAGE or offset % PAGE:
                raise GuestMemoryError(f"memory region {region} is empty or not page aligned")
            if region.gpa_end > 1 << 64 or region.uva_end > 1 << 64:
                raise GuestMemoryError(f"memory region {region} wraps around")
            if gpa < previous_end:
                raise GuestMemoryError(f"memory region {region} overlaps another")
            previous_end = region.gpa_end
            st_size = os.fstat(fd).st_size
            if offset + size > st_size:  # touching a page past EOF would be SIGBUS
                raise GuestMemoryError(f"memory region {region} goes past the end of its fd ({st_size})")
        low = ordered[0][0].guest_phys_addr
        high = ordered[-1][0].gpa_end
        if high - low > MAX_SPAN:
            raise GuestMemoryError(f"memory regions span {high - low:#x} bytes")
        reservation = mmap.mmap(
            -1,
            high - low,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
            mmap.PROT_READ | mmap.PROT_WRITE,
        )
        try:
            anchor = ctypes.c_char.from_buffer(reservation)
            address = ctypes.addressof(anchor)
            del anchor  # drop the buffer export, or the mmap could never be closed
            for region, fd in ordered:
                target = address + region.guest_phys_addr - low
                got = _libc.mmap(
                    target,
                    region.memory_size,
                    mmap.PROT_READ | mmap.PROT_WRITE,
                    mmap.MAP_SHARED | _MAP_FIXED,
                    fd,
                    region.mmap_offset,
                )
                if got in (None, _MAP_FAILED) or got != target:
                    err = ctypes.get_errno()
                    raise GuestMemoryError(f"cannot map memory region {region}: {os.strerror(err)}")
        except BaseException:
            reservation.close()
            raise
        spans: list[_Span] = []
        for region, _fd in ordered:
            if spans and spans[-1].end == region.guest_phys_addr:
                spans[-1] = _Span(spans[-1].start, region.gpa_end)
            else:
                spans.append(_Span(region.guest_phys_addr, region.gpa_end))
        self._release_mapping()
        self._mmap = reservation
        self.buffer = memoryview(reservation)
        self._base, self._end, self._size = low, high, high - low
        self.regions = tuple(region for region, _fd in ordered)
        self._spans = tuple(spans)
        self.generation += 1

    def unmap(self) -> None:
        """Forget the table (the front end went away)."""
        self._release_mapping()
        self._mmap = mmap.mmap(-1, PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.buffer = memoryview(self._mmap)
        self._base = self._end = self._size = 0
        self.regions = ()
        self._spans = ()

    def _release_mapping(self) -> None:
        try:
            self.buffer.release()
            self._mmap.close()
        except BufferError:
            pass  # views still alive (I/O in flight): the GC unmaps when they go

    def close(self) -> None:
        self._release_mapping()
