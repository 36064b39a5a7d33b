"""The back-end channel: the socket on which the back end speaks first (SET_BACKEND_REQ_FD).

Device layer, beside :mod:`device.vhost_user.protocol`, which keeps one per session. vblk sends
one message on it, BACKEND_CONFIG_CHANGE_MSG: the configuration space changed (a resize), so the
front end rereads it with GET_CONFIG on the main socket and raises the guest's configuration
interrupt. The message has no payload; with NEED_REPLY the front end answers a u64 (0: done)
once it has done so. QEMU sends that GET_CONFIG *before* it answers, so whoever waits for the
answer must not hold up the main socket: the main socket has its own task
(:class:`~device.vhost_user.server.VhostUserServer`), and the answer is awaited here, on the
event loop, by the caller of :meth:`BackendChannel.config_changed` alone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket

import structlog

from device.spec import vhost_user as vu

log = structlog.get_logger("vblk.device.vhost_user")


class ChannelError(Exception):
    """The back-end channel cannot carry the message (gone, full, or broken by the front end)."""


class BackendChannel:
    """One back-end channel: the front end's socket, its answers matched to what asked for one.

    Answers come in the order of the messages that asked for them (the protocol has no ids),
    so each message with NEED_REPLY queues a future that the next answer resolves; a waiter that
    gave up leaves its future in the queue, and its late answer is dropped there.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.sent = 0  # messages sent
        self.answered = 0  # answers received
        self.closed = False
        self._parser = vu.MessageParser()
        self._waiting: collections.deque[asyncio.Future[int]] = collections.deque()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    def adopt(cls, fd: int) -> BackendChannel:
        """The channel on ``fd``, which it owns from now on (closed if refused): refused unless
        it is a unix stream socket."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            raise ChannelError(f"the back-end channel's fd is not a socket ({exc.strerror})") from exc
        if sock.type != socket.SOCK_STREAM or sock.family != socket.AF_UNIX:
            sock.close()
            raise ChannelError("the back-end channel's fd is not a unix stream socket")
        return cls(sock)

    def config_changed(self, *, need_reply: bool) -> asyncio.Future[int] | None:
        """Send BACKEND_CONFIG_CHANGE_MSG; with ``need_reply``, the future of the front end's answer.

        Never waits: the message (12 bytes) goes out whole or not at all, and a front end that
        does not read its channel gets a :class:`ChannelError`, not a stalled caller.
        """
        if self.closed:
            raise ChannelError("the back-end channel is closed")
        data = vu.encode_message(vu.BackendRequest.CONFIG_CHANGE_MSG, need_reply=need_reply)
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            raise ChannelError("the front end does not read its back-end channel (it is full)") from None
        except OSError as exc:
            self.close(f"send failed: {exc.strerror or exc}")
            raise ChannelError(f"the back-end channel failed: {exc.strerror or exc}") from exc
        if sent != len(data):  # the stream is out of step now: nothing more can go on it
            self.close(f"sent {sent} of {len(data)} bytes")
            raise ChannelError("the back-end channel took part of the message")
        self.sent += 1
        if not need_reply:
            return None
        answer: asyncio.Future[int] = self._loop.create_future()
        self._waiting.append(answer)
        return answer

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(self._parser.needed())  # fds the front end attached are dropped
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"receive failed: {exc.strerror or exc}")
            return
        if not data:
            self.close("closed by the front end")
            return
        try:
            for msg in self._parser.feed(data):
                self._answer(msg)
        except vu.VhostUserProtocolError as exc:
            log.error("vhost_user_backend_channel_error", error=str(exc))
            self.close(f"protocol error: {exc}")

    def _answer(self, msg: vu.Message) -> None:
        name = vu.backend_request_name(msg.request)
        if not msg.is_reply or msg.request != vu.BackendRequest.CONFIG_CHANGE_MSG:
            raise vu.VhostUserProtocolError(f"{name} (flags {msg.flags:#x}) is not an answer to vblk")
        if not self._waiting:
            raise vu.VhostUserProtocolError(f"an answer to {name} that nothing asked for")
        status = vu.decode_u64(msg.payload, f"the answer to {name}")
        self.answered += 1
        answer = self._waiting.popleft()
        if not answer.done():  # its waiter gave up: the answer came too late
            answer.set_result(status)

    def close(self, reason: str = "session ended") -> None:
        """Stop listening and close the socket (idempotent); pending answers fail."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        while self._waiting:
            answer = self._waiting.popleft()
            if not answer.done():
                answer.set_exception(ChannelError(f"the back-end channel closed ({reason})"))
        log.info("vhost_user_backend_channel_closed", reason=reason, sent=self.sent, answered=self.answered)
