"""The front end's back-end channel, against a scripted back end on a thread.

The back end answers the session handshake, takes the channel (SET_BACKEND_REQ_FD, one fd,
acknowledged), then speaks first on it: a request that was never negotiated (answered with a
failure), and BACKEND_CONFIG_CHANGE_MSG with NEED_REPLY, which the front end must answer only
after it has reread the config with GET_CONFIG on the main socket, as QEMU does. A thread,
because the front end's exchanges after the handshake are synchronous (like register accesses):
a back end on the same event loop could not answer them.
"""

from __future__ import annotations

import array
import asyncio
import select
import socket
import struct
import tempfile
import threading
from pathlib import Path

from device.memory import GuestMemory
from device.spec import vhost_user as vu
from device.spec.virtio import VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1
from driver.vhost_user import VhostUserTransport

MiB = 1 << 20
PROTOCOL = vu.protocol_mask(
    vu.ProtocolFeature.REPLY_ACK, vu.ProtocolFeature.BACKEND_REQ, vu.ProtocolFeature.CONFIG
)


class ScriptedBackEnd(threading.Thread):
    """Accepts one front end and plays the script; ``log`` is what it saw, in order."""

    def __init__(self, listener: socket.socket) -> None:
        super().__init__(daemon=True)
        self.listener = listener
        self.log: list[str] = []
        self.channel_fds: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._script()
        except BaseException as exc:
            self.error = exc

    def _recv(self, sock: socket.socket) -> tuple[int, int, bytes, list[int]]:
        data, ancdata, _flags, _addr = sock.recvmsg(vu.HEADER_SIZE, socket.CMSG_SPACE(8 * 4))
        fds: list[int] = []
        for _level, _kind, cdata in ancdata:
            fds.extend(array.array("i", cdata[: len(cdata) - len(cdata) % 4]))
        request, flags, size = vu.HEADER.unpack(data)
        payload = b""
        while len(payload) < size:
            payload += sock.recv(size - len(payload))
        return request, flags, payload, fds

    def _script(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        features = 1 << VIRTIO_F_VERSION_1 | 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES
        channel: socket.socket | None = None
        while channel is None or len(self.log) < 6:
            request, flags, payload, fds = self._recv(conn)
            self.log.append(vu.Request(request).name)
            if request == vu.Request.GET_FEATURES:
                conn.sendall(vu.encode_reply(request, vu.encode_u64(features)))
            elif request == vu.Request.GET_PROTOCOL_FEATURES:
                conn.sendall(vu.encode_reply(request, vu.encode_u64(PROTOCOL)))
            elif request == vu.Request.SET_BACKEND_REQ_FD:
                assert payload == b"" and len(fds) == 1 and flags == 0x9, (payload, fds, flags)
                channel = socket.socket(fileno=fds[0])
                conn.sendall(vu.encode_reply(request, vu.encode_u64(0)))
            elif request == vu.Request.SET_OWNER:
                self.log.append("handshake done")
                break
        assert channel is not None
        channel.settimeout(10)
        # A request the front end never negotiated: refused, and the channel goes on.
        channel.sendall(vu.encode_message(vu.BackendRequest.VRING_CALL, vu.encode_u64(0), need_reply=True))
        request, flags, payload, _ = self._recv(channel)
        self.log.append(f"answer {vu.backend_request_name(request)} {vu.decode_u64(payload)}")
        # The resize notice: the front end rereads the config first, then answers.
        channel.sendall(vu.encode_message(vu.BackendRequest.CONFIG_CHANGE_MSG, need_reply=True))
        request, flags, payload, _ = self._recv(conn)
        self.log.append(vu.Request(request).name)
        if select.select([channel], [], [], 0)[0]:  # the front end waits for this reply: no answer yet
            self.log.append("answered before GET_CONFIG")
        asked = vu.ConfigSpace.decode(payload)
        config = struct.pack("<Q", 3 * MiB // 512).ljust(asked.size, b"\0")
        conn.sendall(vu.encode_reply(request, vu.ConfigSpace(0, asked.size, 0, config).encode()))
        request, flags, payload, _ = self._recv(channel)
        assert flags & vu.VHOST_USER_REPLY_MASK
        self.log.append(f"answer {vu.backend_request_name(request)} {vu.decode_u64(payload)}")
        assert conn.recv(1) == b""  # until the front end goes (a back end that left first is an error)
        channel.close()
        conn.close()


async def test_a_config_change_is_answered_after_get_config() -> None:
    with tempfile.TemporaryDirectory(prefix="vblk-") as tmp:
        path = Path(tmp) / "vu.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        back_end = ScriptedBackEnd(listener)
        back_end.start()
        memory = GuestMemory(8 * MiB)
        transport = VhostUserTransport(path, memory, timeout=5)
        capacities: list[int] = []
        try:
            await transport.open()
            assert transport.backend_channel
            transport.add_status(VIRTIO_CONFIG_S_DRIVER_OK)

            def config_interrupt() -> None:  # what VirtioBlk's handler does: reread the config
                if transport.status & VIRTIO_CONFIG_S_NEEDS_RESET:
                    return  # (VirtioBlk resets the device)
                capacities.append(struct.unpack_from("<Q", transport.read_device_config(60))[0])

            transport.enable_config_interrupt(config_interrupt)
            for _ in range(500):
                if not back_end.is_alive() or back_end.log[-1:] == ["answer CONFIG_CHANGE_MSG 0"]:
                    break
                await asyncio.sleep(0.01)
            transport.close()
            back_end.join(5)
            assert back_end.error is None, back_end.error
            assert back_end.log == [
                "GET_FEATURES",
                "GET_PROTOCOL_FEATURES",
                "SET_PROTOCOL_FEATURES",
                "SET_BACKEND_REQ_FD",
                "SET_OWNER",
                "handshake done",
                "answer VRING_CALL 1",
                "GET_CONFIG",
                "answer CONFIG_CHANGE_MSG 0",
            ]
            assert capacities == [3 * MiB // 512] and transport.config_changes == 1
        finally:
            transport.close()
            memory.close()
            listener.close()
