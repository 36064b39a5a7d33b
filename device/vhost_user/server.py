"""The vhost-user socket: a unix listener serving one front end at a time, messages with their fds.

Device layer, the back end's outermost part: receives messages and their SCM_RIGHTS fds, hands
them to :class:`~device.vhost_user.protocol.VhostUserBlk` and sends its replies back.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path

import structlog

from device.spec import vhost_user as vu
from device.vhost_user.protocol import VhostUserBlk

log = structlog.get_logger("vblk.device.vhost_user")


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


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """A reply and its fds in one ``sendmsg`` (a reply is small: the socket buffer takes it whole)."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sent = sock.sendmsg([data], ancillary)
    if sent != len(data):
        raise OSError(f"reply cut short: {sent} of {len(data)} bytes sent")


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
        blk.connected = True
        log.info("vhost_user_connected", connection=blk.connections)
        parser = vu.MessageParser()
        reason = "disconnect"
        try:
            while True:
                msg = await recv_message(conn, parser)
                if msg is None:
                    break
                reply = await blk.handle(msg)
                fds, blk.reply_fds = blk.reply_fds, []
                try:
                    if reply is not None and fds:
                        send_with_fds(conn, reply, fds)
                    elif reply is not None:
                        await loop.sock_sendall(conn, reply)
                finally:
                    for fd in fds:
                        os.close(fd)
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
