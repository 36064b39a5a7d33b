"""Connecting to a vhost-user back end that does not answer holds up only that disk, never the loop.

The front end's connection and session handshake are asynchronous: a back end that accepts the
connection and then says nothing fails the open after the transport's timeout, and the event
loop goes on serving meanwhile.
"""

from __future__ import annotations

import asyncio
import tempfile
import time

import pytest

from device.memory import GuestMemory
from driver.transport import TransportError
from driver.vhost_user import VhostUserTransport

MiB = 1 << 20


async def test_a_silent_back_end_times_out_without_blocking_the_loop() -> None:
    with tempfile.TemporaryDirectory(prefix="vblk-") as tmp:
        path = f"{tmp}/silent.sock"
        held: list[asyncio.StreamWriter] = []

        async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)  # accepted, never answered

        server = await asyncio.start_unix_server(silent, path)
        memory = GuestMemory(8 * MiB)
        transport = VhostUserTransport(path, memory, timeout=0.5)
        try:
            opening = asyncio.ensure_future(transport.open())
            started = time.monotonic()
            gaps = []
            while not opening.done():
                before = time.monotonic()
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - before)
            with pytest.raises(TransportError, match="GET_FEATURES"):
                opening.result()
            assert 0.4 < time.monotonic() - started < 5
            assert len(gaps) > 10 and max(gaps) < 0.2, gaps  # the loop ran all along
        finally:
            transport.close()
            memory.close()
            for writer in held:
                writer.close()
            server.close()
            await server.wait_closed()
