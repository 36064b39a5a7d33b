"""Peers and listeners as log lines print them: host:port, [v6]:port, unix:PATH."""

from __future__ import annotations

import socket
import tempfile

from service.addresses import format_peer, join_host_port


def test_tuples_and_names() -> None:
    assert format_peer(("127.0.0.1", 49972)) == "127.0.0.1:49972"
    assert format_peer(("::1", 49972, 0, 0)) == "[::1]:49972"
    assert format_peer(("fe80::1%eth0", 22, 0, 2)) == "[fe80::1%eth0]:22"
    assert format_peer("/run/vblk/http.sock") == "unix:/run/vblk/http.sock"
    assert format_peer("") == "unix"
    assert format_peer(b"") == "unix"
    assert format_peer(b"\0vblk-test") == "unix:@vblk-test"
    assert format_peer((3, 1024)) == "vsock:3:1024"
    assert format_peer(None) == "unknown"
    assert format_peer(("host",)) == "unknown"
    assert join_host_port("10.0.0.1", 80) == "10.0.0.1:80"
    assert join_host_port("2001:db8::1", 443) == "[2001:db8::1]:443"


def test_real_sockets() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            host, port = client.getsockname()
            accepted, peername = server.accept()
            with accepted:
                assert format_peer(peername) == f"{host}:{port}"
    with tempfile.TemporaryDirectory() as directory, socket.socket(socket.AF_UNIX) as server:
        path = f"{directory}/s"
        server.bind(path)
        server.listen()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            accepted, peername = server.accept()
            with accepted:
                assert format_peer(peername) == "unix"  # a client's socket has no name
                assert format_peer(client.getpeername()) == f"unix:{path}"
