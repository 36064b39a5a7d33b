"""The vhost-user back end's protocol: one message in, its reply bytes out; no socket here.

Device layer, between the socket (:mod:`device.vhost_user.server`) and the device model: features,
memory table, config space, and each ring's setup, start and stop (GET_VRING_BASE). The owner
resizes the disk here too (:meth:`VhostUserBlk.resize`), and the front end hears of it on the
back-end channel (:mod:`device.vhost_user.channel`) when it handed one over.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os

import structlog

from device.blk import BlkConfig
from device.block.node import BlockError, BlockNode, awaited
from device.platform import GuestMemoryError
from device.spec import vhost_user as vu
from device.spec.virtio import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
)
from device.spec.virtio_blk import VIRTIO_BLK_CFG_WRITEBACK
from device.vhost_user.channel import BackendChannel, ChannelError
from device.vhost_user.inflight import InflightError, InflightMessage, InflightRegion
from device.vhost_user.regions import RegionMemory
from device.vhost_user.rings import (
    Ring,
    RingStart,
    VhostUserBlkDevice,
    VhostUserPackedVirtqueue,
    VhostUserVirtqueue,
    configure_queue,
)
from device.virtqueue import DeviceVirtqueue

log = structlog.get_logger("vblk.device.vhost_user")

OFFERED_PROTOCOL_FEATURES = vu.protocol_mask(
    vu.ProtocolFeature.MQ,
    vu.ProtocolFeature.REPLY_ACK,
    vu.ProtocolFeature.BACKEND_REQ,
    vu.ProtocolFeature.CONFIG,
    vu.ProtocolFeature.INFLIGHT_SHMFD,
)
DEFAULT_QUEUE_SIZE = 128  # QEMU's vhost-user-blk queue-size default
ANSWER_TIMEOUT = 5.0  # seconds a front end gets to answer a config-change notice


@dataclasses.dataclass(frozen=True, slots=True)
class ResizeOutcome:
    """What a resize did: the sizes, and whether (and how) the front end heard of it.

    ``notice`` is one of ``acknowledged`` (the front end answered that it reread the config),
    ``sent`` (the notice went out; no answer asked for, REPLY_ACK not negotiated),
    ``unacknowledged`` (no answer in time, or a failed one), ``deferred`` (the front end's
    device is stopped, and QEMU ignores a notice then: it goes out when a ring starts),
    ``no_channel`` (the front end gave no back-end channel), ``no_front_end`` (none connected),
    ``failed`` (the channel broke) or ``unchanged`` (the size was already that). ``message``
    says it in a sentence.
    """

    old_size: int
    size: int
    notice: str
    message: str

    @property
    def told(self) -> bool:
        """The front end was told (it rereads the capacity now)."""
        return self.notice in ("acknowledged", "sent", "unacknowledged", "deferred")


class ShrinkRefusedError(ValueError):
    """A smaller size without ``shrink=True``: data past the new end would be lost."""


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
        self.connected = False  # a front end's session is open (the server says so)
        self.channel: BackendChannel | None = None  # the back-end channel, if handed over
        self.resizes: list[ResizeOutcome] = []
        self._resizing = asyncio.Lock()  # one resize at a time: each outcome's sizes are its own
        self._notice_deferred = False  # a resize while no ring ran: tell it when one starts
        self._deferred_notice: asyncio.Task[ResizeOutcome] | None = None
        #: The in-flight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), once the front end has one.
        self.inflight: InflightRegion | None = None
        #: The fds to send with the reply :meth:`handle` returned (the server takes them).
        self.reply_fds: list[int] = []

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
            return  # a resize: :meth:`resize` tells the front end, on the back-end channel
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
            ring.base = state.num  # split: the avail index; packed: both positions and wrap counters
            return None
        if request == rq.SET_VRING_ADDR:
            addr = vu.VringAddr.decode(payload)
            ring = self._ring(addr.index)
            old = ring.addr
            moved = old is not None and (old.desc, old.used, old.avail) != (addr.desc, addr.used, addr.avail)
            if ring.started and moved:  # refused, and forgotten: the ring stays where it runs
                raise RequestRefusedError(f"ring {ring.index} moved while running")
            ring.addr = addr
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
                if ring.recovered and fd is not None:  # a predecessor's last interrupt may be lost
                    ring.recovered = False
                    ring.calls += 1
                    os.eventfd_write(fd, 1)
            else:
                _close(ring.err)
                ring.err = fd
            return None
        if request == rq.GET_INFLIGHT_FD:
            return self._get_inflight_fd(payload)
        if request == rq.SET_INFLIGHT_FD:
            self._set_inflight_fd(payload, fds)
            return None
        if request == rq.SET_VRING_ENABLE:
            state = vu.VringState.decode(payload)
            ring = self._ring(state.index)
            ring.enabled = bool(state.num)
            if ring.enabled and ring.started:
                self.device.kick(ring.index)  # anything made available while disabled
            return None
        if request == rq.SET_BACKEND_REQ_FD:
            self._set_backend_req_fd(msg, fds)
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
                configure_queue(self.device, self.memory, ring)

    def _set_backend_req_fd(self, msg: vu.Message, fds: list[int]) -> None:
        """Keep the back-end channel's socket (replacing, and closing, an earlier one)."""
        if msg.payload:
            raise vu.VhostUserProtocolError(f"{msg.name}: a payload of {len(msg.payload)} bytes, want none")
        if len(fds) != 1:
            raise vu.VhostUserProtocolError(f"{msg.name}: {len(fds)} fds, want one socket")
        if not self.protocol_features >> vu.ProtocolFeature.BACKEND_REQ & 1:
            raise RequestRefusedError(f"{msg.name} without VHOST_USER_PROTOCOL_F_BACKEND_REQ negotiated")
        fd = fds.pop()  # the channel owns it now, refused or not
        try:
            channel = BackendChannel.adopt(fd)
        except ChannelError as exc:
            raise RequestRefusedError(str(exc)) from exc
        replaced = self.channel is not None
        if self.channel is not None:
            self.channel.close("replaced by a new one")
        self.channel = channel
        log.info("vhost_user_backend_channel", replaced=replaced)

    def _inflight_wanted(self, name: str) -> None:
        if not self.protocol_features >> vu.ProtocolFeature.INFLIGHT_SHMFD & 1:
            raise RequestRefusedError(f"{name} without VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD negotiated")

    def _check_inflight_shape(self, message: InflightMessage, name: str) -> None:
        if message.num_queues > len(self.rings) or message.queue_size > self.device.blk_config.queue_size:
            raise RequestRefusedError(
                f"{name}: {message.num_queues} queues of {message.queue_size}, the device has "
                f"{len(self.rings)} of at most {self.device.blk_config.queue_size}"
            )

    def _get_inflight_fd(self, payload: bytes) -> bytes:
        """A new zeroed region, mapped here and sent to the front end, which keeps it for the
        device's life and hands it to this back end's successors."""
        rq = vu.Request
        try:
            message = InflightMessage.decode(payload, "GET_INFLIGHT_FD")
        except InflightError as exc:
            raise vu.VhostUserProtocolError(str(exc)) from exc
        try:  # a refusal is an answer too: mmap_size 0, "no buffer"
            self._inflight_wanted("GET_INFLIGHT_FD")
            self._check_inflight_shape(message, "GET_INFLIGHT_FD")
            if any(ring.started for ring in self.rings):
                raise RequestRefusedError("GET_INFLIGHT_FD while rings are running")
            region, fd = InflightRegion.allocate(message.num_queues, message.queue_size)
        except (OSError, InflightError, RequestRefusedError) as exc:
            log.warning("vhost_user_inflight_refused", error=str(exc))
            return vu.encode_reply(rq.GET_INFLIGHT_FD, InflightMessage(0, 0, 0, 0).encode())
        self._replace_inflight(region)
        self.reply_fds.append(fd)
        log.info("vhost_user_inflight_allocated", size=region.message.mmap_size, queues=message.num_queues)
        return vu.encode_reply(rq.GET_INFLIGHT_FD, region.message.encode())

    def _set_inflight_fd(self, payload: bytes, fds: list[int]) -> None:
        """The front end's region (a predecessor's, after a restart): map it."""
        try:
            message = InflightMessage.decode(payload, "SET_INFLIGHT_FD")
        except InflightError as exc:
            raise vu.VhostUserProtocolError(str(exc)) from exc
        if len(fds) != 1:
            raise vu.VhostUserProtocolError(f"SET_INFLIGHT_FD: {len(fds)} fds, want one")
        self._inflight_wanted("SET_INFLIGHT_FD")
        self._check_inflight_shape(message, "SET_INFLIGHT_FD")
        if any(ring.started for ring in self.rings):
            raise RequestRefusedError("SET_INFLIGHT_FD while rings are running")
        try:
            region = InflightRegion(fds[0], message)
        except InflightError as exc:
            raise RequestRefusedError(str(exc)) from exc
        self._replace_inflight(region)
        log.info("vhost_user_inflight_mapped", size=message.mmap_size, queues=message.num_queues)

    def _replace_inflight(self, region: InflightRegion | None) -> None:
        if self.inflight is not None:
            for queue in self.device.queues:  # a reset leaves the other layout's queues untracked
                if isinstance(queue, VhostUserVirtqueue | VhostUserPackedVirtqueue):
                    queue.tracker = None
            self.inflight.close()
        self.inflight = region

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
        first = not any(r.started for r in self.rings)
        ring.started = True
        if first and self._notice_deferred:
            self._tell_deferred_resize()
        start = configure_queue(self.device, self.memory, ring, self.inflight)
        if start is None:
            return
        self.starts.append(start)
        if start.recovery is not None and not start.recovery.fresh:
            ring.recovered = True
            log.info(
                "vhost_user_inflight_resubmitted",
                ring=ring.index,
                requests=start.resubmitted,
                landed=start.recovery.landed,
                last_avail=start.recovery.last_avail,
            )
        log.info(
            "vhost_user_ring_started",
            ring=ring.index,
            size=start.size,
            base=start.base,
            desc=hex(start.desc),
            avail=hex(start.avail),
            used=hex(start.used),
            legacy=start.legacy,
            packed=start.packed,
        )
        if self._enabled(ring):
            self.device.kick(ring.index)

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
        ring.base = queue.base if isinstance(queue, VhostUserPackedVirtqueue) else queue.last_avail_idx
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
        self.connected = False
        self._notice_deferred = False  # the next front end reads the config at its start
        if self._deferred_notice is not None:
            self._deferred_notice.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._deferred_notice
            self._deferred_notice = None
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        await self._stop_all()
        for ring in self.rings:
            if ring.kick is not None:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(ring.kick)
            for fd in (ring.kick, ring.call, ring.err):
                _close(fd)
            self.rings[ring.index] = Ring(ring.index)
        self.memory.unmap()
        self._replace_inflight(None)
        self.features = self.protocol_features = 0
        self.owner = False
        if not self.node.capabilities.read_only:
            try:
                await awaited(self.node.flush)
            except OSError as exc:
                log.error("vhost_user_flush_failed", error=str(exc))

    # -- control plane -----------------------------------------------------------------------

    async def resize(self, new_size: int, *, shrink: bool = False) -> ResizeOutcome:
        """Resize the disk's stack and tell the front end on the back-end channel.

        Growing is always allowed; shrinking only with ``shrink`` (what lies past the new end
        is gone). The stack is resized between two requests (the device is quiesced for it).
        The front end is told with BACKEND_CONFIG_CHANGE_MSG; with REPLY_ACK negotiated the
        message asks for an answer, which is awaited here (at most :data:`ANSWER_TIMEOUT`),
        never on the main socket, which goes on serving the GET_CONFIG the front end sends
        before it answers. Without a channel the resize still happens, and the outcome says
        that the front end sees it only once it reads the config again (QEMU caches it: a
        re-plugged device or a new QEMU).
        """
        async with self._resizing:
            return await self._resize(new_size, shrink)

    async def _resize(self, new_size: int, shrink: bool) -> ResizeOutcome:
        device = self.device
        old = self.node.size
        block = device.blk_config.blk_size
        if new_size <= 0 or new_size % block:
            raise ValueError(f"size {new_size} is not a positive multiple of the block size ({block})")
        if device.read_only:
            raise BlockError(errno.EROFS, "the disk is read-only: it cannot be resized")
        if new_size < old and not shrink:
            raise ShrinkRefusedError(
                f"{new_size} bytes is smaller than the disk ({old} bytes): shrinking loses what lies "
                "past the new end, so it must be asked for explicitly"
            )
        if new_size == old:
            outcome = ResizeOutcome(old, old, "unchanged", f"the disk already has {old} bytes")
        else:
            await device.quiesce()
            try:
                device.resize(new_size)
            finally:
                device.resume()
            outcome = await self._announce(old, new_size)
        self.resizes.append(outcome)
        log.info("vhost_user_resized", old_size=old, size=new_size, notice=outcome.notice)
        return outcome

    def _tell_deferred_resize(self) -> None:
        """The front end's device starts after a resize it could not hear of: tell it now, from
        a task of its own (this runs in the main socket's task, which must go on to serve the
        GET_CONFIG the front end sends before it answers)."""
        self._notice_deferred = False
        size = self.node.size

        async def tell() -> ResizeOutcome:
            outcome = await self._announce(size, size)
            log.info("vhost_user_deferred_resize_told", size=size, notice=outcome.notice)
            return outcome

        self._deferred_notice = asyncio.get_running_loop().create_task(tell(), name="vblk-vhost-user-notice")

    async def _announce(self, old: int, size: int) -> ResizeOutcome:
        """Tell the front end the config changed, and what came of it."""
        channel = self.channel
        if not self.connected:
            return ResizeOutcome(
                old, size, "no_front_end", "no front end is connected; the next one reads the new size"
            )
        if channel is not None and channel.closed:
            return ResizeOutcome(
                old,
                size,
                "no_channel",
                "the front end closed its back-end channel, so it cannot be told: it sees the new size "
                "only when it reads the config again",
            )
        if channel is None:
            return ResizeOutcome(
                old,
                size,
                "no_channel",
                "the front end has no back-end channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ), so it cannot be "
                "told: it sees the new size only when it reads the config again (QEMU caches it until the "
                "device is re-plugged or QEMU restarts)",
            )
        if not any(ring.started for ring in self.rings):
            # QEMU's handler does nothing while its vhost device is stopped (before the guest's
            # driver, across a guest reset) and keeps the config it cached: wait for a start.
            self._notice_deferred = True
            return ResizeOutcome(
                old,
                size,
                "deferred",
                "the front end's device is stopped (no driver runs it): the front end is told when it starts",
            )
        need_reply = bool(self.protocol_features >> vu.ProtocolFeature.REPLY_ACK & 1)
        try:
            answer = channel.config_changed(need_reply=need_reply)
            if answer is None:
                return ResizeOutcome(old, size, "sent", "the front end was told (it was not asked to answer)")
            status = await asyncio.wait_for(answer, ANSWER_TIMEOUT)
        except ChannelError as exc:
            log.warning("vhost_user_config_change_failed", error=str(exc))
            return ResizeOutcome(old, size, "failed", f"the front end could not be told: {exc}")
        except TimeoutError:
            log.warning("vhost_user_config_change_unanswered", timeout=ANSWER_TIMEOUT)
            return ResizeOutcome(
                old,
                size,
                "unacknowledged",
                f"the front end was told, and did not answer in {ANSWER_TIMEOUT:g} s",
            )
        if status:
            return ResizeOutcome(
                old, size, "unacknowledged", f"the front end was told, and answered {status} (failed)"
            )
        return ResizeOutcome(old, size, "acknowledged", "the front end was told and reread the config")

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.device.close()
        self._replace_inflight(None)
        self.memory.close()


class RequestRefusedError(Exception):
    """A request the back end declines; with REPLY_ACK the front end gets a non-zero ack."""


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
