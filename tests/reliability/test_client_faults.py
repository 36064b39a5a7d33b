"""Client faults: disconnects mid-header, mid-payload and mid-reply, half-open sockets, slow
readers, too many clients. The server frees everything and other clients do not notice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator

import pytest

from service.nbd.constants import NBD_REQUEST_MAGIC, Command
from service.nbd.settings import NbdLimits
from tests.nbdclient import WireClient
from tests.reliability.conftest import FaultRig, MiB, make_fault_rig
from tests.service.conftest import nbdsh

BLOCK = 4096


class FaultProxy:
    """A unix-socket proxy that forwards a real client's bytes and then breaks on cue.

    ``cut_up_after``: close both sides after that many client→server bytes;
    ``cut_down_after``: after that many server→client bytes; ``stall_down``: stop reading
    from the server altogether (a client that never reads its replies).
    """

    def __init__(
        self,
        target: str,
        path: str,
        *,
        cut_up_after: int | None = None,
        cut_down_after: int | None = None,
        stall_down: bool = False,
    ) -> None:
        self.target, self.path = target, path
        self.cut_up_after, self.cut_down_after, self.stall_down = cut_up_after, cut_down_after, stall_down
        self.server: asyncio.Server | None = None
        self.cut = asyncio.Event()

    async def __aenter__(self) -> FaultProxy:
        self.server = await asyncio.start_unix_server(self._handle, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int | None, stall: bool
    ) -> None:
        moved = 0
        while not stall:
            data = await reader.read(65536)
            if not data:
                break
            if limit is not None and moved + len(data) >= limit:
                writer.write(data[: limit - moved])
                self.cut.set()
                break
            writer.write(data)
            moved += len(data)
            await writer.drain()
        if stall:
            await self.cut.wait()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_unix_connection(self.target)
        up = asyncio.ensure_future(self._pump(client_r, server_w, self.cut_up_after, False))
        down = asyncio.ensure_future(self._pump(server_r, client_w, self.cut_down_after, self.stall_down))
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        for task in (up, down):
            task.cancel()
        for w in (server_w, client_w):
            with contextlib.suppress(Exception):
                w.transport.abort()


@pytest.fixture
async def rig() -> AsyncIterator[FaultRig]:
    directory = tempfile.mkdtemp(prefix="vblk-")
    limits = NbdLimits(send_timeout=1.0, idle_timeout=1.0, negotiation_timeout=1.0, max_connections=8)
    rig = await make_fault_rig(directory, limits=limits)
    try:
        yield rig
    finally:
        await rig.service.stop()
        shutil.rmtree(directory, ignore_errors=True)


async def healthy_client(rig: FaultRig, stop: asyncio.Event) -> int:
    """A well-behaved client doing verified I/O the whole time; returns its request count."""
    client = await WireClient.connect(rig.socket)
    await client.go()
    done = 0
    while not stop.is_set():
        data = os.urandom(BLOCK)
        offset = 32 * MiB + (done % 64) * BLOCK
        client.request(Command.WRITE, done, offset, BLOCK, payload=data)
        assert (await client.simple_reply())[1] == 0
        client.request(Command.READ, done, offset, BLOCK)
        assert (await client.simple_reply(BLOCK))[2] == data
        done += 1
    client.close()
    return done


async def settled(rig: FaultRig, baseline_tasks: int, baseline_dma: int) -> None:
    """Every connection gone, every descriptor and buffer free, no task left behind."""
    driver = rig.service.disks["disk0"].driver
    nbd = rig.service.nbd
    assert nbd is not None
    for _ in range(400):
        stats = driver.statistics()
        if (
            nbd.connections == 0
            and stats.inflight == 0
            and driver.dma.free_bytes == baseline_dma
            and len(asyncio.all_tasks()) <= baseline_tasks
        ):
            break
        await asyncio.sleep(0.01)
    stats = driver.statistics()
    assert nbd.connections == 0
    assert stats.inflight == 0 and all(q.free_descriptors == q.size for q in stats.queues)
    assert driver.dma.free_bytes == baseline_dma
    assert len(asyncio.all_tasks()) <= baseline_tasks, asyncio.all_tasks()


def header(command: int, cookie: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, command, cookie, offset, length)


async def test_broken_clients_leave_nothing_behind(rig: FaultRig) -> None:
    driver = rig.service.disks["disk0"].driver
    baseline_dma = driver.dma.free_bytes
    baseline_tasks = len(asyncio.all_tasks())
    stop = asyncio.Event()
    healthy = asyncio.ensure_future(healthy_client(rig, stop))
    await asyncio.sleep(0.05)
    baseline_tasks += 2  # the healthy client's task and its connection on the server

    async def fresh() -> WireClient:
        client = await WireClient.connect(rig.socket)
        await client.go()
        return client

    # Mid-header.
    client = await fresh()
    client.writer.write(header(Command.READ, 1, 0, BLOCK)[:11])
    await client.writer.drain()
    client.close()
    # Mid-payload: a 1 MiB WRITE of which 1000 bytes arrive.
    client = await fresh()
    client.writer.write(header(Command.WRITE, 2, 0, MiB) + b"x" * 1000)
    await client.writer.drain()
    client.close()
    # Mid-reply: 40 reads of 1 MiB, and the client leaves without reading.
    client = await fresh()
    for cookie in range(40):
        client.request(Command.READ, cookie, cookie * MiB, MiB)
    await client.writer.drain()
    await asyncio.sleep(0.05)
    client.writer.transport.abort()
    # Half-open: requests, then the client shuts its sending side; it still gets its replies.
    client = await fresh()
    for cookie in range(10):
        client.request(Command.READ, cookie, cookie * BLOCK, BLOCK)
    client.writer.write_eof()
    cookies = set()
    for _ in range(10):
        cookie, error, _ = await asyncio.wait_for(client.simple_reply(BLOCK), 5)
        assert error == 0
        cookies.add(cookie)
    assert cookies == set(range(10)) and await client.closed()
    client.close()
    # Real clients through the fault proxy: the reply stream is cut mid-way (data, not holes,
    # so the replies are big).
    await rig.service.disks["disk0"].bytes.write(0, os.urandom(4 * MiB))
    here = os.path.dirname(rig.socket)
    async with FaultProxy(rig.socket, f"{here}/cut.sock", cut_down_after=300_000):
        script = "h = nbd.NBD(); h.connect_uri(uri)\nfor i in range(4):\n    h.pread(1 << 20, i << 20)"
        cut = await nbdsh(f"nbd+unix:///disk0?socket={here}/cut.sock", script, check=False)
        assert cut.returncode != 0 and "nbd.Error" in cut.stderr
    async with FaultProxy(rig.socket, f"{here}/up.sock", cut_up_after=2000):
        script = "h = nbd.NBD(); h.connect_uri(uri); h.pwrite(b'x' * (1 << 20), 0); h.flush()"
        cut = await nbdsh(f"nbd+unix:///disk0?socket={here}/up.sock", script, check=False)
        assert cut.returncode != 0 and "nbd.Error" in cut.stderr
    stop.set()
    assert await healthy > 10
    await settled(rig, baseline_tasks - 2, baseline_dma)


async def test_slow_reader_is_bounded_and_cut_after_send_timeout(rig: FaultRig) -> None:
    driver = rig.service.disks["disk0"].driver
    baseline_dma = driver.dma.free_bytes
    baseline_tasks = len(asyncio.all_tasks())
    client = await WireClient.connect(rig.socket)
    await client.go()
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    for cookie in range(200):  # 200 MiB of replies that will never be read
        client.request(Command.READ, cookie, (cookie % 64) * MiB, MiB)
    await client.writer.drain()
    client.reader._transport.pause_reading()  # type: ignore[attr-defined]
    nbd = rig.service.nbd
    assert nbd is not None
    await asyncio.sleep(0.5)
    [connection] = list(nbd._connections)
    transport = connection.channel.transport
    assert transport is not None
    # Bounded: the high-water mark plus at most one reply is queued, not 200 MiB.
    assert transport.get_write_buffer_size() <= (1 << 20) + MiB + 4096
    assert connection.budget.available >= 0
    # And cut: the send timeout (1 s here) closes the connection; everything is freed.
    for _ in range(300):
        if nbd.connections == 0:
            break
        await asyncio.sleep(0.01)
    assert nbd.connections == 0
    client.close()
    await settled(rig, baseline_tasks, baseline_dma)


async def test_idle_and_negotiation_timeouts_and_connection_limit(rig: FaultRig) -> None:
    # A client that never negotiates is dropped after negotiation_timeout.
    reader, writer = await asyncio.open_unix_connection(rig.socket)
    await reader.readexactly(18)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    # A client that negotiates and then idles is dropped after idle_timeout.
    idle = await WireClient.connect(rig.socket)
    await idle.go()
    assert await asyncio.wait_for(idle.reader.read(), 5) == b""
    idle.close()
    # max_connections = 8: the ninth is closed at once, the eight keep working.
    clients = [await WireClient.connect(rig.socket) for _ in range(8)]
    for client in clients:
        await client.go()
    reader, writer = await asyncio.open_unix_connection(rig.socket)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    for i, client in enumerate(clients):
        client.request(Command.READ, i, 0, BLOCK)
        assert (await client.simple_reply(BLOCK))[1] == 0
        client.close()
    nbd = rig.service.nbd
    assert nbd is not None and nbd.refused_total == 1
