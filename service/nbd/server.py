"""The NBD server: its listeners, its connections, and how it stops.

Service layer, NBD front end. It schedules work and hands bytes on: the connection's bytes move
through :mod:`service.nbd.channel`, negotiation, framing and replies are the codec's
(:mod:`service.nbd.protocol`, :mod:`service.nbd.replies`); every data request goes through the
disk's virtqueues.
Each accepted client is a :class:`service.nbd.connection.Connection`; the server holds the
listeners, what its connections share (:class:`service.nbd.settings.ServerState`), and the
shutdown: stop accepting, answer new requests ESHUTDOWN, let those in flight finish.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping, Sequence
from typing import Any, cast

import structlog

from service.latency import FrontendObserver
from service.nbd.channel import Channel, PollCounts
from service.nbd.connection import Connection
from service.nbd.settings import NbdExport, NbdLimits, NbdTls, ServerState

log = structlog.get_logger("vblk.nbd")


class NbdServer:
    """Serves ``exports`` over TCP and/or unix sockets until :meth:`close`."""

    def __init__(
        self,
        exports: Mapping[str, NbdExport],
        *,
        default_export: str | None = None,
        on_request: FrontendObserver | None = None,
        limits: NbdLimits | None = None,
        tls: NbdTls | None = None,
    ) -> None:
        self.exports = exports
        self.limits = limits or NbdLimits()
        self.default_export = default_export if default_export is not None else next(iter(exports), None)
        self.state = ServerState(exports, self.default_export, self.limits, tls, on_request)
        self.refused_total = 0
        self.polls = PollCounts()
        self._servers: list[asyncio.Server] = []
        self._connections: set[Connection] = set()
        self.connections_total = 0

    @property
    def closing(self) -> bool:
        return self.state.closing

    @property
    def connections(self) -> int:
        return len(self._connections)

    def _protocol(self) -> Channel:
        return Channel(self._accept, poll=self.limits.poll_us / 1e6, poll_counts=self.polls)

    async def listen_tcp(self, host: str, port: int) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._protocol, host, port, reuse_address=True)
        self._servers.append(server)
        # Typeshed says a tuple, uvloop gives a list: read it untyped (compiled code checks types).
        sockets: Sequence[socket.socket] = cast(Any, server).sockets
        return [sock.getsockname()[:2] for sock in sockets]

    async def listen_unix(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_unix_server(self._protocol, path))

    async def listen_socket(self, sock: socket.socket) -> None:
        """Serve on an already bound and listening socket (socket activation)."""
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(self._protocol, sock=sock)
        else:
            server = await loop.create_server(self._protocol, sock=sock)
        self._servers.append(server)

    async def _accept(self, channel: Channel) -> None:
        if len(self._connections) >= self.limits.max_connections:
            self.refused_total += 1
            log.warning("nbd_connection_refused", peer=channel.peer(), limit=self.limits.max_connections)
            channel.close()
            return
        connection = Connection(self.state, channel)
        self._connections.add(connection)
        self.connections_total += 1
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)

    async def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, answer new requests ESHUTDOWN, let those in flight finish, disconnect.

        Connections still busy after ``timeout`` seconds are cut.
        """
        self.state.closing = True
        for server in self._servers:
            server.close()
        await self._end(list(self._connections), timeout)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def close_export(self, name: str, timeout: float = 10.0) -> int:
        """End the connections that chose export ``name`` (it goes away; take it out of the
        exports first, so no new one can choose it): their new requests are answered ESHUTDOWN,
        those in flight finish, then they are disconnected, or cut after ``timeout`` seconds.
        Returns how many there were. Other exports' connections go on untouched."""
        chosen = [c for c in self._connections if c.export is not None and c.export.name == name]
        await self._end(chosen, timeout)
        return len(chosen)

    async def _end(self, connections: list[Connection], timeout: float) -> None:
        for connection in connections:
            connection.shutdown()
        tasks = [c.channel.task for c in connections if c.channel.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                log.warning("nbd_connections_cut", count=len(late), timeout=timeout)
                await asyncio.wait(late)
