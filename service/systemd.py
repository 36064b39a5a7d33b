"""systemd integration without a dependency: ``sd_notify`` and socket activation (``LISTEN_FDS``).

Service layer, used by :func:`service.app.serve`. With ``Type=notify`` systemd waits for
``READY=1`` before it counts vblk as started (listeners bound, disks ready), and is told
``STOPPING=1`` when the drain begins. With socket activation (``vblk-nbd.socket``,
``vblk-http.socket``) systemd binds the listening sockets and passes them as file
descriptors 3, 4, ...; their names (``FileDescriptorName=nbd`` / ``http``) say which front
end each one belongs to. Outside systemd both are no-ops.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping

import structlog

log = structlog.get_logger("vblk.systemd")

SD_LISTEN_FDS_START = 3
FRONT_ENDS = ("nbd", "http")


class SocketActivationError(ValueError):
    """The inherited sockets cannot be used (unknown name, not a listening stream socket)."""


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``"READY=1"``, ``"STOPPING=1"``, ``"STATUS=..."``) to ``$NOTIFY_SOCKET``.

    Returns False when there is no notification socket (not started by systemd with
    ``Type=notify``) or the message could not be sent; never raises.
    """
    environ = os.environ if environ is None else environ
    address = environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False  # unset, or a transport vblk does not speak (vsock:)
    if address[0] == "@":
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify_failed", state=state.split("=", 1)[0], error=str(exc))
        return False
    return True


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[tuple[str, int]]:
    """The sockets systemd passed us as ``(name, fd)`` pairs, in order; empty if none.

    Follows ``sd_listen_fds(unset_environment=1)``: only for our own pid (``LISTEN_PID``),
    file descriptors from 3, names from ``LISTEN_FDNAMES`` (``unknown`` when missing); the
    variables are removed so children do not inherit them, and each fd is made close-on-exec.
    """
    environ = os.environ if environ is None else environ
    try:
        pid = environ.get("LISTEN_PID")
        count_text = environ.get("LISTEN_FDS")
        if pid is None or count_text is None or not pid.isdigit() or int(pid) != os.getpid():
            return []
        if not count_text.isdigit():
            raise SocketActivationError(f"LISTEN_FDS={count_text!r} is not a number")
        count = int(count_text)
        names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
        if names and len(names) != count:
            raise SocketActivationError(f"LISTEN_FDNAMES has {len(names)} names for {count} descriptors")
        result = []
        for i in range(count):
            fd = SD_LISTEN_FDS_START + i
            os.set_inheritable(fd, False)
            result.append((names[i] if names else "unknown", fd))
        return result
    finally:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            environ.pop(key, None)


def front_end_of(name: str) -> str | None:
    """``nbd`` or ``http`` for a descriptor name (``nbd``, ``vblk-http.socket``, ...), else None."""
    lowered = name.lower()
    matches = [front_end for front_end in FRONT_ENDS if front_end in lowered]
    return matches[0] if len(matches) == 1 else None


def inherited_sockets(environ: MutableMapping[str, str] | None = None) -> dict[str, list[socket.socket]]:
    """Listening sockets passed by systemd, by front end (``{"nbd": [...], "http": [...]}``).

    Raises :class:`SocketActivationError` for a descriptor that names no front end or is not a
    listening stream socket: serving on a guess would expose a disk where nobody meant to.
    """
    sockets: dict[str, list[socket.socket]] = {}
    fds = listen_fds(environ)
    try:
        for name, fd in fds:
            front_end = front_end_of(name)
            if front_end is None:
                raise SocketActivationError(
                    f"inherited socket {fd} is named {name!r}: set FileDescriptorName=nbd or "
                    "FileDescriptorName=http in its .socket unit"
                )
            sock = socket.socket(fileno=fd)
            sockets.setdefault(front_end, []).append(sock)
            if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_ACCEPTCONN
            ):
                raise SocketActivationError(f"inherited socket {fd} ({name}) is not a listening stream")
            sock.setblocking(False)
    except (SocketActivationError, OSError) as exc:
        for group in sockets.values():
            for sock in group:
                sock.close()
        if isinstance(exc, OSError):
            raise SocketActivationError(f"inherited sockets: {exc}") from exc
        raise
    if fds:
        log.info(
            "socket_activation",
            sockets={k: [describe(s) for s in group] for k, group in sockets.items()},
        )
    return sockets


def describe(sock: socket.socket) -> str:
    """``host:port``, ``[v6]:port``, ``unix:PATH`` or ``unix:@NAME`` of a bound socket."""
    name = sock.getsockname()
    if isinstance(name, tuple):
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(name, bytes):
        name = "@" + name[1:].decode(errors="replace")
    return f"unix:{name}"
