"""Load: 1,000 NBD connections at once against ``vblk serve``, every one doing verified I/O."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import sys
import tempfile

from service.nbd.constants import Command
from tests.nbdclient import WireClient

CONNECTIONS = 1000
BLOCK = 4096


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_thousand_concurrent_connections() -> None:
    with tempfile.TemporaryDirectory(prefix="vblk-") as tmp:
        sock = f"{tmp}/nbd.sock"
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.cli", "serve", "--disk", "name=d,backend=memory,size=64M",
            "--nbd-listen", "none", "--nbd-socket", sock, "--http-listen", "none", "--log-level", "warning",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            for _ in range(400):
                if os.path.exists(sock):
                    break
                await asyncio.sleep(0.02)
            idle_rss = rss_kib(server.pid)
            all_open = asyncio.Event()
            opened = 0
            gate = asyncio.Semaphore(100)  # connect in waves, as a crowd of clients would

            async def one(i: int) -> WireClient:
                nonlocal opened
                async with gate:
                    client = await WireClient.connect(sock)
                    await client.go("d")
                for round_no in range(4):
                    data = struct.pack(">II", i, round_no) * (BLOCK // 8)
                    offset = (i * 4 + round_no) * BLOCK
                    client.request(Command.WRITE, round_no, offset, BLOCK, payload=data)
                    assert (await client.simple_reply())[1] == 0
                    client.request(Command.READ, 100 + round_no, offset, BLOCK)
                    cookie, error, got = await client.simple_reply(BLOCK)
                    assert (cookie, error, got) == (100 + round_no, 0, data)
                opened += 1
                if opened == CONNECTIONS:
                    all_open.set()
                await all_open.wait()  # everyone stays connected until all are done
                return client

            clients = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(CONNECTIONS))), 120)
            busy_rss = rss_kib(server.pid)
            per_connection = (busy_rss - idle_rss) / CONNECTIONS
            print(f"vblk RSS idle {idle_rss} KiB, with {CONNECTIONS} connections {busy_rss} KiB: "
                  f"{per_connection:.1f} KiB per connection")  # fmt: skip
            assert per_connection < 64, f"{per_connection:.1f} KiB per connection"
            for client in clients:
                client.close()
            # The server is still fine afterwards.
            late = await WireClient.connect(sock)
            await late.go("d")
            late.request(Command.READ, 1, 0, BLOCK)
            assert (await late.simple_reply(BLOCK))[1] == 0
            late.close()
        finally:
            server.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(server.communicate(), 60)
        assert server.returncode == 0, err.decode()
