"""The NBD channel's direct socket writes: what the kernel does not take comes back as copies."""

from __future__ import annotations

import asyncio
import socket
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from service.nbd.channel import Channel, PollCounts, _writev


def _drain(sock: socket.socket) -> bytes:
    got = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(got)
        if not chunk:
            return bytes(got)
        got += chunk


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300_000), min_size=1, max_size=40))
def test_sent_bytes_then_the_returned_rest_are_the_chunks_in_order(chunks: list[bytes]) -> None:
    a, b = socket.socketpair()
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a.setblocking(False)
        b.setblocking(False)
        views: list[bytes | memoryview] = [memoryview(c) if i % 2 else c for i, c in enumerate(chunks)]
        rest = _writev(a.fileno(), views)
        assert all(isinstance(r, bytes) for r in rest)  # copies: nothing refers to the views
        assert _drain(b) + b"".join(rest) == b"".join(chunks)
    finally:
        a.close()
        b.close()


def test_more_chunks_than_iov_max_all_arrive() -> None:
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        b.setblocking(False)
        chunks: list[bytes | memoryview] = [bytes([i % 256]) * 3 for i in range(3000)]
        rest = _writev(a.fileno(), chunks)
        assert _drain(b) + b"".join(rest) == b"".join(bytes(c) for c in chunks)
    finally:
        a.close()
        b.close()


def test_a_closed_peer_leaves_everything_to_the_transport() -> None:
    a, b = socket.socketpair()
    b.close()
    try:
        a.setblocking(False)
        rest = _writev(a.fileno(), [b"header", memoryview(b"payload")])
        assert b"".join(rest) == b"headerpayload"
    finally:
        a.close()


async def _echo_rounds(window_us: float, client_delay: float, rounds: int) -> tuple[Channel, PollCounts]:
    """A channel that answers each byte and then polls; a client that waits ``client_delay``."""
    loop = asyncio.get_running_loop()
    server_sock, client_sock = socket.socketpair()
    counts = PollCounts()
    channels: list[Channel] = []

    async def handler(channel: Channel) -> None:
        while data := await channel.read():
            channel.write(bytes(data))
            channel.poll_after_flush()

    def make() -> Channel:
        channel = Channel(handler, poll=window_us / 1e6, poll_counts=counts)
        channels.append(channel)
        return channel

    await loop.connect_accepted_socket(make, server_sock)

    def client() -> None:
        for _ in range(rounds):
            client_sock.sendall(b"r")
            assert client_sock.recv(1) == b"r"
            time.sleep(client_delay)
        client_sock.close()

    await asyncio.to_thread(client)
    for _ in range(100):
        if channels[0].closed:
            break
        await asyncio.sleep(0.01)
    return channels[0], counts


async def test_a_client_that_asks_again_at_once_is_caught_by_the_poll() -> None:
    channel, counts = await _echo_rounds(window_us=20_000, client_delay=0, rounds=20)
    assert counts.hits >= 15, counts
    assert channel._poll_window == channel._poll_max


async def test_a_client_too_slow_to_catch_stops_costing_polls() -> None:
    channel, counts = await _echo_rounds(window_us=2_000, client_delay=0.03, rounds=20)
    # 2 ms, 1 ms, ... down to nothing: after a handful of misses the channel stops polling.
    assert counts.hits == 0
    assert counts.misses <= 8, counts
    assert channel._poll_window == 0
