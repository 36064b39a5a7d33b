"""virtio-blk requests, parsed: a validated chain becomes a typed :class:`BlkRequest`, purely.

Device layer, under :mod:`device.blk` (the device) and beside :mod:`device.blk_executor` (which
runs what this parses). Reads only the header and segment descriptors, never writes, and decides
every outcome that needs no storage (out of range, read-only, unsupported: VIRTIO 1.2 5.2.6).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Final

from device.memory import GuestMemory
from device.spec import virtio_blk as vb
from device.spec.virtio_blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)
from device.virtqueue import DescriptorChain

SECTOR: Final = vb.VIRTIO_BLK_SECTOR_SIZE
# Typed with what it returns (struct says Any), so compiled code uses the fields as integers.
_OUTHDR_UNPACK: Final[Callable[[memoryview, int], tuple[int, int, int]]] = vb.VIRTIO_BLK_OUTHDR.unpack_from


class RequestError(Exception):
    """A chain that cannot carry a virtio-blk request (no header or no status byte)."""


# One per request: __init__ written out (init=False), so that it is compiled like the rest
# of this module; the dataclass's generated methods run interpreted.
@dataclasses.dataclass(slots=True, init=False)
class BlkRequest:
    """A parsed virtio-blk request. ``status`` is set when parsing already decided the outcome."""

    type: int
    sector: int
    data: list[tuple[int, int]]
    data_len: int
    status_addr: int
    segments: list[tuple[int, int, int]]
    status: int | None

    def __init__(
        self, type: int, sector: int, data: list[tuple[int, int]], data_len: int, status_addr: int
    ) -> None:
        self.type = type
        self.sector = sector
        self.data = data
        self.data_len = data_len
        self.status_addr = status_addr
        self.segments = []
        self.status = None


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """What :func:`parse_request` checks a request against."""

    capacity: int  # sectors
    read_only: bool
    flush: bool
    discard: bool
    write_zeroes: bool
    max_discard_sectors: int
    max_discard_seg: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    sector_alignment: int  # in sectors (blk_size / 512)


def _skip(buffers: list[tuple[int, int]], skip: int) -> tuple[list[tuple[int, int]], int]:
    """The buffers after their first ``skip`` bytes, and the number of bytes left."""
    out: list[tuple[int, int]] = []
    total = 0
    for addr, length in buffers:
        if skip >= length:
            skip -= length
            continue
        out.append((addr + skip, length - skip))
        total += length - skip
        skip = 0
    return out, total


def _gather(memory: GuestMemory, buffers: list[tuple[int, int]], length: int) -> bytes:
    parts = []
    for addr, blen in buffers:
        take = min(blen, length)
        parts.append(memory.read(addr, take))
        length -= take
        if not length:
            break
    return b"".join(parts)


def _in_range(sector: int, sectors: int, capacity: int) -> bool:
    return sector <= capacity and sectors <= capacity - sector


def parse_request(chain: DescriptorChain, memory: GuestMemory, limits: Limits) -> BlkRequest:
    """Turn a validated chain into a request; raises RequestError if no status can be written.

    Reads only the header and segment descriptors; never writes.
    """
    readable = chain.readable
    if readable and readable[0][1] >= vb.VIRTIO_BLK_OUTHDR_SIZE:
        rtype, _ioprio, sector = _OUTHDR_UNPACK(
            memory.buffer, memory.offset(readable[0][0], vb.VIRTIO_BLK_OUTHDR_SIZE)
        )
    else:
        header = _gather(memory, readable, vb.VIRTIO_BLK_OUTHDR_SIZE)
        if len(header) < vb.VIRTIO_BLK_OUTHDR_SIZE:
            raise RequestError(f"request header of {len(header)} bytes, need 16")
        rtype, _ioprio, sector = vb.VIRTIO_BLK_OUTHDR.unpack(header)
    writable = chain.writable
    while writable and writable[-1][1] == 0:
        writable = writable[:-1]
    if not writable:
        raise RequestError("request without a writable status byte")
    last_addr, last_len = writable[-1]
    status_addr = last_addr + last_len - 1
    if rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID):
        data = writable[:-1]
        if last_len > 1:
            data = [*data, (last_addr, last_len - 1)]
        data_len = data[0][1] if len(data) == 1 else sum(length for _, length in data)
    elif rtype in (VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        data, data_len = _skip(readable, vb.VIRTIO_BLK_OUTHDR_SIZE)
    else:
        data, data_len = [], 0
    request = BlkRequest(rtype, sector, data, data_len, status_addr)
    request.status = _check(request, memory, limits)
    return request


def _check(request: BlkRequest, memory: GuestMemory, limits: Limits) -> int | None:
    rtype = request.type
    if rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
        if rtype == VIRTIO_BLK_T_OUT and limits.read_only:
            return VIRTIO_BLK_S_IOERR
        if request.data_len % SECTOR:
            return VIRTIO_BLK_S_IOERR
        if not _in_range(request.sector, request.data_len // SECTOR, limits.capacity):
            return VIRTIO_BLK_S_IOERR
        return None
    if rtype == VIRTIO_BLK_T_FLUSH:
        return None if limits.flush else VIRTIO_BLK_S_UNSUPP
    if rtype == VIRTIO_BLK_T_GET_ID:
        return None
    if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        discard = rtype == VIRTIO_BLK_T_DISCARD
        if not (limits.discard if discard else limits.write_zeroes):
            return VIRTIO_BLK_S_UNSUPP
        if limits.read_only:
            return VIRTIO_BLK_S_IOERR
        seg_size = vb.VIRTIO_BLK_DISCARD_WRITE_ZEROES_SIZE
        max_seg = limits.max_discard_seg if discard else limits.max_write_zeroes_seg
        max_sectors = limits.max_discard_sectors if discard else limits.max_write_zeroes_sectors
        if request.data_len == 0 or request.data_len % seg_size:
            return VIRTIO_BLK_S_IOERR
        if request.data_len // seg_size > max_seg:
            return VIRTIO_BLK_S_IOERR
        raw = _gather(memory, request.data, request.data_len)
        allowed_flags = 0 if discard else vb.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        for seg_sector, num_sectors, flags in vb.VIRTIO_BLK_DISCARD_WRITE_ZEROES.iter_unpack(raw):
            if flags & ~allowed_flags:
                return VIRTIO_BLK_S_UNSUPP
            if num_sectors > max_sectors or not _in_range(seg_sector, num_sectors, limits.capacity):
                return VIRTIO_BLK_S_IOERR
            if seg_sector % limits.sector_alignment or num_sectors % limits.sector_alignment:
                return VIRTIO_BLK_S_IOERR
            request.segments.append((seg_sector, num_sectors, flags))
        return None
    return VIRTIO_BLK_S_UNSUPP
