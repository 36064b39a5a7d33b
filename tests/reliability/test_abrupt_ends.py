"""Abrupt ends: a client that vanishes at any stage leaves ``vblk serve`` as it found it.

One vblk process per stage (the compiled path, its own RSS). Each test breaks one connection
at one stage (during negotiation, mid-header, mid-payload on the fast and the slow write path,
with reads in flight, in a TLS handshake), then makes hundreds of clean connections: every one
succeeds, the time per connection and the process's memory stay flat, and the guard
(tests/guard.py) fails the test on any error line in vblk's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from service.nbd.constants import (
    IHAVEOPT,
    NBD_CMD_FLAG_FUA,
    NBDMAGIC,
    Command,
    Option,
    Reply,
)
from tests.guard import LOG_FILE_ENV
from tests.nbdclient import WireClient
from tests.reliability.test_load import rss_kib
from tests.reliability.test_security import make_pki

MiB = 1 << 20
BATCH = 300  # clean connections per measured batch
BLOCK = 4096


@dataclasses.dataclass
class Server:
    pid: int
    socket: str
    log: Path

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


@contextlib.asynccontextmanager
async def vblk(tmp: Path, *extra: str) -> AsyncIterator[Server]:
    sock = str(tmp / "nbd.sock")
    log = Path(os.environ[LOG_FILE_ENV])
    own_log = tmp / "vblk.log"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "serve", "--disk", "name=disk0,backend=memory,size=64M",
        "--guest-memory", "128M", "--nbd-listen", "none", "--nbd-socket", sock, "--http-listen", "none",
        "--log-format", "json", *extra,
        stdout=own_log.open("wb"), stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        for _ in range(500):
            if os.path.exists(sock):
                break
            assert proc.returncode is None, own_log.read_text()
            await asyncio.sleep(0.02)
        yield Server(proc.pid, sock, own_log)
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) == 0, own_log.read_text()
        assert log.exists()


async def clean_connection(server: Server) -> None:
    """Greeting, OPT_GO, one WRITE and one READ, NBD_CMD_DISC: what nbdinfo and friends do."""
    client = await WireClient.connect(server.socket)
    await client.go()
    client.request(Command.WRITE, 1, BLOCK, BLOCK, payload=b"v" * BLOCK)
    assert (await client.simple_reply())[1] == 0
    client.request(Command.READ, 2, BLOCK, BLOCK)
    assert await client.simple_reply(BLOCK) == (2, 0, b"v" * BLOCK)
    client.request(Command.DISC, 3, 0, 0)
    assert await client.closed()
    client.close()


async def batch(server: Server) -> tuple[float, int]:
    """Seconds per clean connection (median of 10 groups) and the server's RSS after, in KiB."""
    per_group = []
    for _ in range(10):
        start = time.perf_counter()
        for _ in range(BATCH // 10):
            await clean_connection(server)
        per_group.append((time.perf_counter() - start) / (BATCH // 10))
    return statistics.median(per_group), rss_kib(server.pid)


async def raw(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(server.socket)
    magic, opt, _ = struct.unpack(">QQH", await reader.readexactly(18))
    assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
    return reader, writer


async def negotiating(server: Server) -> None:
    """Half the client flags, then an option header cut short."""
    _, writer = await raw(server)
    writer.write(b"\x00")
    await writer.drain()
    writer.close()
    client = await WireClient.connect(server.socket)
    client.writer.write(struct.pack(">QII", IHAVEOPT, Option.GO, 100)[:12] + b"\x00" * 3)
    await client.writer.drain()
    client.close()


async def connected(server: Server) -> WireClient:
    client = await WireClient.connect(server.socket)
    await client.go()
    return client


def header(command: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, command, 7, offset, length)


async def mid_header(server: Server) -> None:
    client = await connected(server)
    client.writer.write(header(Command.READ, 0, BLOCK)[:10])
    await client.writer.drain()
    client.close()


async def mid_payload_fast_path(server: Server) -> None:
    """An aligned WRITE without FUA (started on the ring from the parser) whose payload stops."""
    client = await connected(server)
    client.writer.write(header(Command.WRITE, 0, BLOCK) + b"x" * 100)
    await client.writer.drain()
    client.close()
    client = await connected(server)  # a large one: the payload is received straight into DMA
    client.writer.write(header(Command.WRITE, 0, 4 * MiB) + b"x" * 300_000)
    await client.writer.drain()
    client.close()


async def mid_payload_slow_path(server: Server) -> None:
    """FUA and unaligned WRITEs (a task each, read-modify-write at the edges) cut mid-payload."""
    for offset, flags in ((0, NBD_CMD_FLAG_FUA), (100, 0)):
        client = await connected(server)
        client.writer.write(header(Command.WRITE, offset, 64 * 1024, flags) + b"y" * 1000)
        await client.writer.drain()
        client.close()


async def reads_in_flight(server: Server) -> None:
    """Sixty-four 1 MiB READs, and the client leaves without reading a reply."""
    client = await connected(server)
    for cookie in range(64):
        client.request(Command.READ, cookie, (cookie % 64) * MiB, MiB)
    await client.writer.drain()
    await asyncio.sleep(0.02)
    client.writer.transport.abort()


async def tls_handshake(server: Server) -> None:
    """NBD_OPT_STARTTLS accepted, then garbage instead of a ClientHello; then a cut handshake."""
    for junk in (b"\x16\x03\x01\x00\x05hello" + os.urandom(64), b"\x16\x03\x01\x02\x00\x01"):
        client = await WireClient.connect(server.socket)
        client.option(Option.STARTTLS)
        _, reply, _ = await client.option_reply()
        assert reply == Reply.ACK
        client.writer.write(junk)
        await client.writer.drain()
        await asyncio.sleep(0.05)
        client.close()


STAGES: dict[str, Callable[[Server], Awaitable[None]]] = {
    "negotiation": negotiating,
    "mid-header": mid_header,
    "mid-payload-fast-path": mid_payload_fast_path,
    "mid-payload-slow-path": mid_payload_slow_path,
    "reads-in-flight": reads_in_flight,
    "tls-handshake": tls_handshake,
}


@pytest.mark.parametrize("stage", list(STAGES))
async def test_an_abrupt_end_leaves_the_server_as_it_was(stage: str, tmp_path: Path) -> None:
    extra: list[str] = []
    if stage == "tls-handshake":
        await make_pki(tmp_path)
        extra = ["--tls", "on", "--tls-cert", str(tmp_path / "server-cert.pem")]
        extra += ["--tls-key", str(tmp_path / "server-key.pem")]
    async with vblk(tmp_path, *extra) as server:
        await batch(server)  # warm up: caches, the allocator's arenas
        before, rss_before = await batch(server)
        for _ in range(3):
            await STAGES[stage](server)
        await asyncio.sleep(0.1)
        after = [await batch(server) for _ in range(3)]
        events = server.events()
    # Hundreds of connections after the break cost what they cost before it, and hold nothing:
    # a poisoned server slowed down with every connection and kept ~0.9 KiB each.
    for seconds, _ in after:
        assert seconds < 3 * before + 0.002, (stage, before, after)
    growth = after[-1][1] - after[0][1]
    assert growth < 0.5 * 2 * BATCH, (stage, rss_before, after)
    reasons = [e["reason"] for e in events if e["event"] == "nbd_connection"]
    assert reasons.count("disconnect") >= 5 * BATCH
    assert set(reasons) <= {"disconnect", "connection_lost", "protocol_error"}, set(reasons)
