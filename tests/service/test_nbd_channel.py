"""The NBD channel's direct socket writes: what the kernel does not take comes back as copies."""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from service.nbd.server import _writev


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
