"""vblk's virtio-blk device model as a vhost-user back end (QEMU docs/interop/vhost-user.rst).

Device layer, beside :mod:`device.virtio_pci`: another transport for the same
:class:`device.blk.VirtioBlkDevice`, the same device-side virtqueues and the same request
execution. Here the guest is a real one: QEMU (the front end) shares the guest's RAM as
memfd regions received with SCM_RIGHTS, which :class:`RegionMemory` maps and translates
through the memory table; guest kicks arrive on eventfds and interrupts leave on eventfds.

Memory ordering. The guest runs on a QEMU vCPU thread while this process touches the same
rings, so program order alone is not enough. How each ordering is ensured (x86-64, TSO):

* 16-bit ring fields are read and written with one aligned 2-byte access, single-copy
  atomic on x86: loads through ``struct``'s little-endian ``H`` (a native 2-byte memcpy on a
  little-endian host), stores through :func:`device.platform.store_u16` (a memoryview cast
  to ``H``). Not ``struct.pack_into``: it clears the field before writing it, so a reader on
  another CPU can see the used index at 0 in between (tests/device/test_ring_stores.py).
* Avail index, then avail ring entry, then descriptors (load → load): TSO never reorders
  loads with loads, so entries read after the index are at least as new as the index.
* Used element, then used index (store → store): TSO keeps stores in order, so the guest
  never sees the index before the element.
* Used index, then ``used_event`` / ``NO_INTERRUPT`` (store → load) and ``avail_event``, then
  the avail-index re-check (store → load): the only reordering TSO allows. Each such pair has
  a full barrier between them (:func:`device.platform.memory_barrier`, a LOCK-prefixed
  read-modify-write), the device's half of the Dekker handshake whose guest half is Linux's
  ``virtio_mb()``; without it a completion or a kick could be lost and the guest would hang.
* Call and kick eventfd writes are system calls whose wake-up paths take locks, so every
  ring store before them is visible before the other side wakes up.

VIRTIO_F_EVENT_IDX is offered: with the two barriers above its notification suppression is
the same handshake QEMU's own device does (``virtio_split_should_notify``).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import dataclasses
import mmap
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from device.blk import BlkConfig, VirtioBlkDevice
from device.block.node import BlockNode, awaited
from device.memory import GuestMemory
from device.platform import GuestMemoryError, memory_barrier
from device.spec import vhost_user as vu
from device.spec.virtio import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_LEGACY_VRING_ALIGN,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
    vring_used_offset,
)
from device.spec.virtio_blk import VIRTIO_BLK_CFG_WRITEBACK
from device.virtqueue import DescriptorChain, DeviceVirtqueue, VirtqueueError

log = structlog.get_logger("vblk.device.vhost_user")

PAGE = mmap.PAGESIZE
MAX_SPAN = 1 << 46  # guest-physical address space one memory table may cover (64 TiB)
OFFERED_PROTOCOL_FEATURES = vu.protocol_mask(
    vu.ProtocolFeature.MQ, vu.ProtocolFeature.REPLY_ACK, vu.ProtocolFeature.CONFIG
)
DEFAULT_QUEUE_SIZE = 128  # QEMU's vhost-user-blk queue-size default

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


# ------------------------------------------------------------------------------------ memory


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


# ---------------------------------------------------------------------------------- device


class VhostUserVirtqueue(DeviceVirtqueue):
    """A device virtqueue on rings shared with a guest on other CPUs.

    Adds the full barriers of the store → load handshakes, and, when guest RAM has holes,
    checks every buffer against the regions (the base class checks the outer bounds only).
    """

    def __init__(self, memory: GuestMemory, index: int, max_size: int) -> None:
        super().__init__(memory, index, max_size)
        self.barrier = memory_barrier

    def pop(self) -> DescriptorChain | None:
        chain = super().pop()
        memory = self.memory
        if chain is not None and isinstance(memory, RegionMemory) and memory.sparse:
            for addr, length in (*chain.readable, *chain.writable):
                if not memory.contains(addr, length):
                    raise VirtqueueError(
                        f"queue {self.index}: buffer [{addr:#x}, +{length:#x}) outside guest RAM"
                    )
        return chain


class VhostUserBlkDevice(VirtioBlkDevice):
    """The virtio-blk device model on vhost-user virtqueues."""

    queue_type = VhostUserVirtqueue


# -------------------------------------------------------------------------------- protocol


@dataclasses.dataclass(slots=True)
class Ring:
    """What the front end told us about one virtqueue (kept across device starts)."""

    index: int
    num: int = 0
    base: int = 0
    addr: vu.VringAddr | None = None
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    enabled: bool = False
    started: bool = False
    kicks: int = 0
    calls: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class RingStart:
    """One ring start, as the device saw it (for logs and tests)."""

    index: int
    features: int
    legacy: bool
    legacy_layout: bool  # desc page aligned, avail right after it, used on the next 4 KiB
    size: int
    base: int
    desc: int  # guest-physical
    avail: int
    used: int


class VhostUserBlk:
    """One virtio-blk device served to vhost-user front ends, one connection at a time.

    :meth:`handle` takes a message and returns the reply bytes (or None); it raises
    :class:`~device.spec.vhost_user.VhostUserProtocolError` when the connection cannot go
    on. It implements :class:`device.virtio.Transport`: queue interrupts go out on the
    ring's call eventfd, a device error on the rings' error eventfds.
    """

    def __init__(self, node: BlockNode, config: BlkConfig | None = None) -> None:
        config = config or BlkConfig(queue_size=DEFAULT_QUEUE_SIZE)
        if not config.transitional:
            config = dataclasses.replace(config, transitional=True)
        self.memory = RegionMemory()
        self.device = VhostUserBlkDevice(self.memory, node, config)
        self.device.transport = self
        self.rings = [Ring(i) for i in range(len(self.device.queues))]
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.starts: list[RingStart] = []
        self.messages: dict[str, int] = {}
        self.config_reads: list[tuple[int, int]] = []  # (offset, size) of each GET_CONFIG
        self.connections = 0

    @property
    def node(self) -> BlockNode:
        return self.device.node

    # -- Transport (interrupts) -----------------------------------------------------------------

    def queue_interrupt(self, queue: DeviceVirtqueue) -> None:
        ring = self.rings[queue.index]
        if ring.call is not None:
            ring.calls += 1
            os.eventfd_write(ring.call, 1)

    def config_interrupt(self) -> None:
        if self.device.broken_reason is None:
            return  # a config change needs the back-end channel (SLAVE_REQ), not offered
        for ring in self.rings:
            if ring.err is not None and ring.started:
                os.eventfd_write(ring.err, 1)

    # -- messages --------------------------------------------------------------------------------

    def _ack_wanted(self, msg: vu.Message) -> bool:
        return (
            msg.need_reply
            and bool(self.protocol_features >> vu.ProtocolFeature.REPLY_ACK & 1)
            and msg.request not in vu.REPLY_REQUESTS
        )

    async def handle(self, msg: vu.Message) -> bytes | None:
        """Process one message; the reply to send, if any. Closes every fd it does not keep."""
        name = msg.name
        self.messages[name] = self.messages.get(name, 0) + 1
        fds = list(msg.fds)
        log.debug("vhost_user_message", request=name, flags=msg.flags, size=len(msg.payload), fds=len(fds))
        ok = True
        try:
            reply = await self._dispatch(msg, fds)
        except (GuestMemoryError, RequestRefusedError) as exc:
            log.warning("vhost_user_request_failed", request=name, error=str(exc))
            ok, reply = False, None
        finally:
            for fd in fds:
                os.close(fd)
        if reply is None and self._ack_wanted(msg):
            reply = vu.encode_reply(msg.request, vu.encode_u64(0 if ok else 1))
        return reply

    async def _dispatch(self, msg: vu.Message, fds: list[int]) -> bytes | None:
        rq = vu.Request
        request, payload = msg.request, msg.payload
        if request == rq.GET_FEATURES:
            offered = self.device.device_features | 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES
            return vu.encode_reply(request, vu.encode_u64(offered))
        if request == rq.SET_FEATURES:
            self._set_features(vu.decode_u64(payload, "SET_FEATURES"))
            return None
        if request == rq.GET_PROTOCOL_FEATURES:
            return vu.encode_reply(request, vu.encode_u64(OFFERED_PROTOCOL_FEATURES))
        if request == rq.SET_PROTOCOL_FEATURES:
            wanted = vu.decode_u64(payload, "SET_PROTOCOL_FEATURES")
            self.protocol_features = wanted & OFFERED_PROTOCOL_FEATURES
            log.info(
                "vhost_user_protocol_features",
                features=vu.feature_names(self.protocol_features),
                refused=vu.feature_names(wanted & ~OFFERED_PROTOCOL_FEATURES),
            )
            return None
        if request == rq.SET_OWNER:
            self.owner = True
            return None
        if request == rq.RESET_OWNER or request == rq.RESET_DEVICE:
            await self._stop_all()
            return None
        if request == rq.GET_QUEUE_NUM:
            return vu.encode_reply(request, vu.encode_u64(len(self.rings)))
        if request == rq.SET_MEM_TABLE:
            self._set_mem_table(vu.decode_memory_table(payload), fds)
            return None
        if request == rq.SET_VRING_NUM:
            state = vu.VringState.decode(payload)
            ring = self._ring(state.index)
            if ring.started:
                raise RequestRefusedError(f"ring {ring.index} size changed while running")
            ring.num = state.num
            return None
        if request == rq.SET_VRING_BASE:
            state = vu.VringState.decode(payload)
            ring = self._ring(state.index)
            if ring.started:
                raise RequestRefusedError(f"ring {ring.index} base changed while running")
            ring.base = state.num & 0xFFFF
            return None
        if request == rq.SET_VRING_ADDR:
            addr = vu.VringAddr.decode(payload)
            ring = self._ring(addr.index)
            old = ring.addr
            ring.addr = addr
            if (
                ring.started
                and old is not None
                and (old.desc, old.used, old.avail)
                != (
                    addr.desc,
                    addr.used,
                    addr.avail,
                )
            ):
                raise RequestRefusedError(f"ring {ring.index} moved while running")
            return None
        if request == rq.GET_VRING_BASE:
            state = vu.VringState.decode(payload)
            ring = self._ring(state.index)
            base = await self._stop_ring(ring)
            return vu.encode_reply(request, vu.VringState(ring.index, base).encode())
        if request in (rq.SET_VRING_KICK, rq.SET_VRING_CALL, rq.SET_VRING_ERR):
            file = vu.VringFile.decode(payload)
            ring = self._ring(file.index)
            if len(fds) != (0 if file.nofd else 1):
                raise vu.VhostUserProtocolError(f"{msg.name}: {len(fds)} fds with nofd={file.nofd}")
            fd = None if file.nofd else fds.pop()
            if request == rq.SET_VRING_KICK:
                self._set_kick(ring, fd)
            elif request == rq.SET_VRING_CALL:
                _close(ring.call)
                ring.call = fd
            else:
                _close(ring.err)
                ring.err = fd
            return None
        if request == rq.SET_VRING_ENABLE:
            state = vu.VringState.decode(payload)
            ring = self._ring(state.index)
            ring.enabled = bool(state.num)
            if ring.enabled and ring.started:
                self.device.kick(ring.index)  # anything made available while disabled
            return None
        if request == rq.GET_CONFIG:
            return vu.encode_reply(request, self._get_config(vu.ConfigSpace.decode(payload)).encode())
        if request == rq.SET_CONFIG:
            self._set_config(vu.ConfigSpace.decode(payload))
            return None
        raise RequestRefusedError(f"{msg.name} is not supported")

    def _ring(self, index: int) -> Ring:
        if not 0 <= index < len(self.rings):
            raise vu.VhostUserProtocolError(f"ring {index} does not exist ({len(self.rings)} rings)")
        return self.rings[index]

    def _set_features(self, features: int) -> None:
        offered = self.device.device_features | 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES
        if features & ~offered:
            raise RequestRefusedError(f"features {features & ~offered:#x} were never offered")
        if any(ring.started for ring in self.rings):
            if features != self.features:
                raise RequestRefusedError("features changed while rings are running")
            return
        self.features = features

    def _set_mem_table(self, regions: list[vu.MemoryRegion], fds: list[int]) -> None:
        if len(fds) != len(regions):
            raise vu.VhostUserProtocolError(f"SET_MEM_TABLE: {len(regions)} regions, {len(fds)} fds")
        self.memory.map_table(regions, fds)
        log.info(
            "vhost_user_memory_table",
            regions=[
                {
                    "gpa": hex(r.guest_phys_addr),
                    "size": hex(r.memory_size),
                    "uva": hex(r.userspace_addr),
                    "offset": hex(r.mmap_offset),
                }
                for r in regions
            ],
        )
        for ring in self.rings:  # running rings: recompute their offsets in the new mapping
            if ring.started:
                self._configure_queue(ring)

    def _get_config(self, request: vu.ConfigSpace) -> vu.ConfigSpace:
        """Exactly the bytes asked for (QEMU rejects a reply of another size)."""
        self.config_reads.append((request.offset, request.size))
        config = self.device.config_bytes()
        data = config[request.offset : request.offset + request.size]
        return vu.ConfigSpace(request.offset, request.size, request.flags, data)

    def _set_config(self, config: vu.ConfigSpace) -> None:
        if config.flags != vu.VHOST_SET_CONFIG_TYPE_FRONTEND:
            raise RequestRefusedError("config writes for migration are not supported")
        start, end = config.offset, config.offset + config.size
        if not start <= VIRTIO_BLK_CFG_WRITEBACK < end or config.size != 1:
            raise RequestRefusedError(f"config bytes [{start}, {end}) are read-only")
        self.device.write_config(VIRTIO_BLK_CFG_WRITEBACK, 1, config.data[0])

    # -- rings -----------------------------------------------------------------------------------

    def _set_kick(self, ring: Ring, fd: int | None) -> None:
        if ring.kick is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(ring.kick)
            _close(ring.kick)
            ring.kick = None
        if fd is None:
            raise RequestRefusedError(f"ring {ring.index}: polling (no kick fd) is not supported")
        ring.kick = fd
        asyncio.get_running_loop().add_reader(fd, self._on_kick, ring)
        if not ring.started:
            self._start_ring(ring)

    def _on_kick(self, ring: Ring) -> None:
        if ring.kick is None:
            return
        try:
            os.eventfd_read(ring.kick)
        except BlockingIOError:
            return
        ring.kicks += 1
        if ring.started and self._enabled(ring):
            self.device.kick(ring.index)

    def _enabled(self, ring: Ring) -> bool:
        # Without VHOST_USER_F_PROTOCOL_FEATURES a ring starts enabled, with it disabled.
        return ring.enabled or not self.features >> vu.VHOST_USER_F_PROTOCOL_FEATURES & 1

    def _negotiate(self) -> None:
        """Take the device through the virtio status sequence with the front end's features."""
        device = self.device
        device.reset()
        features = self.features & ~(1 << vu.VHOST_USER_F_PROTOCOL_FEATURES)
        device.set_driver_features(0, features & 0xFFFFFFFF)
        device.set_driver_features(1, features >> 32)
        status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
        device.set_status(status)
        device.set_status(status | VIRTIO_CONFIG_S_FEATURES_OK)
        if not device.status & VIRTIO_CONFIG_S_FEATURES_OK:
            raise vu.VhostUserProtocolError(f"the device refuses features {features:#x}")
        device.set_status(status | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK)
        log.info("vhost_user_device_started", features=f"{features:#x}", legacy=device.legacy)

    def _start_ring(self, ring: Ring) -> None:
        if not self.memory.mapped or ring.addr is None or not ring.num:
            raise vu.VhostUserProtocolError(
                f"ring {ring.index} kicked before its memory table, address and size"
            )
        if not self.device.driver_ok:
            self._negotiate()
        ring.started = True
        start = self._configure_queue(ring)
        if start is None:
            return
        self.starts.append(start)
        log.info(
            "vhost_user_ring_started",
            ring=ring.index,
            size=start.size,
            base=start.base,
            desc=hex(start.desc),
            avail=hex(start.avail),
            used=hex(start.used),
            legacy=start.legacy,
        )
        if self._enabled(ring):
            self.device.kick(ring.index)

    def _configure_queue(self, ring: Ring) -> RingStart | None:
        """Point the device's queue at the ring (translating its addresses) and activate it."""
        device = self.device
        queue = device.queues[ring.index]
        addr = ring.addr
        assert addr is not None
        num = ring.num
        fresh = not queue.active
        try:
            desc = self.memory.uva_to_gpa(addr.desc, desc_table_size(num))
            avail = self.memory.uva_to_gpa(addr.avail, avail_ring_size(num))
            used = self.memory.uva_to_gpa(addr.used, used_ring_size(num))
            if fresh:
                queue.reset()
                queue.size = num
            queue.desc_addr, queue.driver_addr, queue.device_addr = desc, avail, used
            queue.enabled = True
            queue.activate(
                event_idx=device.has_feature(VIRTIO_F_EVENT_IDX),
                indirect=device.has_feature(VIRTIO_F_INDIRECT_DESC),
            )
        except (GuestMemoryError, VirtqueueError) as exc:
            device.device_error(f"ring {ring.index}: {exc}")
            return None
        if fresh:
            queue.last_avail_idx = ring.base
            queue.used_idx = self.memory.read_u16(used + 2)
        legacy_layout = (
            desc % VIRTIO_LEGACY_VRING_ALIGN == 0
            and avail == desc + desc_table_size(num)
            and used == desc + vring_used_offset(num)
        )
        return RingStart(
            ring.index,
            device.driver_features,
            device.legacy,
            legacy_layout,
            num,
            ring.base,
            desc,
            avail,
            used,
        )

    async def _stop_ring(self, ring: Ring) -> int:
        """GET_VRING_BASE: finish what is in flight, stop, and say where the ring got to."""
        if not ring.started:
            return ring.base
        if ring.kick is not None:
            asyncio.get_running_loop().remove_reader(ring.kick)
        device = self.device
        queue = device.queues[ring.index]
        for _ in range(10_000):  # thread-mode requests still running: at most ~10 s
            if not queue.inflight or not device.driver_ok:
                break
            await asyncio.sleep(0.001)
        ring.base = queue.last_avail_idx
        ring.started = False
        queue.active = False
        queue.enabled = False
        log.info(
            "vhost_user_ring_stopped", ring=ring.index, base=ring.base, kicks=ring.kicks, calls=ring.calls
        )
        if not any(r.started for r in self.rings):
            device.reset()
            await device.reset_done()
        return ring.base

    async def _stop_all(self) -> None:
        for ring in self.rings:
            await self._stop_ring(ring)
        self.device.reset()
        await self.device.reset_done()

    async def disconnect(self) -> None:
        """The front end went away: stop, forget its fds and memory, make writes durable."""
        await self._stop_all()
        for ring in self.rings:
            if ring.kick is not None:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(ring.kick)
            for fd in (ring.kick, ring.call, ring.err):
                _close(fd)
            self.rings[ring.index] = Ring(ring.index)
        self.memory.unmap()
        self.features = self.protocol_features = 0
        self.owner = False
        if not self.node.capabilities.read_only:
            try:
                await awaited(self.node.flush)
            except OSError as exc:
                log.error("vhost_user_flush_failed", error=str(exc))

    def close(self) -> None:
        self.device.close()
        self.memory.close()


class RequestRefusedError(Exception):
    """A request the back end declines; with REPLY_ACK the front end gets a non-zero ack."""


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


# ----------------------------------------------------------------------------------- socket


def recv_message_nowait(sock: socket.socket, parser: vu.MessageParser) -> tuple[bool, list[vu.Message]]:
    """One ``recvmsg`` of at most what ``parser`` still needs (with room for 8 fds).

    Returns (eof, messages); raises BlockingIOError when nothing is there yet.
    """
    fd_size = array.array("i").itemsize
    data, ancdata, flags, _addr = sock.recvmsg(
        parser.needed(), socket.CMSG_SPACE(vu.VHOST_USER_MAX_FDS * fd_size), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(cdata[: len(cdata) - len(cdata) % fd_size])
            fds.extend(received)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise vu.VhostUserProtocolError("ancillary data truncated (more than 8 fds?)")
    if not data:
        for fd in fds + parser.take_fds():
            os.close(fd)
        return True, []
    try:
        return False, parser.feed(data, fds)
    except vu.VhostUserProtocolError:
        for fd in parser.take_fds():
            os.close(fd)
        raise


async def recv_message(sock: socket.socket, parser: vu.MessageParser) -> vu.Message | None:
    """The next message, or None at end of stream between messages."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            eof, messages = recv_message_nowait(sock, parser)
        except (BlockingIOError, InterruptedError):
            waiter: asyncio.Future[None] = loop.create_future()
            loop.add_reader(sock.fileno(), _wake, waiter)
            try:
                await waiter
            finally:
                loop.remove_reader(sock.fileno())
            continue
        if eof:
            if not parser.idle:
                raise vu.VhostUserProtocolError("connection closed in the middle of a message")
            return None
        if messages:
            return messages[0]


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class VhostUserServer:
    """Listens on a unix socket and serves :class:`VhostUserBlk` to one front end at a time."""

    def __init__(self, path: str | Path, blk: VhostUserBlk) -> None:
        self.path = Path(path)
        self.blk = blk
        self._listener: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._conn: socket.socket | None = None
        self.sessions_done = 0
        self.on_session_end: Callable[[], None] | None = None

    async def start(self) -> None:
        """Bind and listen; the socket exists when this returns (QEMU may connect at once)."""
        if self.path.is_socket():
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.path))
            listener.listen(1)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="vblk-vhost-user")
        log.info("vhost_user_listening", socket=str(self.path), queues=len(self.blk.rings))

    async def _serve(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            self._conn = conn
            try:
                await self._session(conn)
            finally:
                self._conn = None
                conn.close()
                self.sessions_done += 1
                if self.on_session_end is not None:
                    self.on_session_end()

    async def _session(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        blk = self.blk
        blk.connections += 1
        log.info("vhost_user_connected", connection=blk.connections)
        parser = vu.MessageParser()
        reason = "disconnect"
        try:
            while True:
                msg = await recv_message(conn, parser)
                if msg is None:
                    break
                reply = await blk.handle(msg)
                if reply is not None:
                    await loop.sock_sendall(conn, reply)
        except vu.VhostUserProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.error("vhost_user_protocol_error", error=str(exc))
        except OSError as exc:
            reason = f"socket error: {exc}"
            log.warning("vhost_user_socket_error", error=str(exc))
        finally:
            await blk.disconnect()
            log.info(
                "vhost_user_disconnected",
                reason=reason,
                messages=dict(blk.messages),
                requests={f"{t}:{s}": n for (t, s), n in blk.device.requests.items()},
            )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
