"""The back-end channel of vblk's vhost-user back end, and a resize told on it, without QEMU.

A scripted front end negotiates VHOST_USER_PROTOCOL_F_BACKEND_REQ, hands over one end of a
socketpair with SET_BACKEND_REQ_FD and reads what the back end sends there; it answers the
config-change notice the way QEMU 7.2 does (GET_CONFIG on the main socket first, the answer
after), which only works if waiting for the answer never holds up the main socket. Broken
and hostile SET_BACKEND_REQ_FD messages (no fd, two, a payload, an eventfd, the feature not
negotiated) are refused without the back end going down.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from device.block.memory import MemoryNode
from device.spec import vhost_user as vu
from device.vhost_user import protocol
from device.vhost_user.protocol import ShrinkRefusedError, VhostUserBlk
from tests.device.test_vhost_user_backend import FEATURES, UVA, FrontEnd, connect, memfd, served

MiB = 1 << 20
CONFIG_LEN = 57  # QEMU 7.2's GET_CONFIG length
BACKEND_REQ = 1 << vu.ProtocolFeature.BACKEND_REQ
REPLY_ACK = 1 << vu.ProtocolFeature.REPLY_ACK
CONFIG = 1 << vu.ProtocolFeature.CONFIG


async def capacity(fe: FrontEnd) -> int:
    """The capacity (sectors) GET_CONFIG answers, as QEMU asks for it."""
    reply = await fe.call(vu.Request.GET_CONFIG, vu.ConfigSpace(0, CONFIG_LEN, 0, bytes(CONFIG_LEN)).encode())
    (sectors,) = struct.unpack_from("<Q", vu.ConfigSpace.decode(reply).data)
    return int(sectors)


async def recv_exactly(sock: socket.socket, n: int, timeout: float = 5) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(data)), timeout)
        if not chunk:
            break
        data += chunk
    return data


class Session:
    """A front end connected to vblk's back end, with its end of the back-end channel, and the
    guest RAM and eventfds of its device once started."""

    def __init__(self, fe: FrontEnd, channel: socket.socket | None) -> None:
        self.fe = fe
        self.channel = channel
        self.fds: list[int] = []

    def start(self) -> None:
        """QEMU's vhost_dev_start for one ring of 8 (no acks asked: the next reply orders it)."""
        if not self.fds:
            ram, kick, call = memfd(MiB), os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
            self.fds = [ram, kick, call]
        ram, kick, call = self.fds
        fe = self.fe
        fe.send(vu.Request.SET_FEATURES, vu.encode_u64(FEATURES))
        fe.send(vu.Request.SET_MEM_TABLE, vu.encode_memory_table([vu.MemoryRegion(0, MiB, UVA, 0)]), [ram])
        fe.send(vu.Request.SET_VRING_NUM, vu.VringState(0, 8).encode())
        fe.send(vu.Request.SET_VRING_BASE, vu.VringState(0, 0).encode())
        fe.send(
            vu.Request.SET_VRING_ADDR, vu.VringAddr(0, 0, UVA + 0x1000, UVA + 0x3000, UVA + 0x2000).encode()
        )
        fe.send(vu.Request.SET_VRING_CALL, vu.VringFile(0).encode(), [call])
        fe.send(vu.Request.SET_VRING_KICK, vu.VringFile(0).encode(), [kick])
        fe.send(vu.Request.SET_VRING_ENABLE, vu.VringState(0, 1).encode())

    async def stop(self) -> None:
        self.fe.send(vu.Request.SET_VRING_ENABLE, vu.VringState(0, 0).encode())
        await self.fe.call(vu.Request.GET_VRING_BASE, vu.VringState(0, 0).encode())

    def close(self) -> None:
        self.fe.sock.close()
        if self.channel is not None:
            self.channel.close()
        for fd in self.fds:
            os.close(fd)


async def open_session(
    path: Path, protocol_features: int, *, channel: bool = True, start: bool = True
) -> Session:
    """QEMU 7.2's realize (features, protocol features, SET_BACKEND_REQ_FD, GET_CONFIG), then
    with ``start`` its device start, as when the guest's driver sets DRIVER_OK."""
    fe = await connect(path)
    offered = vu.decode_u64(await fe.call(vu.Request.GET_PROTOCOL_FEATURES))
    assert offered & BACKEND_REQ, f"{offered:#x}"  # the back end offers the channel
    fe.send(vu.Request.SET_PROTOCOL_FEATURES, vu.encode_u64(protocol_features))
    ours: socket.socket | None = None
    if channel:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        try:
            if protocol_features & REPLY_ACK:  # as QEMU sends it: flags 0x9, no payload, one fd
                assert await fe.acked(vu.Request.SET_BACKEND_REQ_FD, b"", [theirs.fileno()]) == 0
            else:
                fe.send(vu.Request.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
        finally:
            theirs.close()  # the back end has its own copy now
    fe.send(vu.Request.SET_OWNER)
    session = Session(fe, ours)
    assert await capacity(fe) > 0
    if start:
        session.start()
        assert await capacity(fe) > 0  # every message before it was handled
    return session


@pytest.fixture
async def backend() -> AsyncIterator[tuple[VhostUserBlk, Path]]:
    async with served(MemoryNode(4 * MiB)) as (blk, _server, path):
        yield blk, path


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_resize_is_told_on_the_channel_and_answered_after_get_config(
    backend: tuple[VhostUserBlk, Path],
) -> None:
    blk, path = backend
    session = await open_session(path, CONFIG | REPLY_ACK | BACKEND_REQ)
    fe, channel = session.fe, session.channel
    assert channel is not None
    try:
        assert blk.protocol_features & BACKEND_REQ and blk.channel is not None
        assert await capacity(fe) == 4 * MiB // 512
        resizing = asyncio.ensure_future(blk.resize(6 * MiB))
        # The notice: header {request 2 (BACKEND_CONFIG_CHANGE_MSG), flags version 1 | NEED_REPLY, size 0}.
        notice = await recv_exactly(channel, vu.HEADER_SIZE)
        assert notice == struct.pack("=III", 2, 0x1 | 0x8, 0), notice.hex()
        assert not resizing.done()  # waiting for the answer...
        # ...while the main socket still answers, as QEMU's handler needs: GET_CONFIG first.
        assert await capacity(fe) == 6 * MiB // 512
        assert not resizing.done()
        channel.send(vu.encode_reply(vu.BackendRequest.CONFIG_CHANGE_MSG, vu.encode_u64(0)))
        outcome = await asyncio.wait_for(resizing, 5)
        assert (outcome.old_size, outcome.size, outcome.notice) == (4 * MiB, 6 * MiB, "acknowledged")
        assert blk.node.size == 6 * MiB and blk.channel.answered == 1
        # An explicit shrink is told the same way; the front end's failed answer is reported.
        resizing = asyncio.ensure_future(blk.resize(5 * MiB, shrink=True))
        assert await recv_exactly(channel, vu.HEADER_SIZE) == struct.pack("=III", 2, 0x9, 0)
        channel.send(vu.encode_reply(vu.BackendRequest.CONFIG_CHANGE_MSG, vu.encode_u64(1)))
        outcome = await asyncio.wait_for(resizing, 5)
        assert outcome.notice == "unacknowledged" and "answered 1" in outcome.message
        assert await capacity(fe) == 5 * MiB // 512
    finally:
        session.close()
    await wait_for(lambda: not blk.connected, "the session to end")
    assert blk.channel is None  # closed at disconnect


async def test_without_reply_ack_the_notice_asks_for_no_answer(
    backend: tuple[VhostUserBlk, Path],
) -> None:
    blk, path = backend
    session = await open_session(path, CONFIG | BACKEND_REQ)
    assert session.channel is not None
    try:
        await wait_for(lambda: blk.channel is not None, "the channel")
        outcome = await blk.resize(8 * MiB)
        assert outcome.notice == "sent" and outcome.told
        assert await recv_exactly(session.channel, vu.HEADER_SIZE) == struct.pack("=III", 2, 0x1, 0)
        assert await capacity(session.fe) == 8 * MiB // 512
    finally:
        session.close()


async def test_an_unanswered_notice_times_out_and_a_late_answer_is_dropped(
    backend: tuple[VhostUserBlk, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    blk, path = backend
    monkeypatch.setattr(protocol, "ANSWER_TIMEOUT", 0.2)
    session = await open_session(path, CONFIG | REPLY_ACK | BACKEND_REQ)
    channel = session.channel
    assert channel is not None
    try:
        outcome = await blk.resize(5 * MiB)
        assert outcome.notice == "unacknowledged" and outcome.told and blk.node.size == 5 * MiB
        await recv_exactly(channel, vu.HEADER_SIZE)
        channel.send(vu.encode_reply(vu.BackendRequest.CONFIG_CHANGE_MSG, vu.encode_u64(0)))  # late
        resizing = asyncio.ensure_future(blk.resize(6 * MiB))
        await recv_exactly(channel, vu.HEADER_SIZE)
        await asyncio.sleep(0.05)
        assert not resizing.done()  # the late answer went to the first notice, not this one
        channel.send(vu.encode_reply(vu.BackendRequest.CONFIG_CHANGE_MSG, vu.encode_u64(0)))
        assert (await asyncio.wait_for(resizing, 5)).notice == "acknowledged"
    finally:
        session.close()


async def test_no_channel_the_resize_still_happens_and_says_so(
    backend: tuple[VhostUserBlk, Path],
) -> None:
    blk, path = backend
    outcome = await blk.resize(5 * MiB)  # nobody connected
    assert outcome.notice == "no_front_end" and not outcome.told
    session = await open_session(path, CONFIG | REPLY_ACK, channel=False)  # BACKEND_REQ left out
    try:
        assert await capacity(session.fe) == 5 * MiB // 512
        outcome = await blk.resize(7 * MiB)
        assert outcome.notice == "no_channel" and "re-plugged" in outcome.message
        assert await capacity(session.fe) == 7 * MiB // 512  # GET_CONFIG answers the new size
        # A channel handed over without the feature negotiated is refused (and closed).
        ours, theirs = socket.socketpair()
        try:
            assert await session.fe.acked(vu.Request.SET_BACKEND_REQ_FD, b"", [theirs.fileno()]) != 0
            theirs.close()
            assert blk.channel is None
            ours.settimeout(5)
            assert ours.recv(1) == b""  # the back end kept no copy of its end
        finally:
            ours.close()
            theirs.close()
    finally:
        session.close()


async def test_a_closed_channel_does_not_stop_the_resize(
    backend: tuple[VhostUserBlk, Path],
) -> None:
    blk, path = backend
    session = await open_session(path, CONFIG | REPLY_ACK | BACKEND_REQ)
    assert session.channel is not None
    try:
        session.channel.close()
        session.channel = None
        await wait_for(lambda: blk.channel is not None and blk.channel.closed, "the channel to close")
        outcome = await blk.resize(5 * MiB)
        assert outcome.notice == "no_channel" and "closed" in outcome.message
        assert await capacity(session.fe) == 5 * MiB // 512
    finally:
        session.close()


async def test_shrinking_needs_asking_and_sizes_must_be_whole_blocks(
    backend: tuple[VhostUserBlk, Path],
) -> None:
    blk, _path = backend
    with pytest.raises(ShrinkRefusedError, match="smaller than the disk"):
        await blk.resize(2 * MiB)
    with pytest.raises(ValueError, match="multiple of the block size"):
        await blk.resize(4 * MiB + 100)
    with pytest.raises(ValueError, match="multiple of the block size"):
        await blk.resize(0)
    assert blk.node.size == 4 * MiB and blk.resizes == []
    assert (await blk.resize(4 * MiB)).notice == "unchanged"
    outcome = await blk.resize(2 * MiB, shrink=True)
    assert (outcome.old_size, outcome.size) == (4 * MiB, 2 * MiB) and blk.node.size == 2 * MiB


async def test_a_repeated_channel_replaces_the_first(backend: tuple[VhostUserBlk, Path]) -> None:
    blk, path = backend
    session = await open_session(path, CONFIG | BACKEND_REQ | REPLY_ACK)
    first = session.channel
    assert first is not None
    second, theirs = socket.socketpair()
    second.setblocking(False)
    try:
        assert await session.fe.acked(vu.Request.SET_BACKEND_REQ_FD, b"", [theirs.fileno()]) == 0
        theirs.close()
        assert await recv_exactly(first, 1) == b""  # the first one was closed
        resizing = asyncio.ensure_future(blk.resize(5 * MiB))
        assert await recv_exactly(second, vu.HEADER_SIZE) == struct.pack("=III", 2, 0x9, 0)
        second.send(vu.encode_reply(vu.BackendRequest.CONFIG_CHANGE_MSG, vu.encode_u64(0)))
        assert (await asyncio.wait_for(resizing, 5)).notice == "acknowledged"
    finally:
        second.close()
        theirs.close()
        session.close()


@pytest.mark.parametrize(
    "case",
    ["no fd", "two fds", "a payload"],
)
@pytest.mark.expect_errors("vhost_user_protocol_error")
async def test_a_malformed_set_backend_req_fd_ends_only_that_session(
    backend: tuple[VhostUserBlk, Path], case: str
) -> None:
    blk, path = backend
    fe = await connect(path)
    fe.send(vu.Request.SET_PROTOCOL_FEATURES, vu.encode_u64(CONFIG | BACKEND_REQ))
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        if case == "no fd":
            fe.send(vu.Request.SET_BACKEND_REQ_FD)
        elif case == "two fds":
            fe.send(vu.Request.SET_BACKEND_REQ_FD, b"", [pairs[0][1].fileno(), pairs[1][1].fileno()])
        else:
            fe.send(vu.Request.SET_BACKEND_REQ_FD, vu.encode_u64(0), [pairs[0][1].fileno()])
        for _ours, theirs in pairs:
            theirs.close()
        assert await asyncio.get_running_loop().sock_recv(fe.sock, 16) == b""  # closed on us
        for ours, _theirs in pairs:
            ours.settimeout(5)
            assert ours.recv(1) == b""  # no fd of it was kept
        assert blk.channel is None
    finally:
        fe.sock.close()
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
    # The back end serves the next front end.
    session = await open_session(path, CONFIG | BACKEND_REQ | REPLY_ACK)
    try:
        assert await capacity(session.fe) == 4 * MiB // 512 and blk.channel is not None
    finally:
        session.close()


async def test_an_fd_that_is_no_socket_is_refused(backend: tuple[VhostUserBlk, Path]) -> None:
    blk, path = backend
    fe = await connect(path)
    fe.send(vu.Request.SET_PROTOCOL_FEATURES, vu.encode_u64(CONFIG | BACKEND_REQ | REPLY_ACK))
    event = os.eventfd(0)
    try:
        assert await fe.acked(vu.Request.SET_BACKEND_REQ_FD, b"", [event]) != 0
        assert blk.channel is None
        assert await capacity(fe) == 4 * MiB // 512  # and the session goes on
    finally:
        os.close(event)
        fe.sock.close()


@pytest.mark.expect_errors("vhost_user_backend_channel_error")
async def test_garbage_on_the_channel_closes_it_not_the_session(
    backend: tuple[VhostUserBlk, Path],
) -> None:
    blk, path = backend
    session = await open_session(path, CONFIG | BACKEND_REQ | REPLY_ACK)
    assert session.channel is not None
    try:
        # A request the back end never sent an answer for, then bytes of another version.
        session.channel.send(vu.encode_message(vu.BackendRequest.VRING_CALL, vu.encode_u64(0)))
        await wait_for(lambda: blk.channel is not None and blk.channel.closed, "the channel to close")
        assert await capacity(session.fe) == 4 * MiB // 512
        assert (await blk.resize(5 * MiB)).notice == "no_channel"
    finally:
        session.close()


async def test_a_resize_while_the_device_is_stopped_is_told_when_it_starts(
    backend: tuple[VhostUserBlk, Path],
) -> None:
    """QEMU ignores the notice while its vhost device is stopped (no guest driver, a guest
    reset) and keeps its cached config: the notice waits for the next ring start."""
    blk, path = backend
    session = await open_session(path, CONFIG | REPLY_ACK | BACKEND_REQ, start=False)
    channel = session.channel
    assert channel is not None
    try:
        outcome = await blk.resize(5 * MiB)
        assert outcome.notice == "deferred" and outcome.told and blk.node.size == 5 * MiB
        session.start()
        notice = await recv_exactly(channel, vu.HEADER_SIZE)  # sent once the ring started
        assert notice == struct.pack("=III", 2, 0x9, 0)
        assert await capacity(session.fe) == 5 * MiB // 512
        channel.send(vu.encode_reply(vu.BackendRequest.CONFIG_CHANGE_MSG, vu.encode_u64(0)))
        await wait_for(lambda: blk.channel is not None and blk.channel.answered == 1, "the answer")
        # A stop (a guest reset), a resize, a start: told again.
        await session.stop()
        assert (await blk.resize(6 * MiB)).notice == "deferred"
        session.start()
        assert await recv_exactly(channel, vu.HEADER_SIZE) == struct.pack("=III", 2, 0x9, 0)
        channel.send(vu.encode_reply(vu.BackendRequest.CONFIG_CHANGE_MSG, vu.encode_u64(0)))
        await wait_for(lambda: blk.channel is not None and blk.channel.answered == 2, "the answer")
    finally:
        session.close()
