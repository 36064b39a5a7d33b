"""virtio-blk: configuration space, request parsing (pure) and execution against a backend.

Device layer, on top of :mod:`device.virtio` and :mod:`device.virtqueue`, below the storage
backends. :func:`parse_request` turns a validated chain into a typed :class:`BlkRequest`;
:func:`execute` runs it and maps every failure to a status byte.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
from collections.abc import Callable
from typing import Final, Literal

import structlog
from mypy_extensions import mypyc_attr

from device.backends import AsyncBackend, Backend
from device.machine import Machine
from device.memory import GuestMemory
from device.spec import virtio_blk as vb
from device.spec.virtio import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC
from device.spec.virtio_blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)
from device.spec.virtio_pci import VIRTIO_ID_BLOCK
from device.virtio import VirtioDevice
from device.virtio_pci import VirtioPciFunction
from device.virtqueue import DescriptorChain, DeviceVirtqueue

log = structlog.get_logger("vblk.device.blk")


SECTOR: Final = vb.VIRTIO_BLK_SECTOR_SIZE
# Typed with what it returns (struct says Any), so compiled code uses the fields as integers.
_OUTHDR_UNPACK: Final[Callable[[memoryview, int], tuple[int, int, int]]] = vb.VIRTIO_BLK_OUTHDR.unpack_from
IoMode = Literal["inline", "thread"]


@dataclasses.dataclass(frozen=True, slots=True)
class BlkConfig:
    """How a virtio-blk device presents itself (the 96-byte config space and its features)."""

    serial: str = "vblk"
    num_queues: int = 1
    queue_size: int = 256
    size_max: int = 1 << 20  # bytes per segment
    seg_max: int | None = None  # default: queue_size - 2
    blk_size: int = 512
    physical_block_exp: int = 3  # 4 KiB physical blocks
    min_io_size: int = 8  # logical blocks
    opt_io_size: int = 0
    max_discard_sectors: int = 1 << 22
    max_discard_seg: int = 32
    max_write_zeroes_sectors: int = 1 << 22
    max_write_zeroes_seg: int = 32
    write_zeroes_may_unmap: bool = True
    writeback: bool = True
    read_only: bool = False
    io_mode: IoMode = "inline"
    io_threads: int = 4
    features_mask: int = (1 << 64) - 1  # clear bits to withhold features
    transitional: bool = False  # also serve legacy drivers (no VIRTIO_F_VERSION_1)

    def __post_init__(self) -> None:
        if self.blk_size < SECTOR or self.blk_size & (self.blk_size - 1):
            raise ValueError("blk_size must be a power of two >= 512")
        if self.queue_size < 4 or self.queue_size & (self.queue_size - 1):
            raise ValueError("queue_size must be a power of two >= 4")
        if self.size_max < self.blk_size:
            raise ValueError("size_max must be at least blk_size")
        if self.seg_max is not None and not 1 <= self.seg_max <= self.queue_size - 2:
            raise ValueError("seg_max must be in 1..queue_size-2")
        if len(self.serial.encode()) > vb.VIRTIO_BLK_ID_BYTES:
            raise ValueError("serial is at most 20 bytes")
        if self.io_mode not in ("inline", "thread"):
            raise ValueError("io_mode is inline or thread")

    @property
    def effective_seg_max(self) -> int:
        return self.seg_max if self.seg_max is not None else self.queue_size - 2


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


@dataclasses.dataclass(slots=True)
class ExecContext:
    """What :func:`execute` needs besides the request: the backend and the device's settings."""

    backend: Backend
    memory: GuestMemory
    serial: bytes
    writethrough: bool
    may_unmap: bool


def _log_io_error(request: BlkRequest, exc: OSError) -> None:
    log.warning(
        "virtio_blk_io_error",
        type=request.type,
        sector=request.sector,
        errno=exc.errno,
        error=exc.strerror or str(exc),
    )


def execute(request: BlkRequest, ctx: ExecContext) -> tuple[int, int]:
    """Run ``request``; returns its status and the bytes written into the chain (incl. status)."""
    status = request.status
    written = 0
    if status is None:
        try:
            written = _run(request, ctx)
            status = VIRTIO_BLK_S_OK
        except OSError as exc:
            _log_io_error(request, exc)
            status = VIRTIO_BLK_S_IOERR
            written = 0
    ctx.memory.buffer[request.status_addr - ctx.memory.base] = status
    return status, written + 1


def _run(request: BlkRequest, ctx: ExecContext) -> int:
    memory = ctx.memory
    backend = ctx.backend
    rtype = request.type
    if rtype == VIRTIO_BLK_T_IN:
        backend.readv(request.sector * SECTOR, [memory.view(a, n) for a, n in request.data])
        return request.data_len
    if rtype == VIRTIO_BLK_T_OUT:
        backend.writev(request.sector * SECTOR, [memory.view(a, n) for a, n in request.data])
        if ctx.writethrough:
            backend.flush()
        return 0
    if rtype == VIRTIO_BLK_T_FLUSH:
        backend.flush()
        return 0
    if rtype == VIRTIO_BLK_T_GET_ID:
        ident = ctx.serial.ljust(vb.VIRTIO_BLK_ID_BYTES, b"\0")
        written = 0
        for addr, length in request.data:
            take = min(length, len(ident) - written)
            memory.write(addr, ident[written : written + take])
            written += take
        return written
    for sector, num_sectors, flags in request.segments:
        if rtype == VIRTIO_BLK_T_DISCARD:
            backend.discard(sector * SECTOR, num_sectors * SECTOR)
        else:
            unmap = bool(flags & vb.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) and ctx.may_unmap
            backend.write_zeroes(sector * SECTOR, num_sectors * SECTOR, unmap)
    if ctx.writethrough:
        backend.flush()
    return 0


async def _run_async(request: BlkRequest, ctx: ExecContext, backend: AsyncBackend) -> int:
    """:func:`_run` against an :class:`AsyncBackend`: awaits each backend operation in turn."""
    memory = ctx.memory
    rtype = request.type
    if rtype == VIRTIO_BLK_T_IN:
        await backend.aio_readv(request.sector * SECTOR, [memory.view(a, n) for a, n in request.data])
        return request.data_len
    if rtype == VIRTIO_BLK_T_OUT:
        await backend.aio_writev(request.sector * SECTOR, [memory.view(a, n) for a, n in request.data])
    elif rtype == VIRTIO_BLK_T_GET_ID:
        return _run(request, ctx)
    elif rtype != VIRTIO_BLK_T_FLUSH:
        for sector, num_sectors, flags in request.segments:
            if rtype == VIRTIO_BLK_T_DISCARD:
                await backend.aio_discard(sector * SECTOR, num_sectors * SECTOR)
            else:
                unmap = bool(flags & vb.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) and ctx.may_unmap
                await backend.aio_write_zeroes(sector * SECTOR, num_sectors * SECTOR, unmap)
    if rtype == VIRTIO_BLK_T_FLUSH or ctx.writethrough:
        await backend.aio_flush()
    return 0


def _geometry(capacity: int) -> tuple[int, int, int]:
    """A CHS geometry for old tools: 16 heads, 63 sectors per track, cylinders clamped."""
    heads, sectors = 16, 63
    return min(capacity // (heads * sectors), 0xFFFF), heads, sectors


@mypyc_attr(allow_interpreted_subclasses=True)  # device.vhost_user subclasses it
class VirtioBlkDevice(VirtioDevice):
    """A virtio-blk device (device id 2) serving one backend."""

    device_id = VIRTIO_ID_BLOCK

    def __init__(self, memory: GuestMemory, backend: Backend, config: BlkConfig) -> None:
        self.backend = backend
        # An asynchronous backend is driven through its futures (io_mode does not apply).
        self._async_backend = backend if isinstance(backend, AsyncBackend) else None
        self._async_tasks: set[asyncio.Task[int]] = set()
        self.blk_config = config
        self.read_only = config.read_only or backend.read_only
        features = (
            1 << VIRTIO_F_INDIRECT_DESC
            | 1 << VIRTIO_F_EVENT_IDX
            | 1 << vb.VIRTIO_BLK_F_SIZE_MAX
            | 1 << vb.VIRTIO_BLK_F_SEG_MAX
            | 1 << vb.VIRTIO_BLK_F_GEOMETRY
            | 1 << vb.VIRTIO_BLK_F_BLK_SIZE
            | 1 << vb.VIRTIO_BLK_F_TOPOLOGY
            | 1 << vb.VIRTIO_BLK_F_FLUSH
            | 1 << vb.VIRTIO_BLK_F_CONFIG_WCE
            | 1 << vb.VIRTIO_BLK_F_MQ
            | 1 << vb.VIRTIO_BLK_F_DISCARD
            | 1 << vb.VIRTIO_BLK_F_WRITE_ZEROES
        )
        if self.read_only:
            features |= 1 << vb.VIRTIO_BLK_F_RO
        super().__init__(
            memory,
            num_queues=config.num_queues,
            queue_max_size=config.queue_size,
            device_features=features & config.features_mask,
            transitional=config.transitional,
        )
        self.writeback = int(config.writeback)
        self._requests: dict[int, dict[int, int]] = {}  # type -> status -> count
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: set[concurrent.futures.Future[tuple[int, int]]] = set()
        self._completions: list[tuple[DeviceVirtqueue, int, int, int]] = []
        self._completion_scheduled = False
        self._epoch = 0
        self._limits = self._make_limits()
        self._ctx = self._make_context()

    # -- configuration space ------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Capacity in 512-byte sectors."""
        return self.backend.size // SECTOR

    def config_bytes(self) -> bytes:
        cfg = self.blk_config
        cylinders, heads, sectors = _geometry(self.capacity)
        raw = bytearray(vb.VIRTIO_BLK_CONFIG_SIZE)
        vb.VIRTIO_BLK_CONFIG.pack_into(
            raw,
            0,
            self.capacity,
            cfg.size_max,
            cfg.effective_seg_max,
            cylinders,
            heads,
            sectors,
            cfg.blk_size,
            cfg.physical_block_exp,
            0,
            cfg.min_io_size,
            cfg.opt_io_size,
            self.writeback,
            len(self.queues),
            cfg.max_discard_sectors,
            cfg.max_discard_seg,
            cfg.blk_size // SECTOR,
            cfg.max_write_zeroes_sectors,
            cfg.max_write_zeroes_seg,
            int(cfg.write_zeroes_may_unmap),
        )
        return bytes(raw)

    def read_config(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > vb.VIRTIO_BLK_CONFIG_SIZE:
            return 0
        return int.from_bytes(self.config_bytes()[offset : offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        if offset == vb.VIRTIO_BLK_CFG_WRITEBACK and size == 1:
            if self.has_feature(vb.VIRTIO_BLK_F_CONFIG_WCE):
                self.writeback = 1 if value else 0
                self._ctx = self._make_context()

    def _make_limits(self) -> Limits:
        cfg = self.blk_config
        return Limits(
            capacity=self.capacity,
            read_only=self.read_only,
            flush=self.has_feature(vb.VIRTIO_BLK_F_FLUSH),
            discard=self.has_feature(vb.VIRTIO_BLK_F_DISCARD),
            write_zeroes=self.has_feature(vb.VIRTIO_BLK_F_WRITE_ZEROES),
            max_discard_sectors=cfg.max_discard_sectors,
            max_discard_seg=cfg.max_discard_seg,
            max_write_zeroes_sectors=cfg.max_write_zeroes_sectors,
            max_write_zeroes_seg=cfg.max_write_zeroes_seg,
            sector_alignment=cfg.blk_size // SECTOR,
        )

    def _make_context(self) -> ExecContext:
        # Without FLUSH negotiated the device must be write-through (5.2.6.2).
        writethrough = not (self.has_feature(vb.VIRTIO_BLK_F_FLUSH) and self.writeback)
        return ExecContext(
            backend=self.backend,
            memory=self.memory,
            serial=self.blk_config.serial.encode(),
            writethrough=writethrough,
            may_unmap=self.blk_config.write_zeroes_may_unmap,
        )

    # -- control plane ------------------------------------------------------------------------

    def resize(self, new_size: int) -> None:
        """Resize the backend and tell the driver through a configuration change interrupt."""
        if new_size <= 0 or new_size % self.blk_config.blk_size:
            raise ValueError(f"size {new_size} is not a positive multiple of the block size")
        self.backend.resize(new_size)
        self._limits = self._make_limits()
        self.config_changed()

    # -- lifecycle hooks ------------------------------------------------------------------------

    def on_driver_ok(self) -> None:
        if not self.has_feature(vb.VIRTIO_BLK_F_CONFIG_WCE):
            self.writeback = int(self.blk_config.writeback)
        self._limits = self._make_limits()
        self._ctx = self._make_context()
        if self.blk_config.io_mode == "thread" and self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.blk_config.io_threads, thread_name_prefix="vblk-io"
            )

    def on_reset(self) -> None:
        self._epoch += 1
        if self._async_backend is not None:
            self._async_backend.aio_drain()  # DMA in flight finishes before reset
            for task in self._async_tasks:
                task.cancel()  # a multi-step request starts nothing more
            self._async_tasks.clear()
        if self._pending:
            concurrent.futures.wait(list(self._pending))  # DMA in flight finishes before reset
            self._pending.clear()
        self._completions.clear()
        self.writeback = int(self.blk_config.writeback)

    def close(self) -> None:
        self.on_reset()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- the data path ------------------------------------------------------------------------

    def process_queue(self, queue: DeviceVirtqueue) -> None:
        memory = self.memory
        limits = self._limits
        inline = self._executor is None
        asynchronous = self._async_backend is not None
        pushed = False
        while True:
            chain = queue.pop()
            if chain is None:
                if queue.enable_notification():
                    continue
                break
            try:
                request = parse_request(chain, memory, limits)
            except RequestError as exc:
                self.device_error(f"queue {queue.index}: head {chain.head}: {exc}")
                return
            if asynchronous and request.status is None and request.type != VIRTIO_BLK_T_GET_ID:
                self._submit_async(queue, chain.head, request)
            elif inline or request.status is not None or asynchronous:
                status, written = execute(request, self._ctx)
                self._count(request.type, status)
                queue.push(chain.head, written)
                pushed = True
            else:
                self._submit(queue, chain.head, request)
        if pushed:
            self.interrupt_queue(queue)

    @property
    def requests(self) -> dict[tuple[int, int], int]:
        """Requests answered, by (type, status)."""
        return {(t, s): n for t, statuses in self._requests.items() for s, n in statuses.items()}

    def _count(self, rtype: int, status: int) -> None:
        statuses = self._requests.get(rtype)
        if statuses is None:
            statuses = self._requests[rtype] = {}
        statuses[status] = statuses.get(status, 0) + 1

    def _submit(self, queue: DeviceVirtqueue, head: int, request: BlkRequest) -> None:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        epoch = self._epoch
        future = self._executor.submit(execute, request, self._ctx)
        self._pending.add(future)

        def done(fut: concurrent.futures.Future[tuple[int, int]]) -> None:
            loop.call_soon_threadsafe(self._complete, fut, queue, head, request.type, epoch)

        future.add_done_callback(done)

    def _submit_async(self, queue: DeviceVirtqueue, head: int, request: BlkRequest) -> None:
        """Start ``request`` on the asynchronous backend; :meth:`_async_done` finishes it."""
        backend = self._async_backend
        assert backend is not None
        ctx = self._ctx
        rtype = request.type
        memory = self.memory
        written = 0
        future: asyncio.Future[None] | asyncio.Task[int]
        try:
            # The common requests are one backend operation: its future, no task.
            if rtype == VIRTIO_BLK_T_IN:
                views = [memory.view(a, n) for a, n in request.data]
                future = backend.aio_readv(request.sector * SECTOR, views)
                written = request.data_len
            elif rtype == VIRTIO_BLK_T_OUT and not ctx.writethrough:
                views = [memory.view(a, n) for a, n in request.data]
                future = backend.aio_writev(request.sector * SECTOR, views)
            elif rtype == VIRTIO_BLK_T_FLUSH:
                future = backend.aio_flush()
            else:
                task = asyncio.get_running_loop().create_task(_run_async(request, ctx, backend))
                self._async_tasks.add(task)
                future = task
        except OSError as exc:
            failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            future = failed
        future.add_done_callback(
            functools.partial(self._async_done, queue, head, request, self._epoch, written)
        )

    def _async_done(
        self,
        queue: DeviceVirtqueue,
        head: int,
        request: BlkRequest,
        epoch: int,
        written: int,
        future: asyncio.Future[None] | asyncio.Future[int],
    ) -> None:
        if isinstance(future, asyncio.Task):
            self._async_tasks.discard(future)
        if epoch != self._epoch or not self.driver_ok:
            return  # the device was reset meanwhile; the driver already failed this request
        exc = None if future.cancelled() else future.exception()
        if future.cancelled() or exc is not None:
            if isinstance(exc, OSError):
                _log_io_error(request, exc)
            else:
                log.error("virtio_blk_execute_failed", error=repr(exc))
            status, written = VIRTIO_BLK_S_IOERR, 0
        else:
            status = VIRTIO_BLK_S_OK
            result = future.result()
            if result is not None:
                written = result
        memory = self.memory
        memory.buffer[request.status_addr - memory.base] = status
        self._count(request.type, status)
        self._completions.append((queue, head, status, written + 1))
        if not self._completion_scheduled:
            self._completion_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_completions)

    def _complete(
        self,
        fut: concurrent.futures.Future[tuple[int, int]],
        queue: DeviceVirtqueue,
        head: int,
        rtype: int,
        epoch: int,
    ) -> None:
        self._pending.discard(fut)
        if epoch != self._epoch or not self.driver_ok:
            return  # the device was reset meanwhile; the driver already failed this request
        exc = fut.exception()
        if exc is not None:  # execute() maps OSError; anything else is a device bug
            log.error("virtio_blk_execute_failed", error=repr(exc))
            status, written = VIRTIO_BLK_S_IOERR, 1
        else:
            status, written = fut.result()
        self._count(rtype, status)
        self._completions.append((queue, head, status, written))
        if not self._completion_scheduled:
            self._completion_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_completions)

    def _flush_completions(self) -> None:
        self._completion_scheduled = False
        completions, self._completions = self._completions, []
        touched: dict[int, DeviceVirtqueue] = {}
        for queue, head, _status, written in completions:
            queue.push(head, written)
            touched[queue.index] = queue
        for queue in touched.values():
            self.interrupt_queue(queue)

    @property
    def inflight(self) -> int:
        return sum(len(q.inflight) for q in self.queues)


def plug_blk(machine: Machine, backend: Backend, config: BlkConfig | None = None) -> VirtioBlkDevice:
    """Create a virtio-blk device for ``backend`` and plug it into ``machine`` as a PCI function."""
    device = VirtioBlkDevice(machine.memory, backend, config or BlkConfig())
    machine.plug(VirtioPciFunction(device))
    return device
