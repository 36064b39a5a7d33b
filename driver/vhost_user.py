"""The driver as a vhost-user front end: VirtioBlk over a vhost-user back end's device.

Driver layer, beside :mod:`driver.virtio_pci`: a :class:`driver.transport.VirtioTransport`
that shares the guest RAM (a memfd) with a back end such as ``qemu-storage-daemon
--export type=vhost-user-blk`` (QEMU's own virtio-blk implementation, libvhost-user) and
sets up the rings there; the driver's virtqueues and requests are unchanged. Control
messages are request/reply on a unix socket, done synchronously like register accesses
(QEMU's own front end blocks on them too), with a timeout; connecting and the session
handshake, and a reset's wait for the requests in flight, are asynchronous, so a back end that
is slow to answer holds up only its own disk. Kicks and interrupts are eventfds on the event
loop.

The back end may speak first on one socket only: the back-end channel, one end of a socketpair
handed over with SET_BACKEND_REQ_FD when VHOST_USER_PROTOCOL_F_BACKEND_REQ is negotiated. Its
one message vblk understands is BACKEND_CONFIG_CHANGE_MSG (a resize): the driver's
configuration interrupt handler runs, rereads the config with GET_CONFIG and tells its capacity
listeners; a NEED_REPLY is answered after that, as QEMU does.

What the virtio status bits become: ACKNOWLEDGE and DRIVER are local; FEATURES_OK sends
SET_FEATURES and the memory table (libvhost-user wants the table before any ring
address); each queue gets NUM/BASE/ADDR/CALL/ERR/KICK; DRIVER_OK enables the rings; a
reset waits for the requests in flight, then stops every ring with GET_VRING_BASE. A
back end that reports a ring error (its error eventfd) or drops the connection shows up
as DEVICE_NEEDS_RESET, on which VirtioBlk resets and reconnects.

Observed quirks of qemu-storage-daemon (7.2) this handles: VERSION_1 is mandatory; the
memory table must come before SET_VRING_ADDR (which reads the used index at once, so the
ring is zeroed first); a spurious call right after SET_VRING_CALL; requests complete out
of order; the used length is data plus the status byte (VirtioBlk ignores it).

Memory ordering: the back end runs on other CPUs, so the driver's virtqueues get
:func:`device.platform.memory_barrier` between publishing the avail index and reading
``avail_event`` / ``NO_NOTIFY``, and between re-enabling interrupts and re-reading the used
index (the driver half of the Dekker handshakes; Linux's ``virtio_mb``); the avail index,
``used_event`` and the flags are stored whole with :func:`device.platform.store_u16` (a
``struct.pack_into`` would show the back end a transient 0, and libvhost-user panics on an
avail index that moved back). The other orderings (entry before index, index before
entries) hold on x86 (TSO) by themselves.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import structlog

from device.platform import GuestRam, InterruptHandler
from device.spec import vhost_user as vu
from device.spec.virtio import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)
from driver.transport import TransportError

log = structlog.get_logger("vblk.driver.vhost_user")

UVA_BASE = 0x7F00_0000_0000  # the "user address" we tell the back end our RAM is at
DEFAULT_QUEUE_SIZE = 128
WANTED_PROTOCOL_FEATURES = vu.protocol_mask(
    vu.ProtocolFeature.MQ,
    vu.ProtocolFeature.REPLY_ACK,
    vu.ProtocolFeature.BACKEND_REQ,
    vu.ProtocolFeature.CONFIG,
)


class SharedRam(GuestRam, Protocol):
    """Guest RAM backed by a file descriptor another process can map (a memfd)."""

    @property
    def fd(self) -> int | None: ...


@dataclasses.dataclass(slots=True)
class _Queue:
    index: int
    size: int
    used: int  # guest-physical
    avail: int
    kick: int
    call: int
    err: int


class VhostUserTransport:
    """A virtio device behind a vhost-user socket, with ``memory`` as its guest RAM."""

    shared_with_other_cpus = True

    def __init__(
        self,
        path: str | Path,
        memory: SharedRam,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        timeout: float = 10.0,
    ) -> None:
        if memory.fd is None:
            raise TransportError("vhost-user needs guest RAM backed by a memfd")
        self.path = Path(path)
        self.memory = memory
        self.queue_size = queue_size
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._parser = vu.MessageParser()
        self._status = 0
        self._offered = 0
        self._protocol = 0
        self._max_queues = 1
        self._driver_features = 0
        self._queues: dict[int, _Queue] = {}
        self._config_handler: InterruptHandler | None = None
        self._channel: socket.socket | None = None  # our end of the back-end channel
        self._channel_parser = vu.MessageParser()
        self.connections = 0
        self.messages_sent = 0
        self.config_changes = 0  # BACKEND_CONFIG_CHANGE_MSG received

    @property
    def name(self) -> str:
        return f"vhost-user:{self.path}"

    @property
    def backend_channel(self) -> bool:
        """The back end took a back-end channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ)."""
        return self._channel is not None

    # -- connection ---------------------------------------------------------------------------

    async def open(self) -> None:
        await self._connect()

    async def _connect(self) -> None:
        """Connect and do the session handshake (features, protocol features, owner), without
        blocking the loop: a back end that does not answer fails this disk after ``timeout``."""
        self._disconnect()
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, str(self.path)), self.timeout)
        except (OSError, TimeoutError) as exc:
            sock.close()
            raise TransportError(f"{self.name}: cannot connect: {exc or 'timed out'}") from exc
        self._sock = sock
        self._parser = vu.MessageParser()
        self.connections += 1
        try:
            self._offered = vu.decode_u64(await self._call_async(vu.Request.GET_FEATURES))
            if not self._offered >> vu.VHOST_USER_F_PROTOCOL_FEATURES & 1:
                raise TransportError(f"{self.name}: back end has no protocol features (no GET_CONFIG)")
            offered = vu.decode_u64(await self._call_async(vu.Request.GET_PROTOCOL_FEATURES))
            self._protocol = offered & WANTED_PROTOCOL_FEATURES
            if not self._protocol >> vu.ProtocolFeature.CONFIG & 1:
                raise TransportError(f"{self.name}: back end lacks VHOST_USER_PROTOCOL_F_CONFIG")
            await self._send_async(vu.Request.SET_PROTOCOL_FEATURES, vu.encode_u64(self._protocol))
            self._max_queues = 1
            if self._protocol >> vu.ProtocolFeature.MQ & 1:
                self._max_queues = vu.decode_u64(await self._call_async(vu.Request.GET_QUEUE_NUM))
            if self._protocol >> vu.ProtocolFeature.BACKEND_REQ & 1:
                await self._open_backend_channel()
            await self._send_async(vu.Request.SET_OWNER)
        except BaseException:
            self._disconnect()
            raise
        sock.settimeout(self.timeout)  # the exchanges from here on are short and synchronous
        loop.add_reader(sock.fileno(), self._on_socket)
        if self._channel is not None:
            loop.add_reader(self._channel.fileno(), self._on_backend_channel)
        log.info(
            "vhost_user_connected",
            socket=str(self.path),
            features=f"{self._offered:#x}",
            protocol=vu.feature_names(self._protocol),
            queues=self._max_queues,
            backend_channel=self._channel is not None,
        )

    async def _open_backend_channel(self) -> None:
        """SET_BACKEND_REQ_FD: one end of a socketpair to the back end, the other kept here."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            ours.setblocking(False)
            ack = bool(self._protocol >> vu.ProtocolFeature.REPLY_ACK & 1)
            await self._send_async(vu.Request.SET_BACKEND_REQ_FD, fds=[theirs.fileno()], need_reply=ack)
            if ack:
                status = vu.decode_u64(await self._recv_async(vu.Request.SET_BACKEND_REQ_FD))
                if status:
                    raise TransportError(f"{self.name}: back end failed SET_BACKEND_REQ_FD ({status})")
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the back end has its own copy
        self._channel = ours
        self._channel_parser = vu.MessageParser()

    @property
    def _loop(self) -> asyncio.AbstractEventLoop | None:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            return None

    def _disconnect(self) -> None:
        self._close_channel()
        if self._sock is None:
            return
        loop = self._loop
        if loop is not None:
            loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None

    def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is None:
            return
        loop = self._loop
        if loop is not None:
            loop.remove_reader(channel.fileno())
        channel.close()

    def _on_backend_channel(self) -> None:
        """The back end spoke on the back-end channel: a config change (or the channel closed)."""
        channel = self._channel
        if channel is None:
            return
        try:
            data = channel.recv(self._channel_parser.needed())  # fds sent along are dropped
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the back end closed it (it went away: the main socket will say so)
            self._close_channel()
            return
        try:
            messages = self._channel_parser.feed(data)
        except vu.VhostUserProtocolError as exc:
            log.error("vhost_user_backend_channel_error", socket=str(self.path), error=str(exc))
            self._close_channel()
            return
        for msg in messages:
            self._backend_request(msg)

    def _backend_request(self, msg: vu.Message) -> None:
        name = vu.backend_request_name(msg.request)
        status = 0
        if msg.request == vu.BackendRequest.CONFIG_CHANGE_MSG and not msg.is_reply:
            self.config_changes += 1
            log.info("vhost_user_config_changed", socket=str(self.path), need_reply=msg.need_reply)
            handler = self._config_handler
            if handler is not None:
                try:
                    handler()  # rereads the config (GET_CONFIG) and tells the capacity listeners
                except TransportError as exc:
                    log.error("vhost_user_config_reread_failed", socket=str(self.path), error=str(exc))
                    status = 1
                    self._device_broken()
        else:  # nothing else was negotiated
            log.warning("vhost_user_backend_request_refused", socket=str(self.path), request=name)
            status = 1
        channel = self._channel
        if msg.need_reply and channel is not None:
            try:  # after the GET_CONFIG above, as QEMU answers
                channel.send(vu.encode_reply(msg.request, vu.encode_u64(status)))
            except OSError as exc:
                log.warning("vhost_user_backend_answer_failed", socket=str(self.path), error=str(exc))

    def _on_socket(self) -> None:
        """Readable between exchanges: the back end went away (it never speaks unasked)."""
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            return
        log.error("vhost_user_back_end_gone", socket=str(self.path))
        self._disconnect()
        self._device_broken()

    def _device_broken(self) -> None:
        self._status |= VIRTIO_CONFIG_S_NEEDS_RESET
        if self._config_handler is not None:
            self._config_handler()

    # -- messages -----------------------------------------------------------------------------

    def _require(self) -> socket.socket:
        if self._sock is None:
            raise TransportError(f"{self.name}: not connected")
        return self._sock

    def _send(
        self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *, need_reply: bool = False
    ) -> None:
        sock = self._require()
        data = vu.encode_message(request, payload, need_reply=need_reply)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            sent = sock.sendmsg([data], ancillary)
            if sent < len(data):
                sock.sendall(data[sent:])
        except OSError as exc:
            self._disconnect()
            raise TransportError(f"{self.name}: {vu.Request(request).name}: {exc}") from exc
        self.messages_sent += 1

    def _recv_reply(self, request: int) -> bytes:
        sock = self._require()
        parser = self._parser
        try:
            while True:
                data = sock.recv(parser.needed())
                if not data:
                    raise TransportError(f"{self.name}: back end closed the connection")
                messages = parser.feed(data)
                if messages:
                    break
        except (OSError, vu.VhostUserProtocolError) as exc:
            self._disconnect()
            raise TransportError(f"{self.name}: waiting for {vu.Request(request).name}: {exc}") from exc
        reply = messages[0]
        if reply.request != request or not reply.is_reply:
            self._disconnect()
            raise TransportError(f"{self.name}: got {reply.name} (flags {reply.flags:#x}) for {request}")
        return reply.payload

    async def _send_async(
        self, request: int, payload: bytes = b"", *, fds: Sequence[int] = (), need_reply: bool = False
    ) -> None:
        sock = self._require()
        data = vu.encode_message(request, payload, need_reply=need_reply)
        try:
            await asyncio.wait_for(self._sendmsg_async(sock, data, fds), self.timeout)
        except (OSError, TimeoutError) as exc:
            raise TransportError(f"{self.name}: {vu.Request(request).name}: {exc or 'timed out'}") from exc
        self.messages_sent += 1

    @staticmethod
    async def _sendmsg_async(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
        """``data`` with ``fds`` attached to its first byte, without blocking the loop."""
        loop = asyncio.get_running_loop()
        if not fds:
            await loop.sock_sendall(sock, data)
            return
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        while True:
            try:
                sent = sock.sendmsg([data], ancillary)
                break
            except (BlockingIOError, InterruptedError):
                writable: asyncio.Future[None] = loop.create_future()
                loop.add_writer(sock.fileno(), _wake, writable)
                try:
                    await writable
                finally:
                    loop.remove_writer(sock.fileno())
        if sent < len(data):
            await loop.sock_sendall(sock, data[sent:])

    async def _call_async(self, request: int, payload: bytes = b"") -> bytes:
        """A request with a reply payload, awaited (the handshake)."""
        await self._send_async(request, payload)
        return await self._recv_async(request)

    async def _recv_async(self, request: int) -> bytes:
        """The reply to ``request``, awaited."""
        sock = self._require()
        parser = self._parser
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await asyncio.wait_for(loop.sock_recv(sock, parser.needed()), self.timeout)
                if not data:
                    raise TransportError(f"{self.name}: back end closed the connection")
                messages = parser.feed(data)
                if messages:
                    break
        except (OSError, TimeoutError, vu.VhostUserProtocolError) as exc:
            raise TransportError(f"{self.name}: waiting for {vu.Request(request).name}: {exc}") from exc
        reply = messages[0]
        if reply.request != request or not reply.is_reply:
            raise TransportError(f"{self.name}: got {reply.name} (flags {reply.flags:#x}) for {request}")
        return reply.payload

    def _call(self, request: int, payload: bytes = b"") -> bytes:
        """A request with a reply payload."""
        self._send(request, payload)
        return self._recv_reply(request)

    def _command(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """A request without a reply payload; acknowledged if REPLY_ACK was negotiated."""
        ack = bool(self._protocol >> vu.ProtocolFeature.REPLY_ACK & 1)
        self._send(request, payload, fds, need_reply=ack)
        if ack:
            status = vu.decode_u64(self._recv_reply(request))
            if status:
                raise TransportError(f"{self.name}: back end failed {vu.Request(request).name} ({status})")

    # -- VirtioTransport ----------------------------------------------------------------------------

    async def reset(self) -> None:
        """Stop every ring (after the requests in flight finished) and forget them."""
        if self._queues and self._sock is not None:
            await self._wait_idle()
            for queue in list(self._queues.values()):
                with contextlib.suppress(TransportError):
                    self._call(vu.Request.GET_VRING_BASE, vu.VringState(queue.index, 0).encode())
        self._close_queues()
        self._status = 0

    async def _wait_idle(self) -> None:
        """Until each ring's used index caught up with its avail index (bounded): the back
        end writes buffers and used entries of requests in flight even after it stopped.
        The loop goes on serving the other disks meanwhile."""
        deadline = time.monotonic() + self.timeout
        pending = list(self._queues.values())
        delay = 0.0005
        while pending and time.monotonic() < deadline:
            pending = [
                q for q in pending if self.memory.read(q.used + 2, 2) != self.memory.read(q.avail + 2, 2)
            ]
            if pending:
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.02)
        if pending:
            log.error("vhost_user_reset_with_requests_in_flight", queues=[q.index for q in pending])

    def _close_queues(self) -> None:
        loop = self._loop
        for queue in self._queues.values():
            if loop is not None:
                loop.remove_reader(queue.call)
                loop.remove_reader(queue.err)
            for fd in (queue.kick, queue.call, queue.err):
                os.close(fd)
        self._queues.clear()

    @property
    def status(self) -> int:
        return self._status

    def add_status(self, bits: int) -> None:
        if bits & VIRTIO_CONFIG_S_DRIVER_OK and not self._status & VIRTIO_CONFIG_S_DRIVER_OK:
            for queue in self._queues.values():
                self._command(vu.Request.SET_VRING_ENABLE, vu.VringState(queue.index, 1).encode())
        self._status |= bits

    async def reconnect(self) -> None:
        """A new session, when the back end went away (it restarted, say)."""
        if self._sock is None:
            await self._connect()

    def device_features(self) -> int:
        self._require()  # connected (open, or the reset after the back end went away)
        return self._offered & ~(1 << vu.VHOST_USER_F_PROTOCOL_FEATURES)

    def set_driver_features(self, features: int) -> None:
        self._driver_features = features

    def features_ok(self) -> bool:
        features = self._driver_features
        if features & ~self.device_features() or not features >> VIRTIO_F_VERSION_1 & 1:
            return False  # what a virtio device would refuse; libvhost-user panics on legacy
        self._command(
            vu.Request.SET_FEATURES, vu.encode_u64(features | 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES)
        )
        memory = self.memory
        fd = memory.fd
        assert fd is not None
        region = vu.MemoryRegion(memory.base, memory.size, UVA_BASE, 0)
        self._command(vu.Request.SET_MEM_TABLE, vu.encode_memory_table([region]), [fd])
        self._status |= VIRTIO_CONFIG_S_FEATURES_OK
        return True

    def read_device_config(self, length: int) -> bytes:
        request = vu.ConfigSpace(0, length, vu.VHOST_SET_CONFIG_TYPE_FRONTEND, bytes(length))
        reply = vu.ConfigSpace.decode(self._call(vu.Request.GET_CONFIG, request.encode()))
        if reply.size != length or reply.offset != 0:
            raise TransportError(f"{self.name}: GET_CONFIG answered {reply.size} bytes at {reply.offset}")
        return reply.data

    def write_device_config(self, offset: int, size: int, value: int) -> None:
        data = value.to_bytes(size, "little")
        self._command(vu.Request.SET_CONFIG, vu.ConfigSpace(offset, size, 0, data).encode())

    def enable_config_interrupt(self, handler: InterruptHandler) -> None:
        # A config change on the back-end channel (BACKEND_REQ), a ring error or a lost socket.
        self._config_handler = handler

    def queue_max_size(self, index: int) -> int:
        return self.queue_size if index < self._max_queues else 0

    def setup_queue(
        self, index: int, size: int, desc: int, avail: int, used: int, handler: InterruptHandler
    ) -> Callable[[], None]:
        loop = asyncio.get_running_loop()
        flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
        queue = _Queue(
            index, size, used, avail, os.eventfd(0, flags), os.eventfd(0, flags), os.eventfd(0, flags)
        )
        self._queues[index] = queue
        uva = UVA_BASE - self.memory.base
        self._command(vu.Request.SET_VRING_NUM, vu.VringState(index, size).encode())
        # Where the ring starts: split, avail index 0; packed, both positions 0 with their wrap
        # counters at 1 (bits 15 and 31, as QEMU encodes a packed ring's state).
        packed = bool(self._driver_features >> VIRTIO_F_RING_PACKED & 1)
        base = 1 << 15 | 1 << 31 if packed else 0
        self._command(vu.Request.SET_VRING_BASE, vu.VringState(index, base).encode())
        addr = vu.VringAddr(index, 0, desc + uva, used + uva, avail + uva, 0)
        self._command(vu.Request.SET_VRING_ADDR, addr.encode())
        self._command(vu.Request.SET_VRING_CALL, vu.VringFile(index).encode(), [queue.call])
        self._command(vu.Request.SET_VRING_ERR, vu.VringFile(index).encode(), [queue.err])
        self._command(vu.Request.SET_VRING_KICK, vu.VringFile(index).encode(), [queue.kick])

        def on_call() -> None:
            try:
                os.eventfd_read(queue.call)
            except BlockingIOError:
                return
            handler()  # spurious calls (nothing used) are harmless

        def on_error() -> None:
            try:
                os.eventfd_read(queue.err)
            except BlockingIOError:
                return
            log.error("vhost_user_ring_error", socket=str(self.path), queue=index)
            self._device_broken()

        loop.add_reader(queue.call, on_call)
        loop.add_reader(queue.err, on_error)
        kick = queue.kick

        def notify() -> None:
            os.eventfd_write(kick, 1)

        return notify

    def release_interrupts(self) -> None:
        self._close_queues()
        self._config_handler = None

    def close(self) -> None:
        self._close_queues()
        self._disconnect()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
