"""Socket addresses as vblk prints them: ``127.0.0.1:49972``, ``[::1]:49972``, ``unix:/run/x.sock``.

Service layer, shared by the front ends: one spelling of a peer or a listener in log lines,
whatever the address family, instead of the tuple ``getpeername()`` returns.
"""

from __future__ import annotations


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (RFC 3986 section 3.2.2)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_peer(peername: object) -> str:
    """A socket address from ``getpeername()`` / ``get_extra_info("peername")`` as text.

    - ``(host, port)`` (IPv4) and ``(host, port, flowinfo, scope_id)`` (IPv6) → ``host:port``
      and ``[host]:port``;
    - a unix socket path → ``unix:PATH``; a Linux abstract name (bytes starting with NUL) →
      ``unix:@NAME``; the empty name of an unbound unix client → ``unix``;
    - ``(cid, port)`` of AF_VSOCK → ``vsock:CID:PORT``;
    - anything else (None: the transport is gone) → ``unknown``.
    """
    if isinstance(peername, tuple) and len(peername) >= 2 and isinstance(peername[1], int):
        host = peername[0]
        if isinstance(host, str):
            return join_host_port(host, peername[1])
        if isinstance(host, int):
            return f"vsock:{host}:{peername[1]}"
        return "unknown"
    if isinstance(peername, bytes | bytearray):
        peername = bytes(peername).decode(errors="backslashreplace")
    if isinstance(peername, str):
        if not peername:
            return "unix"
        return f"unix:@{peername[1:]}" if peername[0] == "\0" else f"unix:{peername}"
    return "unknown"
